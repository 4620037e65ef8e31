"""A corpus of bad inputs, built by fixture code (no committed binaries), run through the real CLI.

Every case must exit non-zero with exactly one ``error:`` line that names the offending file (or
config key / flag) and the problem, and never print a traceback or an "internal error". A few
cases also go through ``python -m unetcli`` to prove it for the real entry point. The PNG reader
is fuzzed (random truncation and byte flips) and may only raise the project's error type; the
NIfTI reader's fuzz test lives in tests/test_nifti.py.
"""

from __future__ import annotations

import errno
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
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import make_blobs, make_nnunet, tilted_affine, write_dicom_series
from unetcli.cli import app
from unetcli.data.png import read_png_image, read_png_mask
from unetcli.errors import DataError
from unetcli.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint

CV_FLAGS = ["--epochs", "1", "--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=2",
            "--set", "train.batch_size=2", "--precision", "fp32", "--device", "cpu", "--num-threads", "1",
            "--set", "train.num_workers=0"]
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
    full_disk: bool = False
    """Run with a full disk: every fsync (of atomic writes and lock files) fails with ENOSPC."""
    absent: list[str] = field(default_factory=list)
    """Text that must not be in the output (e.g. a plan printed before refusing an option)."""


@dataclass
class Env:
    tmp: Path
    run: Path
    """A trained tiny 2D PNG run (for predict cases)."""
    request: pytest.FixtureRequest | None = None

    def cv(self) -> tuple[Path, Path]:
        """(data, a copy of a finished tiny 2-fold `unet cv` folder over it), made once per module."""
        data, cv = self.request.getfixturevalue("trained_cv")  # type: ignore[union-attr]
        shutil.copytree(cv, copy := self.tmp / "cv", symlinks=True)
        return data, copy

    def blobs(self, n: int = 4) -> Path:
        return make_blobs(self.tmp / "data", n=n)

    def nifti(self, n: int = 3) -> Path:
        return make_nnunet(self.tmp / "vol", n=n)

    def volume_run(self) -> Path:
        """A trained tiny 3D run (for predict cases on volumes), made once per module."""
        return self.request.getfixturevalue("trained_volume_run")  # type: ignore[union-attr]

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


# --------------------------------------------------------------------------- MetaImage, NRRD, TIFF, DICOM


def _converted(data: Path, suffix: str) -> Path:
    """The nnU-Net NIfTI dataset ``data`` with every file rewritten as ``suffix`` by SimpleITK (file_ending set)."""
    for path in sorted(data.glob("*Tr/*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_name(path.name[: -len(".nii.gz")] + suffix)), True)
        path.unlink()
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "file_ending": suffix}))
    return data


@case
def truncated_mha(env: Env) -> Bad:
    data = _converted(env.nifti(), ".mha")
    bad = data / "imagesTr" / "case1_0000.mha"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) - 200])
    return Bad(env.train(data), [str(bad), "not a readable MetaImage file", "truncated"], absent=["M_ReadElementsData"])


@case
def nrrd_with_a_wrong_header(env: Env) -> Bad:
    data = _converted(env.nifti(), ".nrrd")
    bad = data / "labelsTr" / "case2.nrrd"
    bad.write_bytes(bad.read_bytes().replace(b"sizes: 24 24 16", b"sizes: 24 24 -16", 1))
    return Bad(env.train(data), [str(bad), "not a readable NRRD file", "bad NRRD header", "sizes"], untouched=[bad])


@case
def tiff_without_spacing(env: Env) -> Bad:
    data = env.nifti()
    for path in sorted(data.glob("*Tr/*.nii.gz")):
        stem = path.name[: -len(".nii.gz")]
        tifffile.imwrite(str(path.with_name(stem + ".tif")), np.transpose(np.asarray(nib.load(str(path)).dataobj)))
        if stem != "case1_0000":  # every file but one has its spacing sidecar
            path.with_name(stem + ".json").write_text(json.dumps({"spacing": [2.0, 1.0, 1.0]}))
        path.unlink()
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".tif"}))
    bad = data / "imagesTr" / "case1_0000.tif"
    return Bad(env.train(data), [str(bad), "3D TIFF without voxel spacing", "add", "case1_0000.json", '"spacing": [z, y, x]'])


