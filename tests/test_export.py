"""`unet export` (ONNX, TorchScript) and `unet predict FILE`: the exported file predicts what the
run folder predicts, carries its preprocessing, and other tools' files are refused clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from helpers import error_lines, invoke_quiet, make_blobs, make_nnunet
from PIL import Image

from unetcli.inference.exported import METADATA_KEY, TORCHSCRIPT_EXTRA
from unetcli.inference.predict import load_model, predict_png, predict_volume, window_settings

TINY = ["--epochs", "1", "--set", "train.iterations_per_epoch=2", "--set", "train.warmup_iterations=1", "--precision", "fp32",
        "--set", "train.num_workers=0"]
RUNS = {
    "2d": ["--set", "model.features=[4,8,16]"],
    "2d-valid": ["--set", "model.features=[4,8,16]", "--set", "model.padding=valid"],
    "3d": ["--set", "model.features=[4,8,16]", "--batch-size", "2"],
}
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per kind of run: its data's inputs, the run folder, its predictions and both exported files."""
    root = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(root / "cache"))
    found = {}
    for kind, args in RUNS.items():
        if kind == "3d":  # the first case is stored in LPS: the geometry handling is part of what must agree
            data = make_nnunet(root / kind / "data", n=3, flip_first=True)
            inputs = data / "imagesTr"
        else:
            data = make_blobs(root / kind / "data", n=4)
            inputs = data / "images"
        run = root / kind / "run"
        result = invoke_quiet("train", data, "--out", run, *TINY, *args)
        assert result.exit_code == 0, result.output
        result = invoke_quiet("predict", run, inputs, root / kind / "predicted", "--precision", "fp32")
        assert result.exit_code == 0, result.output
        found[kind] = {"inputs": inputs, "run": run, "predicted": root / kind / "predicted"}
        for fmt, name in FORMATS.items():
            result = invoke_quiet("export", run, "--format", fmt, "--out", root / kind / name)
            assert result.exit_code == 0, result.output
            found[kind][fmt] = root / kind / name
    mp.undo()
    return found


def _fp32_probabilities(source: Path, paths: list[Path], tmp: Path) -> np.ndarray:
    """Class probabilities in float32, as `unet predict` computes them (the .npz stores float16)."""
    loaded = load_model(source, torch.device("cpu"))
    window = window_settings(loaded, torch.device("cpu"), "fp32", None)
    if loaded.metadata["file_format"] == "nifti":
        return predict_volume(loaded, paths, tmp / "p.nii.gz", window, keep_probabilities=True)
    return predict_png(loaded, paths, tmp / "p.png", window, keep_probabilities=True)


def _read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj) if path.name.endswith(".nii.gz") else np.asarray(Image.open(path))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", RUNS)
def test_exported_model_predicts_what_the_run_predicts(exported, kind: str, fmt: str, tmp_path: Path) -> None:
    case = exported[kind]
    outputs = {"run": case["predicted"], fmt: tmp_path / fmt}
    result = invoke_quiet("predict", case[fmt], case["inputs"], outputs[fmt], "--precision", "fp32")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in outputs["run"].iterdir() if p.suffix != ".csv")  # masks, not predictions.csv
    assert names and names == sorted(p.name for p in outputs[fmt].iterdir() if p.suffix != ".csv")
    same = [np.mean(_read(outputs["run"] / n) == _read(outputs[fmt] / n)) for n in names]
    assert min(same) >= 0.999, same
    if kind == "3d":
        for name in names:
            ours, theirs = nib.load(str(outputs["run"] / name)), nib.load(str(outputs[fmt] / name))
            assert theirs.shape == ours.shape and np.array_equal(theirs.affine, ours.affine)
            assert theirs.header.get_data_dtype() == ours.header.get_data_dtype()
            assert theirs.header.get_qform(coded=True)[1] == ours.header.get_qform(coded=True)[1] == 1
    first = sorted(case["inputs"].iterdir())[0]
    difference = np.abs(_fp32_probabilities(case["run"], [first], tmp_path) - _fp32_probabilities(case[fmt], [first], tmp_path))
    assert difference.max() < 1e-4


