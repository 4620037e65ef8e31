"""Anisotropic U-Nets on thick-slice volumes: per-axis kernels and strides through train -> predict."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers import invoke, save_nifti

from unetcli.checkpoint import load_checkpoint

SPACING = (4.0, 0.8, 0.8)  # thick first axis (4 mm), fine in-plane
SHAPE = (8, 32, 32)
KERNELS = "[[1,3,3],[1,3,3],[3,3,3],[3,3,3]]"
STRIDES = "[[1,1,1],[1,2,2],[2,2,2],[2,2,2]]"


def make_thick_dataset(root: Path, n: int = 4, seed: int = 0) -> Path:
    """nnU-Net raw layout: ellipsoids (class 1) that are round in millimetres, so 2-3 voxels
    across on the thick axis and 20-30 in-plane."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*SPACING, 1.0])
    mm = np.indices(SHAPE).astype(np.float32) * np.asarray(SPACING, np.float32)[:, None, None, None]
    for i in range(n):
        centre = np.asarray([rng.uniform(10, 22), rng.uniform(9, 16), rng.uniform(9, 16)], np.float32)
        radius = rng.uniform(6, 9)
        label = ((((mm - centre[:, None, None, None]) ** 2).sum(0)) <= radius**2).astype(np.uint8)
        image = (100 + rng.normal(0, 10, SHAPE) + 70 * label).astype(np.float32)
        save_nifti(image, affine, root / "imagesTr" / f"case{i}_0000.nii.gz")
        save_nifti(label, affine, root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "labels": {"background": 0, "lesion": 1},
                                                   "file_ending": ".nii.gz"}))
    return root


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_thick_slice_network_trains_and_predicts(padding: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    data = make_thick_dataset(tmp_path / "data")
    run = tmp_path / "run"
    result = invoke("train", data, "--out", run, "--epochs", "3", "--set", f"model.kernel_sizes={KERNELS}",
                    "--set", f"model.strides={STRIDES}", "--set", f"model.padding={padding}",
                    "--set", "model.features=[4,8,16,32]", "--set", "model.norm=instance",
                    "--set", "train.iterations_per_epoch=12", "--set", "train.warmup_iterations=3", "--batch-size", "2",
                    "--lr", "0.01", "--precision", "fp32", "--set", "train.num_workers=0", "--num-threads", "1")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["kernel_sizes"] == json.loads(KERNELS) and saved["strides"] == json.loads(STRIDES)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["model"]["strides"] == json.loads(STRIDES)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(r["val_dice_mean"] for r in history) > 0.5

    out = tmp_path / "pred"
    result = invoke("predict", run, data / "imagesTr", out)
    assert result.exit_code == 0, result.output
    for i in range(4):
        source = nib.load(data / "imagesTr" / f"case{i}_0000.nii.gz")
        pred = nib.load(out / f"case{i}.nii.gz")
        assert pred.shape == SHAPE and np.allclose(pred.affine, source.affine)
        truth = np.asarray(nib.load(data / "labelsTr" / f"case{i}.nii.gz").dataobj)
        assert (np.asarray(pred.dataobj)[truth == 1] == 1).mean() > 0.5  # most of each ellipsoid is found
