"""The shipped 3D demo end to end (train at 4 mm -> predict on the 2 mm grid -> eval) through the real
entry point. A module of its own so that the test workers run it beside the 2D demo, not after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_demo

from unetcli.workflows.demo import demo_data_dir


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
