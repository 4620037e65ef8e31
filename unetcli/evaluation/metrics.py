"""Segmentation metrics for one case: overlap, volume and surface-distance scores.

Pure numpy / ``scipy.ndimage``; no torch. Every function takes arrays of identical
shape (2D ``(H, W)`` or 3D ``(D, H, W)``; the code itself works for any number of
axes). Binary-mask functions treat every non-zero element as foreground.
``spacing`` is the physical size of one voxel along each array axis, in the same
axis order as the array (for a NIfTI volume loaded as ``(X, Y, Z)`` that is the
``pixdim`` triple in that order), in millimetres; ``None`` means 1.0 on every axis,
i.e. distances and volumes in voxel units.

Conventions (these are the definitions the numbers in a paper rest on)
----------------------------------------------------------------------
Let P be the predicted mask, T the reference ("truth") mask, TP = |P ∩ T|,
FP = |P \\ T|, FN = |T \\ P|.

* Dice = 2 TP / (2 TP + FP + FN) = 2|P ∩ T| / (|P| + |T|).
* IoU (Jaccard) = TP / (TP + FP + FN).
* Precision = TP / (TP + FP); recall (sensitivity) = TP / (TP + FN).
* Volume difference = (|P| - |T|) * prod(spacing), in mm^3, *signed*: positive
  means over-segmentation. It is an absolute (not relative) difference; the
  relative difference is ``volume_difference / (|T| * prod(spacing))`` if needed.
* Surfaces follow MONAI (``monai.metrics.utils.get_mask_edges`` with
  ``use_subvoxels=False``): the surface of a mask is the set of its foreground
  voxels that are removed by one binary erosion with the face-connected
  structuring element (``scipy.ndimage.generate_binary_structure(ndim, 1)``) and
  ``border_value=0``, i.e. foreground voxels with at least one face neighbour in
  the background *or outside the image*. A mask touching the image border therefore
  has surface voxels on that border. Surface-to-surface distances are exact
  Euclidean distances between voxel centres in mm (``sampling=spacing``).
* Surface distances are measured in both directions: from every surface voxel of P
  to the nearest surface voxel of T, and from every surface voxel of T to the
  nearest surface voxel of P.
* HD (Hausdorff distance) = max(max d(P->T), max d(T->P)).
* HD95 = max(p95 d(P->T), p95 d(T->P)): the 95th percentile is taken *per
  direction* (numpy's default "linear" interpolation, the same as
  ``torch.quantile``), then the larger of the two is reported. This is MONAI's
  ``compute_hausdorff_distance(percentile=95)``; it is *not* the 95th percentile
  of the pooled distances.
* ASSD (average symmetric surface distance) = mean of the pooled distances of both
  directions = (sum d(P->T) + sum d(T->P)) / (|S_P| + |S_T|), where S_X is the
  surface of X. This is MONAI's ``compute_average_surface_distance(symmetric=True)``
  (it concatenates both directions); it is *not* the average of the two directed
  means (which e.g. ``medpy.metric.assd`` reports).
* NSD (normalized surface Dice, Nikolov et al. 2021, voxel-counting variant) =
  (#{d(P->T) <= tau} + #{d(T->P) <= tau}) / (|S_P| + |S_T|) with tolerance tau in
  mm; a distance exactly equal to tau counts as within tolerance. This is MONAI's
  ``compute_surface_dice(class_thresholds=[tau], use_subvoxels=False)``. Like
  MONAI, the comparison ``d <= tau`` is made in float32, so that a distance equal
  to tau up to float64 rounding counts as within tolerance.

Empty masks:

* Both masks empty: every metric is NaN (the class is absent from the case;
  callers exclude NaN from means). ``dice``/``iou``/``precision``/``recall`` take
  an ``empty_value`` argument to override this when called on their own.
* Exactly one mask empty: Dice = IoU = 0; precision is NaN when P is empty (no
  positive predictions) and 0 when T is empty; recall is NaN when T is empty and 0
  when P is empty; volume difference is defined as usual; HD, HD95 and ASSD are NaN
  (never inf); NSD = 0.

``case_metrics`` computes everything for several classes at once and computes the
two distance transforms of a class once, sharing them between HD, HD95, ASSD and
NSD. All distance transforms are computed on the bounding box of P ∪ T padded by
one voxel (clipped to the image; with ``border_value=0`` the clipped sides behave
exactly like the image border), which gives the same surfaces and distances as the
whole-volume computation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_NAMES",
    "assd",
    "case_metrics",
    "confusion_counts",
    "dice",
    "hausdorff",
    "iou",
    "normalized_surface_dice",
    "precision",
    "recall",
    "surface_distances",
    "volume_difference",
]

METRIC_NAMES: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "recall",
    "volume_difference",
    "hd",
    "hd95",
    "assd",
    "nsd",
)
"""Every metric name ``case_metrics`` understands, in its output order."""

_SURFACE_METRICS = frozenset({"hd", "hd95", "assd", "nsd"})
_NAN = float("nan")


# --------------------------------------------------------------------------- helpers


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """Return ``mask`` as a boolean array (non-zero is foreground)."""
    arr = np.asarray(mask)
    return arr if arr.dtype == bool else arr != 0


def _check_same_shape(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"prediction and reference must have the same shape, got {pred.shape} and {truth.shape}"
        )
    if pred.ndim == 0:
        raise ValueError("prediction and reference must have at least one axis, got scalars")


def _masks(pred_mask: np.ndarray, truth_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = _as_mask(pred_mask), _as_mask(truth_mask)
    _check_same_shape(pred, truth)
    return pred, truth


def _spacing(spacing: Sequence[float] | np.ndarray | None, ndim: int) -> np.ndarray:
    """Validate ``spacing`` and return it as a float64 array of length ``ndim``."""
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size != ndim:
        raise ValueError(f"spacing must have one value per image axis ({ndim}), got {list(sp)}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing values must be finite and > 0, got {list(sp)}")
    return sp


def _bbox_slices(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of the foreground of ``mask``, grown by ``pad`` and clipped to the image.

    Returns None when ``mask`` is empty.
    """
    slices = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        line = np.any(mask, axis=others) if others else mask
        idx = np.flatnonzero(line)
        if idx.size == 0:
            return None
        lo = max(int(idx[0]) - pad, 0)
        hi = min(int(idx[-1]) + 1 + pad, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Border voxels of a boolean mask: ``mask`` minus its face-connected erosion.

    Same as MONAI's ``binary_erosion(mask) ^ mask``; voxels outside the array count as
    background (``border_value=0``).
    """
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _distances_to(target: np.ndarray, query: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each ``query`` voxel to the nearest ``target`` voxel (C order).

    ``+inf`` for every query voxel when ``target`` is empty.
    """
    n_query = int(np.count_nonzero(query))
    if n_query == 0:
        return np.zeros(0, dtype=np.float64)
    if not target.any():
        return np.full(n_query, np.inf, dtype=np.float64)
    edt = ndimage.distance_transform_edt(~target, sampling=spacing)
    return np.asarray(edt[query], dtype=np.float64)


def _surface_distance_pair(
    pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(d(P->T), d(T->P)) for boolean masks of equal shape; see ``surface_distances``."""
    box = _bbox_slices(pred | truth, pad=1)
    if box is None:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty.copy()
    pred_c, truth_c = pred[box], truth[box]
    surf_pred, surf_truth = _surface(pred_c), _surface(truth_c)
    return (
        _distances_to(surf_truth, surf_pred, spacing),
        _distances_to(surf_pred, surf_truth, spacing),
    )


def _percentile(d: np.ndarray, percentile: float) -> float:
    return float(np.max(d)) if percentile == 100.0 else float(np.percentile(d, percentile))


def _hd_from(d_pt: np.ndarray, d_tp: np.ndarray, percentile: float) -> float:
    if d_pt.size == 0 or d_tp.size == 0:  # at least one mask empty
        return _NAN
    return max(_percentile(d_pt, percentile), _percentile(d_tp, percentile))


def _assd_from(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    if d_pt.size == 0 or d_tp.size == 0:
        return _NAN
    return float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))


def _nsd_from(d_pt: np.ndarray, d_tp: np.ndarray, tolerance_mm: float) -> float:
    total = d_pt.size + d_tp.size
    if total == 0:
        return _NAN
    tau = np.float32(tolerance_mm)
    within = np.count_nonzero(d_pt.astype(np.float32) <= tau) + np.count_nonzero(
        d_tp.astype(np.float32) <= tau
    )
    return float(within / total)


def _check_percentile(percentile: float) -> float:
    p = float(percentile)
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
    return p


def _check_tolerance(tolerance_mm: float) -> float:
    tol = float(tolerance_mm)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    return tol


def _ratio(num: int, den: int, empty_value: float) -> float:
    return float(empty_value) if den == 0 else num / den


# --------------------------------------------------------------------------- overlap


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """Voxel counts ``(tp, fp, fn)`` of two masks of identical shape.

    Args:
        pred: predicted mask, any shape; non-zero is foreground.
        truth: reference mask, same shape.

    Returns:
        ``tp = |P ∩ T|``, ``fp = |P \\ T|``, ``fn = |T \\ P|`` as Python ints.

    Raises:
        ValueError: if the shapes differ.
    """
    p, t = _masks(pred, truth)
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def dice(pred_mask: np.ndarray, truth_mask: np.ndarray, empty_value: float = _NAN) -> float:
    """Dice coefficient ``2|P ∩ T| / (|P| + |T|)`` of two masks of identical shape.

    Returns ``empty_value`` (default NaN) when both masks are empty and 0.0 when exactly
    one is empty.
    """
    tp, fp, fn = confusion_counts(pred_mask, truth_mask)
    return _ratio(2 * tp, 2 * tp + fp + fn, empty_value)


def iou(pred_mask: np.ndarray, truth_mask: np.ndarray, empty_value: float = _NAN) -> float:
    """Intersection over union (Jaccard) ``|P ∩ T| / |P ∪ T|`` of two masks of identical shape.

    Returns ``empty_value`` (default NaN) when both masks are empty and 0.0 when exactly
    one is empty.
    """
    tp, fp, fn = confusion_counts(pred_mask, truth_mask)
    return _ratio(tp, tp + fp + fn, empty_value)


def precision(pred_mask: np.ndarray, truth_mask: np.ndarray, empty_value: float = _NAN) -> float:
    """Precision (positive predictive value) ``|P ∩ T| / |P|``.

    Undefined, so ``empty_value`` (default NaN), when the prediction is empty (whatever
    the reference); 0.0 when the prediction is non-empty and the reference empty.
    """
    tp, fp, _ = confusion_counts(pred_mask, truth_mask)
    return _ratio(tp, tp + fp, empty_value)


def recall(pred_mask: np.ndarray, truth_mask: np.ndarray, empty_value: float = _NAN) -> float:
    """Recall (sensitivity) ``|P ∩ T| / |T|``.

    Undefined, so ``empty_value`` (default NaN), when the reference is empty (whatever
    the prediction); 0.0 when the reference is non-empty and the prediction empty.
    """
    tp, _, fn = confusion_counts(pred_mask, truth_mask)
    return _ratio(tp, tp + fn, empty_value)


def volume_difference(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> float:
    """Signed volume difference ``(|P| - |T|) * prod(spacing)`` in mm^3.

    Positive means the prediction is larger than the reference. NaN when both masks are
    empty (the class is absent), per the module conventions.

    Args:
        pred_mask: predicted mask, shape ``(H, W)`` or ``(D, H, W)``; non-zero is foreground.
        truth_mask: reference mask, same shape.
        spacing: voxel size in mm per axis (array axis order); None means 1.0 (voxel counts).
    """
    pred, truth = _masks(pred_mask, truth_mask)
    sp = _spacing(spacing, pred.ndim)
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if n_pred == 0 and n_truth == 0:
        return _NAN
    return float((n_pred - n_truth) * float(np.prod(sp)))


# --------------------------------------------------------------------------- surfaces


def surface_distances(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Surface-to-surface distances in mm, in both directions.

    Args:
        pred_mask: predicted mask, shape ``(H, W)`` or ``(D, H, W)``; non-zero is foreground.
        truth_mask: reference mask, same shape.
        spacing: voxel size in mm per axis (array axis order); None means 1.0.

    Returns:
        ``(d_pred_to_truth, d_truth_to_pred)``: 1-D float64 arrays. The first has one entry
        per surface voxel of the prediction (in C order of the voxel positions), the
        distance to the nearest surface voxel of the reference; the second the reverse.
        A surface voxel with no opposite surface (the other mask is empty) gets ``+inf``;
        an empty mask contributes an empty array.

    Raises:
        ValueError: on a shape mismatch or a bad ``spacing``.
    """
    pred, truth = _masks(pred_mask, truth_mask)
    return _surface_distance_pair(pred, truth, _spacing(spacing, pred.ndim))


def hausdorff(
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    percentile: float = 100.0,
) -> float:
    """Symmetric (percentile) Hausdorff distance in mm.

    ``max(q(d(P->T)), q(d(T->P)))`` with ``q`` the ``percentile``-th percentile (numpy
    "linear" interpolation) of each direction's surface distances; ``percentile=100``
    is the classical Hausdorff distance, ``95`` is HD95. NaN if either mask is empty.
    """
    p = _check_percentile(percentile)
    d_pt, d_tp = surface_distances(pred_mask, truth_mask, spacing)
    return _hd_from(d_pt, d_tp, p)


def assd(
    pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> float:
    """Average symmetric surface distance in mm.

    Mean of the distances of both directions pooled together,
    ``(sum d(P->T) + sum d(T->P)) / (|S_P| + |S_T|)``. NaN if either mask is empty.
    """
    d_pt, d_tp = surface_distances(pred_mask, truth_mask, spacing)
    return _assd_from(d_pt, d_tp)


def normalized_surface_dice(
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 1.0,
) -> float:
    """Normalized surface Dice at tolerance ``tolerance_mm`` (in mm), in [0, 1].

    Fraction of the surface voxels of both masks that lie within ``tolerance_mm`` (``<=``)
    of the other mask's surface. NaN when both masks are empty, 0.0 when exactly one is.
    """
    tol = _check_tolerance(tolerance_mm)
    d_pt, d_tp = surface_distances(pred_mask, truth_mask, spacing)
    return _nsd_from(d_pt, d_tp, tol)


# --------------------------------------------------------------------------- per case


def _normalise_labels(
    labels: Sequence[int] | Mapping[str, Sequence[int]],
) -> dict[str, list[int]]:
    def as_int(value: object) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"labels must be integers, got {value!r}")
        return int(value)

    if isinstance(labels, Mapping):
        out: dict[str, list[int]] = {}
        for name, group in labels.items():
            if isinstance(group, (int, np.integer)) and not isinstance(group, (bool, np.bool_)):
                group = [group]
            if isinstance(group, (str, bytes)) or not isinstance(group, (Sequence, np.ndarray)):
                raise ValueError(f"region {name!r} must map to a list of integer labels, got {group!r}")
            ints = [as_int(v) for v in group]
            if not ints:
                raise ValueError(f"region {name!r} has no labels")
            out[str(name)] = ints
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray)):
        raise ValueError(f"labels must be a list of integers or a mapping name -> labels, got {labels!r}")
    else:
        out = {str(as_int(v)): [as_int(v)] for v in labels}
    if not out:
        raise ValueError("no labels to evaluate")
    return out


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[int] | Mapping[str, Sequence[int]],
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 1.0,
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, dict[str, float]]:
    """All requested metrics for every class (or region) of one case.

    Args:
        pred: predicted integer label map, shape ``(H, W)`` or ``(D, H, W)``.
        truth: reference label map, same shape.
        labels: either a sequence of label values, each evaluated as ``arr == label``
            under the key ``str(label)``; or a mapping ``name -> label values`` for
            region-based evaluation, where the mask is ``np.isin(arr, values)`` (e.g.
            ``{"whole_tumour": [1, 2, 3], "tumour_core": [1, 3]}``).
        spacing: voxel size in mm per array axis; None means 1.0 on every axis.
        tolerance_mm: NSD tolerance in mm.
        metrics: names from ``METRIC_NAMES`` to compute.

    Returns:
        ``{class_key: {metric_name: value}}`` with Python floats (NaN per the module
        conventions), classes in the order given, metrics in the order requested.
        The surface distances of a class are computed once (two distance transforms on
        the padded bounding box of the union) and shared by hd, hd95, assd and nsd.

    Raises:
        ValueError: on a shape mismatch, a bad spacing, tolerance, label or metric name.
    """
    pred_arr, truth_arr = np.asarray(pred), np.asarray(truth)
    _check_same_shape(pred_arr, truth_arr)
    sp = _spacing(spacing, pred_arr.ndim)
    names = [str(m) for m in metrics]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    tol = _check_tolerance(tolerance_mm) if "nsd" in names else float(tolerance_mm)
    groups = _normalise_labels(labels)
    voxel_volume = float(np.prod(sp))
    need_surface = any(m in _SURFACE_METRICS for m in names)

    results: dict[str, dict[str, float]] = {}
    for key, values in groups.items():
        if len(values) == 1:
            p, t = pred_arr == values[0], truth_arr == values[0]
        else:
            p, t = np.isin(pred_arr, values), np.isin(truth_arr, values)
        results[key] = _mask_metrics(p, t, names, sp, tol, voxel_volume, need_surface)
    return results


