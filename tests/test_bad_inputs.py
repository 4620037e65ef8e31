"""A corpus of bad inputs, built by fixture code (no committed binaries), run through the real CLI.

Every case must exit non-zero with exactly one ``error:`` line that names the offending file (or
config key / flag) and the problem, and never print a traceback or an "internal error". A few
cases also go through ``python -m unetcli`` to prove it for the real entry point. The PNG reader
is fuzzed (random truncation and byte flips) and may only raise the project's error type; the
NIfTI reader's fuzz test lives in tests/test_nifti.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import make_blobs, make_nnunet
from unetcli.cli import app
from unetcli.data.png import read_png_image, read_png_mask
from unetcli.errors import DataError
from unetcli.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint

TRAIN_FLAGS = ["--epochs", "1", "--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=2",
               "--batch-size", "2", "--precision", "fp32", "--device", "cpu", "--num-threads", "1",
               "--set", "train.num_workers=0"]


@dataclass
class Bad:
    argv: list[str]
    expected: list[str]
    """Substrings of the single ``error:`` line: the file (or key) and the problem."""
    exit_code: int = 2
    check: Callable[[], None] | None = None
    """Extra assertions after the run (e.g. nothing was executed / written)."""
    untouched: list[Path] = field(default_factory=list)
    """Files whose bytes must be the same after the run."""


@dataclass
class Env:
    tmp: Path
    run: Path
    """A trained tiny 2D PNG run (for predict cases)."""

    def blobs(self, n: int = 4) -> Path:
        return make_blobs(self.tmp / "data", n=n)

    def nifti(self, n: int = 3) -> Path:
        return make_nnunet(self.tmp / "vol", n=n)

    def train(self, data: Path, *extra: str) -> list[str]:
        return ["train", str(data), "--out", str(self.tmp / "run"), *TRAIN_FLAGS, *extra]

    def predict(self, inputs: Path, output: Path | None = None, run: Path | None = None, *extra: str) -> list[str]:
        return ["predict", str(run or self.run), str(inputs), str(output or self.tmp / "preds"), "--device", "cpu", *extra]


CASES: dict[str, Callable[[Env], Bad]] = {}


def case(func: Callable[[Env], Bad]) -> Callable[[Env], Bad]:
    CASES[func.__name__] = func
    return func


def save_png(array: np.ndarray, path: Path, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- image and mask files


@case
def zero_byte_png_image(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "images" / "case02.png").write_bytes(b"")
    return Bad(env.train(data), [str(bad), "file is empty (0 bytes)"])


@case
def zero_byte_png_mask(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "masks" / "case02.png").write_bytes(b"")
    return Bad(env.train(data), [str(bad), "file is empty (0 bytes)"])


@case
def truncated_png_image(env: Env) -> Bad:
    data = env.blobs()
    bad = data / "images" / "case01.png"
    bad.write_bytes(bad.read_bytes()[:70])
    return Bad(env.train(data), [str(bad), "not a readable PNG image"])


@case
def gzip_garbage_with_png_suffix(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "images" / "case01.png").write_bytes(gzip.compress(b"definitely not pixels" * 50))
    return Bad(env.train(data), [str(bad), "not a readable PNG image"])


@case
def text_file_with_png_suffix(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "masks" / "case03.png").write_text("id,label\n1,tumour\n")
    return Bad(env.train(data), [str(bad), "not a readable PNG image"])


@case
def rgba_colour_mask(env: Env) -> Bad:
    data = env.blobs()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[8:16, 8:16, 1], rgba[..., 3] = 200, 100, 255
    bad = save_png(rgba, data / "masks" / "case02.png")
    return Bad(env.train(data), [str(bad), "mask is a colour (RGBA) image"])


@case
def mask_16bit_with_large_values(env: Env) -> Bad:
    data = env.blobs()
    mask = np.asarray(Image.open(data / "masks" / "case02.png")).astype(np.uint16)
    mask[mask == 1] = 40000
    bad = data / "masks" / "case02.png"
    Image.fromarray(mask).save(bad)  # 16-bit grayscale
    assert np.asarray(Image.open(bad)).max() == 40000
    return Bad(env.train(data), [str(bad), "label value(s) [40000]"])


@case
def image_mask_size_mismatch(env: Env) -> Bad:
    data = env.blobs()
    bad = save_png(np.zeros((20, 32), np.uint8), data / "masks" / "case01.png")
    return Bad(env.train(data), [str(bad), "mask size 32x20 differs from image case01.png size 32x32"])


@case
def image_channel_count_differs(env: Env) -> Bad:
    data = env.blobs()
    bad = save_png(np.full((32, 32, 3), 90, np.uint8), data / "images" / "case03.png")
    return Bad(env.train(data), [str(bad), "has 3 channel(s) while most images have 1"])


@case
def all_background_dataset(env: Env) -> Bad:
    data = env.blobs()
    for mask in (data / "masks").iterdir():
        save_png(np.zeros((32, 32), np.uint8), mask)
    return Bad(env.train(data), [str(data), "every mask is all background"])


@case
def single_case(env: Env) -> Bad:
    data = env.blobs(n=1)
    return Bad(env.train(data), [str(data), "only 1 case (case00)", "at least 2"])


@case
def duplicate_stems(env: Env) -> Bad:
    data = env.blobs()
    shutil.copy(data / "images" / "case01.png", data / "images" / "case01.PNG")
    return Bad(env.train(data), ["case01.png", "case01.PNG", "same case name 'case01'"])


@case
def image_without_mask(env: Env) -> Bad:
    data = env.blobs()
    (data / "masks" / "case02.png").unlink()
    return Bad(env.train(data), [str(data / "images" / "case02.png"), "no mask named case02.png"])


@case
def mask_without_image(env: Env) -> Bad:
    data = env.blobs()
    shutil.copy(data / "masks" / "case00.png", bad := data / "masks" / "orphan.png")
    return Bad(env.train(data), [str(bad), "mask has no image named orphan"])


@case
def label_outside_dataset_json_classes(env: Env) -> Bad:
    data = env.blobs()
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "disc": 1, "square": 2}}))
    mask = np.asarray(Image.open(data / "masks" / "case02.png")).copy()
    mask[0, 0] = 3
    bad = save_png(mask, data / "masks" / "case02.png")
    return Bad(env.train(data), [str(bad), "label value(s) [3] outside the declared classes 0..2"])


@case
def dataset_json_not_json(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "dataset.json").write_text("{labels: background")
    return Bad(env.train(data), [str(bad), "cannot read labels/channel_names"])


@case
def dataset_json_missing_background_label(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "dataset.json").write_text(json.dumps({"labels": {"disc": 1, "square": 2}}))
    return Bad(env.train(data), [str(bad), "label indices [1, 2] are not 0..1"])


@case
def png_and_nifti_mixed(env: Env) -> Bad:
    data = env.blobs()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(data / "images" / "case09.nii.gz"))
    return Bad(env.train(data), [str(data / "images"), "holds both PNG and NIfTI files"])


@case
def nnunet_image_without_channel_suffix(env: Env) -> Bad:
    data = env.blobs()
    (data / "images").rename(data / "imagesTr")
    (data / "masks").rename(data / "labelsTr")
    for i in (0, 1, 3):
        (data / "imagesTr" / f"case0{i}.png").rename(data / "imagesTr" / f"case0{i}_0000.png")
    bad = data / "imagesTr" / "case02.png"
    return Bad(env.train(data), [str(bad), "lacks the channel suffix _0000"])


@case
def nnunet_without_labels_folder(env: Env) -> Bad:
    data = env.blobs()
    (data / "images").rename(data / "imagesTr")
    return Bad(env.train(data), [str(data), "imagesTr/ found but no labelsTr/"])


@case
def missing_data_folder(env: Env) -> Bad:
    return Bad(env.train(env.tmp / "no-such-data"), [str(env.tmp / "no-such-data"), "data folder not found"])


@case
def data_folder_without_images(env: Env) -> Bad:
    (data := env.tmp / "empty").mkdir()
    return Bad(env.train(data), [str(data), "no images/ + masks/"])


# --------------------------------------------------------------------------- NIfTI volumes (train on an nnU-Net layout)


@case
def truncated_nii_gz(env: Env) -> Bad:
    data = env.nifti()
    bad = data / "imagesTr" / "case1_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    return Bad(env.train(data), [str(bad)])


@case
def gzip_garbage_nii_gz(env: Env) -> Bad:
    data = env.nifti()
    bad = data / "labelsTr" / "case2.nii.gz"
    raw = bytearray(bad.read_bytes())
    raw[20:60] = bytes(40)  # zeros inside the deflate stream
    bad.write_bytes(bytes(raw))
    return Bad(env.train(data), [str(bad)])


@case
def text_file_named_nii_gz(env: Env) -> Bad:
    data = env.nifti()
    (bad := data / "imagesTr" / "case0_0000.nii.gz").write_text("not a volume")
    return Bad(env.train(data), [str(bad), "not a gzip file"])


def _resave(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    img = nib.load(str(path))
    array = np.asarray(img.dataobj) if data is None else data
    new = nib.Nifti1Image(array, img.affine if affine is None else affine)
    nib.save(new, str(path))
    return path


@case
def affine_mismatch_image_label(env: Env) -> Bad:
    data = env.nifti()
    label = data / "labelsTr" / "case1.nii.gz"
    _resave(label, affine=np.diag([1.0, 1.0, 2.0, 1.0]) + np.array([[0, 0, 0, 9.0]] + [[0, 0, 0, 0]] * 3))
    return Bad(env.train(data), [str(label), "affine differs"])


@case
def label_4d(env: Env) -> Bad:
    data = env.nifti()
    label = data / "labelsTr" / "case0.nii.gz"
    array = np.asarray(nib.load(str(label)).dataobj)
    _resave(label, data=np.stack([array, array], axis=-1))
    return Bad(env.train(data), [str(label), "shape"])


@case
def nan_in_image(env: Env) -> Bad:
    data = env.nifti()
    image = data / "imagesTr" / "case2_0000.nii.gz"
    array = np.asarray(nib.load(str(image)).dataobj).astype(np.float32)
    array[3, 4, 5] = np.nan
    _resave(image, data=array)
    return Bad(env.train(data), [str(image), "NaN or infinite"])


@case
def inf_in_image(env: Env) -> Bad:
    data = env.nifti()
    image = data / "imagesTr" / "case0_0000.nii.gz"
    array = np.asarray(nib.load(str(image)).dataobj).astype(np.float32)
    array[1, 1, 1] = -np.inf
    _resave(image, data=array)
    return Bad(env.train(data), [str(image), "NaN or infinite"])


@case
def fractional_label_values(env: Env) -> Bad:
    data = env.nifti()
    label = data / "labelsTr" / "case1.nii.gz"
    array = np.asarray(nib.load(str(label)).dataobj).astype(np.float32)
    array[2, 2, 2] = 0.5
    _resave(label, data=array)
    return Bad(env.train(data), [str(label), "non-integer values"])


@case
def image_label_shape_mismatch(env: Env) -> Bad:
    data = env.nifti()
    label = data / "labelsTr" / "case2.nii.gz"
    _resave(label, data=np.zeros((24, 24, 12), np.uint8))
    return Bad(env.train(data), [str(label), "differs"])


# --------------------------------------------------------------------------- configuration and flags


@case
def unknown_config_key(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--set", "train.epocs=3"), ["unknown config key 'train.epocs'"])


@case
def wrong_config_type(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--set", "train.iterations_per_epoch=many"),
               ["config key 'train.iterations_per_epoch'", "'many'", "expected int"])


@case
def negative_epochs(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--epochs", "-3"), ["config key 'train.epochs'", "at least 1, got -3"])


@case
def config_file_invalid_yaml(env: Env) -> Bad:
    (bad := env.tmp / "bad.yaml").write_text("train:\n  epochs: [1,\n  lr: 2\n")
    return Bad(env.train(env.blobs(), "--config", str(bad)), [str(bad), "not valid YAML at line"])


@case
def config_file_unknown_key(env: Env) -> Bad:
    (bad := env.tmp / "typo.yaml").write_text("model:\n  featurs: [4, 8]\n")
    return Bad(env.train(env.blobs(), "--config", str(bad)), [str(bad), "unknown config key 'model.featurs'"])


@case
def config_file_not_a_mapping(env: Env) -> Bad:
    (bad := env.tmp / "list.yaml").write_text("- train\n- model\n")
    return Bad(env.train(env.blobs(), "--config", str(bad)), [str(bad), "must hold a mapping"])


@case
def patch_larger_than_every_image(env: Env) -> Bad:
    run = env.tmp / "run"
    return Bad(env.train(env.blobs(), "--patch-size", "64,64"), ["train.patch_size [64, 64]", "larger than every image"],
               check=lambda: None if not run.exists() else pytest.fail("left a half-made run folder behind"))


@case
def patch_with_wrong_axis_count(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--patch-size", "16,16,16"), ["train.patch_size", "3 axes but the data is 2D"])


@case
def fp16_on_cpu(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--precision", "fp16"), ["fp16", "CUDA"])


# --------------------------------------------------------------------------- output locations


@case
def unwritable_output_folder(env: Env) -> Bad:
    (blocker := env.tmp / "a-file").write_text("x")
    out = blocker / "run"  # cannot be created: its parent is a file (works as root too, unlike chmod)
    argv = env.train(env.blobs())
    argv[argv.index("--out") + 1] = str(out)
    return Bad(argv, [str(out), "cannot create the run folder"])


@case
def output_is_an_existing_file(env: Env) -> Bad:
    (out := env.tmp / "run").write_text("precious")
    return Bad(env.train(env.blobs()), [str(out), "exists and is not a folder"], untouched=[out])


@case
def output_run_folder_not_empty(env: Env) -> Bad:
    (env.tmp / "run").mkdir()
    (keep := env.tmp / "run" / "notes.txt").write_text("keep me")
    return Bad(env.train(env.blobs()), [str(env.tmp / "run"), "already exists and is not empty"], untouched=[keep])


@case
def predict_into_unwritable_folder(env: Env) -> Bad:
    (blocker := env.tmp / "a-file").write_text("x")
    return Bad(env.predict(env.blobs() / "images", blocker / "preds"), [str(blocker / "preds"), "cannot create the output folder"])


@case
def predict_output_equals_input_folder(env: Env) -> Bad:
    data = env.blobs()
    images = data / "images"
    return Bad(env.predict(images, images), [str(images), "input folder"], untouched=sorted(images.iterdir()))


@case
def predict_over_existing_output(env: Env) -> Bad:
    data = env.blobs()
    (out := env.tmp / "preds").mkdir()
    (existing := out / "case01.png").write_bytes(b"earlier prediction")
    return Bad(env.predict(data / "images", out), [str(existing), "already exists"], untouched=[existing])


@case
def eval_output_inside_input_folder(env: Env) -> Bad:
    data = env.blobs()
    out = data / "masks" / "scores"
    return Bad(["eval", str(data / "masks"), str(data / "masks"), "--out", str(out)], [str(out), "input folder"],
               check=lambda: None if not out.exists() else pytest.fail("wrote into the input folder"))


# --------------------------------------------------------------------------- runs and checkpoints


@case
def predict_missing_run_folder(env: Env) -> Bad:
    return Bad(env.predict(env.blobs() / "images", run=env.tmp / "no-run"), [str(env.tmp / "no-run"), "not found"])


@case
def resume_missing_run_folder(env: Env) -> Bad:
    return Bad(["train", "--resume", str(env.tmp / "no-run")], [str(env.tmp / "no-run"), "run folder not found"])


@case
def checkpoint_from_another_model(env: Env) -> Bad:
    state = load_checkpoint(env.run / "checkpoints" / "best.pt")
    state["config"]["model"]["features"] = [8, 16, 32]  # weights are for [4, 8, 16]
    save_checkpoint(bad := env.tmp / "other.pt", {k: v for k, v in state.items() if k not in ("format", "format_version", "unetcli_version")})
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "weights do not fit the model"])


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@case
def hostile_pickled_checkpoint(env: Env) -> Bad:
    marker = env.tmp / "pwned"
    state = load_checkpoint(env.run / "checkpoints" / "best.pt")
    state["metadata"]["payload"] = _Hostile(marker)
    torch.save(state, bad := env.tmp / "evil.pt")
    assert not marker.exists()
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "refused to load"],
               check=lambda: None if not marker.exists() else pytest.fail("the pickled payload ran"))


@case
def plain_torch_state_dict_as_checkpoint(env: Env) -> Bad:
    torch.save({"conv.weight": torch.ones(4, 1, 3, 3)}, bad := env.tmp / "someone-elses.pt")
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "not a unetcli checkpoint"])


@case
def resume_with_a_changed_learning_rate(env: Env) -> Bad:
    run = env.tmp / "copy"
    shutil.copytree(env.run, run)
    return Bad(["train", "--resume", str(run), "--epochs", "3", "--lr", "0.5"], ["--lr", "cannot be used with --resume"],
               untouched=[run / "checkpoints" / "last.pt"])


@case
def truncated_checkpoint(env: Env) -> Bad:
    raw = (env.run / "checkpoints" / "best.pt").read_bytes()
    (bad := env.tmp / "cut.pt").write_bytes(raw[: len(raw) // 3])
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "corrupt or truncated"])


@case
def checkpoint_of_a_future_format(env: Env) -> Bad:
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "config": {}, "metadata": {}, "model": {}},
               bad := env.tmp / "future.pt")
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), f"format version {FORMAT_VERSION + 1}"])


@case
def predict_wrong_channel_count(env: Env) -> Bad:
    (inputs := env.tmp / "rgb").mkdir()
    bad = save_png(np.full((32, 32, 3), 120, np.uint8), inputs / "scan.png")
    return Bad(env.predict(inputs), [str(bad), "3 channel(s) but the model was trained on 1"])


@case
def predict_volume_into_2d_model(env: Env) -> Bad:
    data = env.nifti(n=1)
    bad = data / "imagesTr" / "case0_0000.nii.gz"
    return Bad(env.predict(bad), [str(bad), "trained on .png files"])


@case
def predict_truncated_input(env: Env) -> Bad:
    data = env.blobs()
    bad = data / "images" / "case02.png"
    bad.write_bytes(bad.read_bytes()[:50])
    return Bad(env.predict(data / "images"), [str(bad), "not a readable PNG"])


@case
def predict_missing_input(env: Env) -> Bad:
    return Bad(env.predict(env.tmp / "nothing-here"), [str(env.tmp / "nothing-here"), "not found"])


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    data = make_blobs(tmp_path_factory.mktemp("bad-inputs") / "data", n=4)
    run = tmp_path_factory.mktemp("bad-inputs-run") / "run"
    result = CliRunner().invoke(app, ["-q", "train", str(data), "--out", str(run), *TRAIN_FLAGS])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture()
def env(tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    return Env(tmp_path, trained_run)


def assert_one_clear_error(output: str, bad: Bad, exit_code: int) -> None:
    assert exit_code == bad.exit_code, output
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in bad.expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, env: Env) -> None:
    threads = torch.get_num_threads()
    bad = CASES[name](env)
    before = {p: p.read_bytes() for p in bad.untouched}
    result = CliRunner().invoke(app, bad.argv)
    torch.set_num_threads(threads)
    assert_one_clear_error(result.output, bad, result.exit_code)
    assert {p: p.read_bytes() for p in bad.untouched} == before
    if bad.check is not None:
        bad.check()


@pytest.mark.parametrize("name", ["truncated_nii_gz", "hostile_pickled_checkpoint", "negative_epochs"])
def test_bad_input_through_the_real_entry_point(name: str, env: Env) -> None:
    bad = CASES[name](env)
    proc = subprocess.run([sys.executable, "-m", "unetcli", *bad.argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.stdout.strip() == "" or "error:" not in proc.stdout
    assert_one_clear_error(proc.stderr, bad, proc.returncode)
    if bad.check is not None:
        bad.check()


# --------------------------------------------------------------------------- fuzzing the PNG reader


def _variants(data: bytes, count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        raw = bytearray(data)
        if i % 2 == 0:
            raw = raw[: int(rng.integers(0, len(raw)))]
        else:
            for _ in range(int(rng.integers(1, 6))):
                raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
        out.append(bytes(raw))
    return out


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_png_reader_fuzz_raises_only_data_errors(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(7)
    array = rng.integers(0, 3, (24, 20)).astype(np.uint8) if kind == "mask" else rng.integers(0, 255, (24, 20, 3)).astype(np.uint8)
    reader = read_png_mask if kind == "mask" else read_png_image
    path = tmp_path / "fuzz.png"
    outcomes = {"ok": 0, "error": 0}
    for variant in _variants(png_bytes(array), 40, seed=11 if kind == "mask" else 12):
        path.write_bytes(variant)
        try:
            reader(path)
            outcomes["ok"] += 1
        except DataError as exc:
            assert str(path) in exc.message and "\n" not in exc.message
            outcomes["error"] += 1
    assert outcomes["error"] >= 20, outcomes  # most damage is noticed (PNG has CRCs)