@case
def dicom_series_with_clashing_geometry(env: Env) -> Bad:
    """Two acquisitions exported under one SeriesInstanceUID: the second one tilted."""
    volume = np.zeros((12, 10, 6), np.int16)
    volume[3:8, 2:6, 1:4] = 300
    folder = env.tmp / "dicom"
    write_dicom_series(volume, np.diag([1.0, 1.0, 2.0, 1.0]), folder, "1.2.3.4")
    write_dicom_series(volume, tilted_affine(), folder, "1.2.3.4", prefix="tilted")
    out = env.tmp / "preds"
    return Bad(env.predict(folder, out, env.volume_run()), ["DICOM series 1.2.3.4", "clashing geometry", "tilted", "orientation"],
               check=lambda: _nothing_written(out))


def _nothing_written(folder: Path) -> None:
    assert not folder.exists() or not [p for p in folder.iterdir() if not p.name.startswith(".")]


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


# --------------------------------------------------------------------------- cross-validation folders (issue #27)


def _unchanged(*paths: Path) -> list[Path]:
    return [p for p in paths if p.is_file()]


def _live_lock(folder: Path) -> None:
    """A lock held by a live process (this test process), as a running `unet cv` or training leaves it."""
    from unetcli.runlock import LOCK_NAME, owner_info

    (folder / LOCK_NAME).write_text(json.dumps(owner_info()))


@case
def cv_overwrite_while_another_cv_holds_the_folder(env: Env) -> Bad:
    data, cv = env.cv()
    _live_lock(cv)
    keep = cv / "fold_0" / "checkpoints" / "last.pt"
    return Bad(["cv", str(data), "--out", str(cv), "--folds", "2", "--overwrite", *CV_FLAGS],
               [str(cv), "is being written by another training (PID"], untouched=[keep, cv / "cv.json"])


@case
def cv_overwrite_while_a_fold_is_being_trained(env: Env) -> Bad:
    data, cv = env.cv()
    _live_lock(cv / "fold_1")
    keep = cv / "fold_1" / "checkpoints" / "last.pt"
    return Bad(["cv", str(data), "--out", str(cv), "--folds", "2", "--overwrite", "--set", "train.lr=0.5", *CV_FLAGS],
               [str(cv), "fold_1 is being trained by another process", "not replacing it"], untouched=[keep, cv / "cv.json"])


@case
def cv_single_fold_while_another_cv_holds_the_folder(env: Env) -> Bad:
    data, cv = env.cv()
    _live_lock(cv)
    return Bad(["cv", str(data), "--out", str(cv), "--folds", "2", "--fold", "1", *CV_FLAGS],
               [str(cv), "is being written by another unet cv"], untouched=[cv / "fold_1" / "checkpoints" / "last.pt"])


def _kill_fold_mid_training(cv: Path) -> Path:
    last = cv / "fold_1" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["resume"]["finished"] = False
    save_checkpoint(last, {k: v for k, v in state.items() if k not in ("format", "format_version", "unetcli_version")})
    return last


@case
def predict_cv_with_a_fold_stopped_mid_training(env: Env) -> Bad:
    data, cv = env.cv()
    _kill_fold_mid_training(cv)
    return Bad(env.predict(data / "images", run=cv), [str(cv), "fold_1 stopped before the last epoch"],
               check=lambda: None if not (env.tmp / "preds").exists() else pytest.fail("predicted with a half-trained fold"))


@case
def predict_cv_with_a_fold_killed_before_it_finished(env: Env) -> Bad:
    data, cv = env.cv()
    (cv / "fold_0" / "oof" / ".complete").unlink()
    return Bad(env.predict(data / "images", run=cv), [str(cv), "fold_0 did not finish"])


