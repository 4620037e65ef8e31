"""Dice on folders of predictions, with the package's own metric (``unetcli.evaluation.metrics``)
so that every script counts empty classes the same way, and says which way it counts them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from unetcli.evaluation.metrics import dice

ROBUST_IMAGES, ROBUST_LABELS = "imagesTs_robust", "labelsTs_robust"
"""Folders of the other-scanner test sets that ``prepare_robustness_data.py`` writes."""


def dice_per_case(pred_dir: Path, data: Path) -> dict[str, dict[str, dict[str, float]]]:
    """For each set of ``DATA/robustness_sets.json``, each case's Dice per class. Voxels of the
    set's ``ignore`` value are not scored; a class absent from both masks of a case scores 1.0
    (both agree it is absent), so every case counts in every class's mean."""
    sets = json.loads((data / "robustness_sets.json").read_text())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, entry in sets.items():
        out[name] = {}
        for case in entry["cases"]:
            ref = np.asarray(nib.load(str(data / ROBUST_LABELS / f"{case}.nii.gz")).dataobj)
            pred_path = pred_dir / f"{case}.nii.gz"
            if not pred_path.is_file():
                sys.exit(f"missing prediction {pred_path}")
            pred = np.asarray(nib.load(str(pred_path)).dataobj)
            if pred.shape != ref.shape:
                sys.exit(f"{pred_path}: shape {pred.shape} differs from the reference's {ref.shape}")
            scored = ref != entry["ignore"] if entry["ignore"] is not None else np.ones(ref.shape, bool)
            out[name][case] = {cname: dice((pred == value) & scored, (ref == value) & scored, empty_value=1.0)
                               for cname, value in entry["classes"].items()}
    return out


def dice_per_set(pred_dir: Path, data: Path) -> dict[str, dict[str, float]]:
    """For each set of ``DATA/robustness_sets.json``: mean Dice over its classes per case, then over
    cases (cases scored as :func:`dice_per_case` scores them)."""
    out: dict[str, dict[str, float]] = {}
    for name, cases in dice_per_case(pred_dir, data).items():
        classes = list(next(iter(cases.values())))
        result = {c: float(np.mean([scores[c] for scores in cases.values()])) for c in classes}
        result["mean"] = float(np.mean(list(result.values())))
        out[name] = result
    return out


BACKGROUND_SETS = ("background_noise", "colin27_unstripped")
"""Sets that change only what lies outside the brain (noise in place of exact zeros; the skull left
on): they test the normalisation's foreground mask, and are reported next to their stripped twin
(``clean``, ``colin27``) rather than in the other-scanner mean, which keeps its 12 sets."""


def perturbed_mean(per_set: dict[str, dict[str, float]]) -> float:
    """Mean Dice over the other-scanner sets: all but ``clean`` and the :data:`BACKGROUND_SETS`."""
    return float(np.mean([d["mean"] for name, d in per_set.items() if name not in ("clean", *BACKGROUND_SETS)]))