def test_torchscript_file_loads_with_plain_torch(exported) -> None:
    path = exported["3d"]["torchscript"]
    script = (
        "import json, sys, torch\n"
        f"extra = {{{TORCHSCRIPT_EXTRA!r}: ''}}\n"
        f"net = torch.jit.load({str(path)!r}, _extra_files=extra)\n"
        f"doc = json.loads(extra[{TORCHSCRIPT_EXTRA!r}])\n"
        "meta = doc['metadata']\n"
        "x = torch.zeros(3, meta['in_channels'], *meta['patch_size'])\n"
        "print(json.dumps({'shape': list(net(x).shape), 'doc': doc, 'imported': any(m.startswith('unetcli') for m in sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=path.parent)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["imported"] is False
    meta, doc = reply["doc"]["metadata"], reply["doc"]
    assert reply["shape"] == [3, meta["num_classes"], *meta["patch_size"]]
    assert meta["label_values"] == [0, 1, 2] and meta["label_names"] == ["background", "sphere", "box"]
    assert meta["channel_names"] == ["T1"] and meta["file_format"] == "nifti"
    assert meta["preprocessing"]["target_spacing"] and doc["network"]["margin"] == [0, 0, 0]
    assert doc["config"]["infer"]["overlap"] == 0.5 and doc["unetcli_version"]


def test_onnx_file_has_metadata_and_dynamic_axes(exported) -> None:
    for kind, dynamic in (("2d", True), ("2d-valid", False)):
        proto = onnx.load(str(exported[kind]["onnx"]))
        doc = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
        assert doc["metadata"]["normalization"] == "zscore" and doc["model_format"] == "onnx"
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param  # any batch size
        assert all(bool(d.dim_param) == dynamic for d in dims[2:])
        assert (doc["network"]["margin"] != [0, 0]) == (not dynamic)


def test_onnx_model_refuses_other_precisions(exported, tmp_path: Path) -> None:
    case = exported["2d"]
    result = invoke_quiet("predict", case["onnx"], case["inputs"], tmp_path / "out", "--precision", "bf16")
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: {case['onnx']}: this exported model runs in fp32 only, not bf16"]


def test_export_refuses_to_replace_files_and_mismatched_suffixes(exported, tmp_path: Path) -> None:
    run = exported["2d"]["run"]
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    result = invoke_quiet("export", run, "--out", existing)
    assert result.exit_code == 2 and "already exists" in error_lines(result.output)[0]
    assert existing.read_bytes() == b"keep me"
    result = invoke_quiet("export", run, "--format", "onnx", "--out", tmp_path / "model.pt")
    assert result.exit_code == 2 and "must end in .onnx" in error_lines(result.output)[0]
    assert not (tmp_path / "model.pt").exists()


class Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)


def test_onnx_file_from_another_tool_is_refused(exported, tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    torch.onnx.export(Plain(), (torch.zeros(1, 1, 32, 32),), str(path), dynamo=False)
    result = invoke_quiet("predict", path, exported["2d"]["inputs"], tmp_path / "out")
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: has no unetcli metadata (ONNX metadata_props key 'unetcli')")
    assert "unet export RUN" in result.output and not (tmp_path / "out").exists()


def test_torchscript_file_from_another_tool_is_refused(exported, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(Plain()), str(path))
    result = invoke_quiet("predict", path, exported["2d"]["inputs"], tmp_path / "out")
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: has no unetcli metadata (TorchScript extra file unetcli.json)")


@pytest.mark.parametrize(("out", "fmt"), [(None, "onnx"), ("m.onnx", "onnx"), ("m.pt", "torchscript"), ("m.pth", "torchscript"),
                                          ("m.ts", "torchscript")])
def test_format_follows_the_suffix_and_another_suffix_is_refused(out: str | None, fmt: str) -> None:
    from unetcli.errors import ConfigError
    from unetcli.inference.export import resolve_format

    assert resolve_format(None, Path(out) if out else None) == fmt
    with pytest.raises(ConfigError, match="names no export format"):
        resolve_format(None, Path("m.bin"))
    assert resolve_format("torchscript", Path("m.bin")) == "torchscript"
