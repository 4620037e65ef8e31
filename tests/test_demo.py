"""The shipped real-data demo, end to end (train -> predict -> eval) through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_demo

from unetcli.workflows.demo import demo_data_dir


def test_demo_data_is_installed_with_its_notice() -> None:
    data = demo_data_dir()
    assert len(list((data / "train" / "images").glob("*.png"))) == 40
    assert len(list((data / "test" / "masks").glob("*.png"))) == 15
    assert "Fonov" in (data / "NOTICE.md").read_text()


@pytest.mark.slow
def test_short_demo_reaches_085_dice_on_held_out_slices(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # A narrower network than the demo's own (8-64 instead of 16-128: 4x less work) and 3 of its 8
    # epochs, so the check stays under a minute on CPUs without native bf16, where the demo runs in
    # fp32 (it reaches 0.936 there).
    proc = run_demo(out, "--epochs", "3", "--set", "model.features=[8,16,32,64]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "checkpoints/best.pt", "metrics.jsonl", "curves.png", "eval/metrics.csv", "eval/summary.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "predictions").glob("*.png"))) == 15
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["foreground_mean"]["dice"] >= 0.85, summary["foreground_mean"]
    assert "held-out mean foreground Dice" in proc.stdout


@pytest.mark.slow
def test_3d_demo_trains_at_4_mm_and_writes_masks_on_the_2_mm_scan_grid(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    out = tmp_path / "demo3d"
    # 15 of its 40 epochs (run_demo lifts the 150 s cap, so a busy machine gets the same 375 steps, only later).
    # At 10 epochs the held-out Dice of 8 lobes was still climbing steeply (0.20-0.49 over seeds and
    # thread counts, too close to the bar); at 15 it was 0.39-0.64. A narrower network than the demo's
    # (8-64 features instead of 16-128) halves the check's time (133 vs 273 s, AVX2 kernels, fp32, 1 thread,
    # loaded) and scores alike: 0.41-0.50 over seeds 0-2 there against 0.45 for the demo's own network,
    # 0.33 with bf16 on 2 threads.
    proc = run_demo(out, "--3d", "--epochs", "15", "--set", "model.features=[8,16,32,64]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target_spacing:\n  - 4.0" in (out / "config.yaml").read_text()
    scan = nib.load(demo_data_dir("3d") / "imagesTs" / "colin_rh_sup_0000.nii.gz")
    mask = nib.load(out / "predictions" / "colin_rh_sup.nii.gz")
    assert mask.shape == scan.shape[:3]
    np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0], losses
    assert json.loads((out / "eval" / "summary.json").read_text())["foreground_mean"]["dice"] > 0.2