@case
def export_cv_with_a_fold_stopped_mid_training(env: Env) -> Bad:
    _, cv = env.cv()
    _kill_fold_mid_training(cv)
    out = env.tmp / "ensemble.pt"
    return Bad(["export", str(cv), "--out", str(out)], [str(cv), "fold_1 stopped before the last epoch"],
               check=lambda: None if not out.exists() else pytest.fail("exported a half-trained fold"))


@case
def predict_cv_truncated_postprocessing_json(env: Env) -> Bad:
    data, cv = env.cv()
    (bad := cv / "postprocessing.json").write_text('{"foreground": tr')
    return Bad(env.predict(data / "images", run=cv), [str(bad), "postprocessing choice is damaged or unreadable"])


@case
def predict_cv_postprocessing_json_of_wrong_types(env: Env) -> Bad:
    data, cv = env.cv()
    (bad := cv / "postprocessing.json").write_text(json.dumps({"foreground": "yes", "classes": ["1"]}))
    return Bad(env.predict(data / "images", run=cv), [str(bad), "postprocessing choice is damaged"])


@case
def export_cv_postprocessing_json_is_a_list(env: Env) -> Bad:
    _, cv = env.cv()
    (bad := cv / "postprocessing.json").write_text("[1, 2]")
    return Bad(["export", str(cv), "--out", str(env.tmp / "m.pt")], [str(bad), "expected a JSON object, found list"])


@case
def predict_cv_with_zero_folds(env: Env) -> Bad:
    data, cv = env.cv()
    record = json.loads((cv / "cv.json").read_text())
    (bad := cv / "cv.json").write_text(json.dumps({**record, "folds": 0}))
    return Bad(env.predict(data / "images", run=cv), [str(bad), "'folds' is 0"])


@case
def cv_rerun_with_a_damaged_cv_json(env: Env) -> Bad:
    data, cv = env.cv()
    (bad := cv / "cv.json").write_bytes(b"\xff\xfe{")
    return Bad(["cv", str(data), "--out", str(cv), "--folds", "2", *CV_FLAGS], [str(bad), "damaged or unreadable"],
               untouched=[cv / "fold_0" / "checkpoints" / "last.pt"])


@case
def cv_rerun_with_a_damaged_splits_json(env: Env) -> Bad:
    data, cv = env.cv()
    (bad := cv / "splits.json").write_text('{"folds": [')
    return Bad(["cv", str(data), "--out", str(cv), "--folds", "2", *CV_FLAGS], [str(bad), "record of the folds is damaged"],
               untouched=[cv / "fold_0" / "checkpoints" / "last.pt"])


@case
def cv_group_by_matching_no_case(env: Env) -> Bad:
    out = env.tmp / "cv"
    return Bad(["cv", str(env.blobs()), "--out", str(out), "--folds", "2", "--group-by", "^(sub-[0-9]+)", *CV_FLAGS],
               ["--group-by '^(sub-[0-9]+)' matches none of the 4 case names"],
               check=lambda: None if not out.exists() else pytest.fail("left a folder behind"))


@case
def cv_group_by_with_splits(env: Env) -> Bad:
    (splits := env.tmp / "splits.json").write_text(json.dumps({"folds": []}))
    return Bad(["cv", str(env.blobs()), "--out", str(env.tmp / "cv"), "--splits", str(splits), "--group-by", "^(case)"],
               ["--group-by cannot be combined with --splits"])


@case
def cv_splits_that_leave_cases_unvalidated(env: Env) -> Bad:
    out = env.tmp / "cv"
    (splits := env.tmp / "splits.json").write_text(json.dumps({"folds": [
        {"train": ["case00", "case01"], "val": ["case02"]}, {"train": ["case02", "case03"], "val": ["case00"]}]}))
    return Bad(["cv", str(env.blobs()), "--out", str(out), "--splits", str(splits), *CV_FLAGS],
               [str(splits), "2 case(s) are in no fold's val list: case01, case03"],
               check=lambda: None if not (out / "fold_0").exists() else pytest.fail("trained before checking the splits"))


