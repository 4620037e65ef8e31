"""Which files are scored against which: prediction/reference pairing and reading both label maps.

PRED and TRUTH are folders (or single files) of PNG masks or of 3D label maps (NIfTI, MetaImage,
NRRD, TIFF: :mod:`unetcli.data.image_io`; a prediction and its reference may be in different 3D
formats); files are paired by stem (``volume_stem`` for volumes), and every unmatched file is
listed in one error. A TRUTH folder in nnU-Net layout (``labelsTr``,
``labelsTs``) is just a folder of label files. 3D pairs must have the same shape and affine
(``np.allclose``, atol 1e-4); the voxel spacing is taken from the reference's affine (column
norms, i.e. the voxel size along each array axis, in the array's own ``(X, Y, Z)`` order).
PNG masks have no spacing: the given one or None (pixel units). Binary 0/255 PNG masks are
read as 0/1, as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetcli.data.image_io import is_volume, volume_geometry, volume_stem
from unetcli.data.nifti import AFFINE_ATOL, affine_difference, read_label, voxel_sizes
from unetcli.data.png import PNG_SUFFIX, read_png_mask
from unetcli.errors import DataError


@dataclass(frozen=True)
class CasePair:
    name: str
    pred: Path
    truth: Path


def read_label_map(path: Path) -> np.ndarray:
    """A PNG mask as class indices; binary 0/255 masks become 0/1 (as in training)."""
    labels = read_png_mask(path)
    values = np.unique(labels)
    if 255 in values and set(values.tolist()) <= {0, 255}:
        labels = (labels == 255).astype(np.int64)
    return labels


def _stem(path: Path) -> str:
    return volume_stem(path) if is_volume(path) else path.stem


def _suffix(path: Path) -> str:
    return path.name[len(_stem(path)):]


def _files(path: Path) -> tuple[str, dict[str, Path]]:
    """``(kind, {stem: file})`` for a file or a folder of PNG masks or 3D label maps."""
    if path.is_file():
        if is_volume(path):
            return "nifti", {volume_stem(path): path}
        if path.suffix.lower() == PNG_SUFFIX:
            return "png", {path.stem: path}
        raise DataError(f"{path}: not a .png, .nii, .nii.gz, .mha, .mhd, .nrrd or .tif file")
    if not path.is_dir():
        raise DataError(f"{path}: not found", hint="pass a folder (or file) of PNG masks or 3D label maps")
    visible = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    volumes: dict[str, Path] = {}
    for p in (p for p in visible if is_volume(p)):
        if volume_stem(p) in volumes:
            raise DataError(f"{p}: another file, {volumes[volume_stem(p)].name}, has the same case name '{volume_stem(p)}'",
                            hint="keep one file per case name")
        volumes[volume_stem(p)] = p
    pngs = {p.stem: p for p in visible if p.suffix.lower() == PNG_SUFFIX}
    if volumes and pngs:
        raise DataError(f"{path}: holds both .png masks and 3D label maps", hint="keep one format per folder")
    if not volumes and not pngs:
        raise DataError(f"{path}: no .png masks or 3D label maps (.nii.gz, .nii, .mha, .mhd, .nrrd, .tif) found")
    return ("nifti", volumes) if volumes else ("png", pngs)


def find_cases(pred: Path, truth: Path) -> tuple[str, list[CasePair]]:
    """``(kind, pairs)``: prediction and reference files paired by stem, sorted by case name.

    A single file on one side is paired with the file of the same stem on the other; two files
    are paired whatever their names. Raises one ``DataError`` listing every unmatched file.
    """
    pred_kind, preds = _files(pred)
    truth_kind, truths = _files(truth)
    if pred_kind != truth_kind:
        raise DataError(f"{pred}: predictions are {pred_kind.upper()} but references {truth} are {truth_kind.upper()}",
                        hint="evaluate PNG masks against PNG masks and 3D label maps against 3D label maps")
    if pred.is_file() and truth.is_file():
        return truth_kind, [CasePair(next(iter(truths)), pred, truth)]
    if pred.is_file():
        truths = {s: truths[s] for s in preds if s in truths} or truths
    elif truth.is_file():
        preds = {s: preds[s] for s in truths if s in preds} or preds
    problems = [f"{preds[s]}: no reference named {s}{_suffix(preds[s])} in {truth}" for s in sorted(set(preds) - set(truths))]
    problems += [f"{truths[s]}: no prediction named {s}{_suffix(truths[s])} in {pred}" for s in sorted(set(truths) - set(preds))]
    if problems:
        raise DataError.from_problems(problems, hint="predictions and references are paired by file name")
    return truth_kind, [CasePair(s, preds[s], truths[s]) for s in sorted(truths)]


def unique_run_names(preds: Sequence[Path]) -> list[str]:
    """Run names: each prediction folder's name; equal names get their parent folder's name
    prepended (``runA/preds`` -> ``runA_preds``), then a counter if still equal."""
    base = [p.resolve().name if p.resolve().is_dir() else _stem(p.resolve()) for p in preds]
    names = []
    for path, name in zip(preds, base):
        if base.count(name) > 1 and path.resolve().parent.name:
            name = f"{path.resolve().parent.name}_{name}"
        candidate, k = name, 2
        while candidate in names:
            candidate, k = f"{name}_{k}", k + 1
        names.append(candidate)
    return names


def read_pair(pair: CasePair, kind: str, spacing: Sequence[float] | None = None
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
    """``(prediction, reference, spacing)``: two integer label maps of the same shape.

    3D: shape and affine must agree (DataError naming both files); the spacing is the
    reference's voxel size per array axis unless ``spacing`` is given. PNG: ``spacing`` or None.
    """
    if kind == "nifti":
        truth = read_label(pair.truth)
        pred = read_label(pair.pred)
        if pred.shape != truth.shape:
            raise DataError(f"{pair.pred}: shape {pred.shape} differs from reference {pair.truth}'s {truth.shape}",
                            hint="predictions must be on the reference's voxel grid")
        a_pred, a_truth = volume_geometry(pair.pred)[1], volume_geometry(pair.truth)[1]
        if not np.allclose(a_pred, a_truth, atol=AFFINE_ATOL):
            raise DataError(f"{pair.pred}: affine differs from reference {pair.truth}'s ({affine_difference(a_pred, a_truth)})",
                            hint="predictions must be on the reference's voxel grid (same origin, spacing, orientation)")
        used = tuple(float(s) for s in spacing) if spacing else voxel_sizes(a_truth)
        return pred, truth, used
    pred, truth = read_label_map(pair.pred), read_label_map(pair.truth)
    if pred.shape != truth.shape:
        raise DataError(f"{pair.pred}: size {pred.shape[::-1]} differs from reference {pair.truth}'s "
                        f"{truth.shape[::-1]} (W x H)", hint="predict at the reference's size")
    return pred, truth, (tuple(float(s) for s in spacing) if spacing else None)
