"""The benchmark scripts' own pieces that decide what a table shows: the background-only test
sets, the mean they are kept out of, and the guard that lets a stopped arm continue only as itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    """A module from scripts/ (which imports ``benchlib`` from there, as when the script runs)."""
    added = str(SCRIPTS) not in sys.path
    if added:
        sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name.replace("/", "_"), SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(str(SCRIPTS))
    return module


def test_background_noise_changes_only_what_lies_outside_the_brain():
    prepare = load("prepare_robustness_data")
    image = np.zeros((20, 20, 20), np.float32)
    image[5:15, 5:15, 5:15] = np.linspace(50, 100, 1000, dtype=np.float32).reshape(10, 10, 10)
    out = prepare.perturb(image, np.eye(4), prepare.INTENSITY_SETS["background_noise"], seed=3)
    brain = image > 0
    np.testing.assert_array_equal(out[brain], image[brain])
    sigma = 0.03 * np.percentile(image[brain], 99)
    assert (out[~brain] > 0).all()
    assert out[~brain].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)  # Rayleigh mean


def test_the_other_scanner_mean_leaves_out_clean_and_the_background_sets():
    scoring = load("benchlib/scoring")
    per_set = {"clean": {"mean": 0.9}, "bias_mild": {"mean": 0.8}, "regrid": {"mean": 0.6},
               "background_noise": {"mean": 0.1}, "colin27_unstripped": {"mean": 0.2}}
    assert scoring.perturbed_mean(per_set) == pytest.approx(0.7)


def test_a_reused_run_folder_must_be_the_same_arm(tmp_path, capsys):
    runs = load("benchlib/runs")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 40, "seed": 1}}))
    runs.check_same_arm(tmp_path, 40, 1)
    with pytest.raises(SystemExit) as stopped:
        runs.check_same_arm(tmp_path, 40, 0)
    assert f"{tmp_path} was trained for 40 epochs with seed 1, not 40 with seed 0" in str(stopped.value)
    assert "drop --reuse" in str(stopped.value)