@case
def cv_one_fold(env: Env) -> Bad:
    return Bad(["cv", str(env.blobs()), "--out", str(env.tmp / "cv"), "--folds", "1"], ["--folds must be at least 2, got 1"],
               absent=["plan:", "fingerprint"])


@case
def cv_negative_fold(env: Env) -> Bad:
    return Bad(["cv", str(env.blobs()), "--out", str(env.tmp / "cv"), "--fold", "-1"], ["--fold -1 is not a fold"],
               absent=["plan:", "fingerprint"])


@case
def cv_fold_beyond_the_folds(env: Env) -> Bad:
    return Bad(["cv", str(env.blobs()), "--out", str(env.tmp / "cv"), "--folds", "2", "--fold", "2"], ["--fold 2 is not a fold"],
               absent=["plan:", "fingerprint"])


@case
def cv_parallel_zero(env: Env) -> Bad:
    return Bad(["cv", str(env.blobs()), "--out", str(env.tmp / "cv"), "--parallel", "0"], ["--parallel must be at least 1"],
               absent=["plan:", "fingerprint"])


@case
def cv_into_unwritable_location(env: Env) -> Bad:
    (blocker := env.tmp / "a-file").write_text("x")
    return Bad(["cv", str(env.blobs()), "--out", str(blocker / "cv"), "--folds", "2", *CV_FLAGS],
               [str(blocker / "cv"), "cannot create the cross-validation folder"])


@case
def cv_out_is_a_looping_symlink(env: Env) -> Bad:
    (loop := env.tmp / "loop").symlink_to(env.tmp / "loop")
    return Bad(["cv", str(env.blobs()), "--out", str(loop), "--folds", "2", *CV_FLAGS], [str(loop), "cross-validation folder"])


@case
def eval_out_is_a_looping_symlink(env: Env) -> Bad:
    truth = env.blobs() / "masks"
    (loop := env.tmp / "loop").symlink_to(env.tmp / "loop")
    return Bad(["eval", str(truth), str(truth), "--out", str(loop)], [str(loop), "output folder"])


@case
def cv_onto_a_full_disk(env: Env) -> Bad:
    out = env.tmp / "cv"
    return Bad(["cv", str(env.blobs()), "--out", str(out), "--folds", "2", "--no-plan", *CV_FLAGS],
               [str(out), "No space left on device"], full_disk=True,
               check=lambda: None if not out.exists() else pytest.fail(f"left {sorted(out.rglob('*'))} behind"))


# --------------------------------------------------------------------------- predict, ensembles and exported models


@case
def ensemble_with_other_class_names(env: Env) -> Bad:
    state = load_checkpoint(env.run / "checkpoints" / "best.pt")
    state["metadata"]["label_names"] = ["background", "square", "disc"]  # same values, other meaning
    save_checkpoint(other := env.tmp / "other.pt", {k: v for k, v in state.items() if k not in ("format", "format_version", "unetcli_version")})
    return Bad(env.predict(env.blobs() / "images", None, None, "--ensemble-with", str(other)),
               [str(other), "cannot be ensembled", "label_names"])


@case
def checkpoint_metadata_disagrees_with_its_network(env: Env) -> Bad:
    state = load_checkpoint(env.run / "checkpoints" / "best.pt")
    state["metadata"]["num_classes"] = 2  # the network has 3 outputs
    save_checkpoint(bad := env.tmp / "edited.pt", {k: v for k, v in state.items() if k not in ("format", "format_version", "unetcli_version")})
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "metadata disagrees with the network", "num_classes 2"],
               check=lambda: None if not (env.tmp / "preds").exists() else pytest.fail("wrote masks"))


