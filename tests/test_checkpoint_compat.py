"""Checkpoints written before per-axis kernel sizes and strides existed still load and predict the same masks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unetcli.inference.predict import predict

LEGACY = Path(__file__).parent / "data" / "checkpoints_0_x"


@pytest.mark.parametrize("run", ["run2d_same", "run2d_valid"])
def test_legacy_2d_checkpoint_predicts_the_same_masks(run: str, tmp_path: Path) -> None:
    predict(LEGACY / run / "best.pt", LEGACY / "inputs2d", tmp_path / "pred", device_name="cpu", precision_name="fp32")
    for expected in sorted((LEGACY / run / "expected").glob("*.png")):
        got = np.asarray(Image.open(tmp_path / "pred" / expected.name))
        assert np.array_equal(got, np.asarray(Image.open(expected))), expected.name


def test_legacy_3d_checkpoint_predicts_the_same_label_map(tmp_path: Path) -> None:
    predict(LEGACY / "run3d" / "best.pt", LEGACY / "inputs3d", tmp_path / "pred", device_name="cpu", precision_name="fp32")
    expected = nib.load(LEGACY / "run3d" / "expected" / "c0.nii.gz")
    got = nib.load(tmp_path / "pred" / "c0.nii.gz")
    assert np.allclose(got.affine, expected.affine)
    assert np.array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
    assert np.asarray(expected.dataobj).any(), "the fixture should hold some foreground"


def test_legacy_fixtures_hold_foreground() -> None:
    """An all-background expected mask would let a broken loader pass."""
    for run in ("run2d_same", "run2d_valid"):
        assert np.asarray(Image.open(LEGACY / run / "expected" / "case00.png")).any()