def _mask_metrics(p: np.ndarray, t: np.ndarray, names: list[str], sp: np.ndarray, tol: float,
                  voxel_volume: float, need_surface: bool) -> dict[str, float]:
    """The metrics ``names`` of one class's prediction mask ``p`` against its reference ``t``."""
    tp = int(np.count_nonzero(p & t))
    n_pred, n_truth = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    fp, fn = n_pred - tp, n_truth - tp
    if n_pred == 0 and n_truth == 0:
        return {m: _NAN for m in names}
    d_pt = d_tp = np.zeros(0)
    if need_surface:
        d_pt, d_tp = _surface_distance_pair(p, t, sp)
    row: dict[str, float] = {}
    for m in names:
        if m == "dice":
            row[m] = _ratio(2 * tp, 2 * tp + fp + fn, _NAN)
        elif m == "iou":
            row[m] = _ratio(tp, tp + fp + fn, _NAN)
        elif m == "precision":
            row[m] = _ratio(tp, tp + fp, _NAN)
        elif m == "recall":
            row[m] = _ratio(tp, tp + fn, _NAN)
        elif m == "volume_difference":
            row[m] = float((n_pred - n_truth) * voxel_volume)
        elif m == "hd":
            row[m] = _hd_from(d_pt, d_tp, 100.0)
        elif m == "hd95":
            row[m] = _hd_from(d_pt, d_tp, 95.0)
        elif m == "assd":
            row[m] = _assd_from(d_pt, d_tp)
        else:  # "nsd"
            row[m] = _nsd_from(d_pt, d_tp, tol)
    return row