@case
def predict_input_is_a_looping_symlink(env: Env) -> Bad:
    (loop := env.tmp / "loop").symlink_to(env.tmp / "loop")
    return Bad(env.predict(loop), [str(loop), "broken or looping symbolic link"])


@case
def predict_output_is_a_looping_symlink(env: Env) -> Bad:
    (loop := env.tmp / "loop").symlink_to(env.tmp / "loop")
    return Bad(env.predict(env.blobs() / "images", loop), [str(loop), "broken or looping symbolic link"])


def _export_document(env: Env) -> str:
    exported = env.tmp / "real.pt"
    assert CliRunner().invoke(app, ["export", str(env.run), "--out", str(exported)]).exit_code == 0
    extra = {"unetcli.json": ""}
    torch.jit.load(str(exported), _extra_files=extra)
    return extra["unetcli.json"]


def _crafted_torchscript(env: Env, module: torch.nn.Module) -> Path:
    document = _export_document(env)
    torch.jit.save(torch.jit.script(module), str(bad := env.tmp / "crafted.pt"), _extra_files={"unetcli.json": document})
    return bad


@case
def torchscript_3d_network_with_2d_metadata(env: Env) -> Bad:
    bad = _crafted_torchscript(env, torch.nn.Conv3d(1, 3, 1))
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "metadata"],
               check=lambda: None if not any((env.tmp / "preds").glob("*.png")) else pytest.fail("wrote masks"))


@case
def torchscript_with_more_outputs_than_its_classes(env: Env) -> Bad:
    bad = _crafted_torchscript(env, torch.nn.Conv2d(1, 5, 1))
    return Bad(env.predict(env.blobs() / "images", run=bad), [str(bad), "does not match its metadata", "3 classes"])


@case
def export_overwrite_onto_the_runs_own_last_checkpoint(env: Env) -> Bad:
    run = env.tmp / "copy"
    shutil.copytree(env.run, run)
    last = run / "checkpoints" / "last.pt"
    return Bad(["export", str(run), "--format", "torchscript", "--out", str(last), "--overwrite"],
               [str(last), "not a file written by unet export"], untouched=[last])


@case
def export_overwrite_onto_an_image(env: Env) -> Bad:
    image = env.blobs() / "images" / "case00.png"
    return Bad(["export", str(env.run), "--format", "torchscript", "--out", str(image), "--overwrite"],
               [str(image), "not a file written by unet export"], untouched=[image])


@case
def export_with_a_suffix_that_names_no_format(env: Env) -> Bad:
    return Bad(["export", str(env.run), "--out", str(env.tmp / "m.bin")], ["m.bin", "names no export format"])


@case
def export_torchscript_onto_a_full_disk(env: Env) -> Bad:
    out = env.tmp / "m.pt"
    return Bad(["export", str(env.run), "--out", str(out)], [str(out), "No space left on device"], full_disk=True,
               check=lambda: None if list(env.tmp.glob("*m.pt*")) == [] else pytest.fail(f"left {list(env.tmp.glob('*m.pt*'))}"))


@case
def export_onnx_onto_a_full_disk(env: Env) -> Bad:
    pytest.importorskip("onnx")
    out = env.tmp / "m.onnx"
    return Bad(["export", str(env.run), "--out", str(out)], [str(out), "No space left on device"], full_disk=True,
               check=lambda: None if list(env.tmp.glob("*m.onnx*")) == [] else pytest.fail("left a file behind"))


# --------------------------------------------------------------------------- eval


def _masks_with_ignore(env: Env) -> tuple[Path, Path]:
    data = env.blobs()
    for mask in (data / "masks").iterdir():
        array = np.asarray(Image.open(mask)).copy()
        array[:4] = 3  # unlabelled rows
        save_png(array, mask)
    return data / "masks", data / "masks"


@case
def eval_ignore_label_zero(env: Env) -> Bad:
    truth = env.blobs() / "masks"
    return Bad(["eval", str(truth), str(truth), "--out", str(env.tmp / "e"), "--ignore-label", "0"],
               ["--ignore-label 0", "0 is background"])


@case
def eval_ignore_label_is_a_real_class(env: Env) -> Bad:
    truth = env.blobs() / "masks"
    return Bad(["eval", str(truth), str(truth), "--out", str(env.tmp / "e"), "--ignore-label", "1"],
               ["4 reference(s)", "label value(s) [2] above the ignore label 1"],
               check=lambda: None if not (env.tmp / "e").exists() else pytest.fail("wrote scores"))


@case
def eval_ignore_label_named_as_a_class_in_dataset_json(env: Env) -> Bad:
    data = env.blobs()
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "disc": 1, "square": 2}}))
    return Bad(["eval", str(data / "masks"), str(data / "masks"), "--out", str(env.tmp / "e"), "--ignore-label", "2"],
               ["--ignore-label 2 is the class 'square'"])


@case
def eval_into_unwritable_location(env: Env) -> Bad:
    truth = env.blobs() / "masks"
    (blocker := env.tmp / "a-file").write_text("x")
    return Bad(["eval", str(truth), str(truth), "--out", str(blocker / "e")], [str(blocker / "e"), "cannot create the output folder"])


@case
def eval_onto_a_full_disk(env: Env) -> Bad:
    truth = env.blobs() / "masks"
    out = env.tmp / "e"
    return Bad(["eval", str(truth), str(truth), "--out", str(out), "--jobs", "1"], [str(out), "No space left on device"],
               full_disk=True, check=lambda: None if not out.exists() else pytest.fail("left an empty folder"))


# --------------------------------------------------------------------------- plan and dataset.json


@case
def plan_set_key_the_planner_does_not_use(env: Env) -> Bad:
    return Bad(["plan", str(env.blobs()), "--set", "model.features=[8,16]"], ["--set model.features", "unet plan does not use"])


@case
def plan_invalid_target_spacing(env: Env) -> Bad:
    return Bad(["plan", str(env.blobs()), "--set", "data.target_spacing=[0,0,0]"], ["--set data.target_spacing"])


@case
def plan_into_unwritable_location(env: Env) -> Bad:
    (blocker := env.tmp / "a-file").write_text("x")
    return Bad(["plan", str(env.blobs()), "--out", str(blocker / "plans.yaml")], [str(blocker / "plans.yaml"), "cannot write"])


@case
def plan_onto_a_full_disk(env: Env) -> Bad:
    out = env.tmp / "plans.yaml"
    return Bad(["plan", str(env.blobs()), "--out", str(out)], ["No space left on device"], full_disk=True,
               check=lambda: None if not out.exists() else pytest.fail("wrote a plan"))


@case
def plan_file_not_utf8(env: Env) -> Bad:
    (bad := env.tmp / "plans.yaml").write_bytes(b"configurations:\n  2d: \xff\xfe\n")
    return Bad(env.train(env.blobs(), "--plan", str(bad)), [str(bad), "not UTF-8 text"])


@case
def plan_file_of_a_future_format(env: Env) -> Bad:
    (bad := env.tmp / "plans.yaml").write_text("unetcli_plan: 99\ndefault: 2d\nconfigurations:\n  2d:\n    config: {}\n")
    return Bad(env.train(env.blobs(), "--plan", str(bad)), [str(bad), "plan format 99 is not supported"])


@case
def plan_file_with_a_python_tag(env: Env) -> Bad:
    (bad := env.tmp / "plans.yaml").write_text("configurations: !!python/object/apply:os.system ['true']\n")
    return Bad(env.train(env.blobs(), "--plan", str(bad)), [str(bad), "not valid YAML at line 1", "constructor"])


@case
def config_file_with_a_python_tag(env: Env) -> Bad:
    (bad := env.tmp / "evil.yaml").write_text("train: !!python/object/apply:os.system ['true']\n")
    return Bad(env.train(env.blobs(), "--config", str(bad)), [str(bad), "not valid YAML at line 1"])


@case
def dataset_json_channel_names_of_a_wrong_type(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "dataset.json").write_text(json.dumps({"channel_names": 5}))
    return Bad(env.train(data), [str(bad), "'channel_names' must map channel indices to names"])


@case
def dataset_json_labels_list_of_numbers(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "dataset.json").write_text(json.dumps({"labels": [0, 1, 2]}))
    return Bad(env.train(data), [str(bad), "'labels' must map names to label values"])


@case
def dangling_image_symlink(env: Env) -> Bad:
    data = env.blobs()
    (bad := data / "images" / "case09.png").symlink_to(env.tmp / "gone.png")
    return Bad(env.train(data), [str(bad), "broken symbolic link"])


@case
def train_onto_a_full_disk(env: Env) -> Bad:
    run = env.tmp / "run"
    return Bad(env.train(env.blobs()), [str(run), "No space left on device"], full_disk=True,
               check=lambda: None if not run.exists() else pytest.fail(f"left {sorted(p.name for p in run.rglob('*'))}"))


@case
def predict_onto_a_full_disk(env: Env) -> Bad:
    out = env.tmp / "preds"
    return Bad(env.predict(env.blobs() / "images", out), [str(out), "No space left on device"], full_disk=True,
               check=lambda: None if not out.exists() or not any(out.iterdir()) else pytest.fail("left files behind"))


@case
def export_into_unwritable_location(env: Env) -> Bad:
    (blocker := env.tmp / "a-file").write_text("x")
    return Bad(["export", str(env.run), "--out", str(blocker / "m.pt")], [str(blocker), "cannot create the output folder"])


# --------------------------------------------------------------------------- train launcher and fine-tuning


@case
def gpus_zero(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--gpus", "0"), ["--gpus 0 must be at least 1"])


@case
def gpus_negative(env: Env) -> Bad:
    return Bad(env.train(env.blobs(), "--gpus", "-1"), ["--gpus -1 must be at least 1"])


@case
def init_from_a_missing_run_leaves_no_run_folder(env: Env) -> Bad:
    run = env.tmp / "run"
    return Bad(env.train(env.blobs(), "--init", str(env.tmp / "no-such-run")), [str(env.tmp / "no-such-run")],
               check=lambda: None if not run.exists() else pytest.fail(f"left {sorted(p.name for p in run.rglob('*'))}"))


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


@pytest.fixture(scope="module")
def trained_volume_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("bad-inputs-volume")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(root / "cache"))
    result = CliRunner().invoke(app, ["-q", "train", str(make_nnunet(root / "data", n=3)), "--out", str(root / "run"), *TRAIN_FLAGS])
    mp.undo()
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def trained_cv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    threads = torch.get_num_threads()
    data = make_blobs(tmp_path_factory.mktemp("bad-inputs-cv") / "data", n=4)
    out = data.parent / "cv"
    result = CliRunner().invoke(app, ["-q", "cv", str(data), "--out", str(out), "--folds", "2", *CV_FLAGS])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return data, out


@pytest.fixture()
def env(tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Env:
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    return Env(tmp_path, trained_run, request)


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync fails as on a full disk (where the data of a write meets the device)."""
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def assert_one_clear_error(output: str, bad: Bad, exit_code: int) -> None:
    assert exit_code == bad.exit_code, output
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in bad.expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    bad = CASES[name](env)
    before = {p: p.read_bytes() for p in bad.untouched}
    if bad.full_disk:
        full_disk(monkeypatch)
    result = CliRunner().invoke(app, bad.argv)
    torch.set_num_threads(threads)
    assert_one_clear_error(result.output, bad, result.exit_code)
    assert not [text for text in bad.absent if text in result.output], result.output
    assert {p: p.read_bytes() for p in bad.untouched} == before
    if bad.check is not None:
        bad.check()


@pytest.mark.parametrize("name", ["truncated_nii_gz", "truncated_mha", "hostile_pickled_checkpoint", "negative_epochs"])
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
