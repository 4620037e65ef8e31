"""``predictions.csv``: one row per predicted case with its volumes, its quality estimate and the
signals behind it, and which cases to check (``unet predict --qc on``, the default).

:class:`CaseQuality` is handed to the prediction of one case, sees the network's input and output
as they go by (:meth:`CaseQuality.observe_network`, :meth:`CaseQuality.observe_output`) and gives
its row (:meth:`CaseQuality.row`). A case is **flagged** when its predicted Dice is below the
model's threshold or when any out-of-distribution signal is outside the training range
(:mod:`unetcli.inference.quality`).

The file is rewritten atomically after every few cases, so an interrupted prediction leaves the
rows of the cases it wrote. Rows of other cases already in the file are kept (predicting more
cases into a folder adds to it; predicting a case again replaces its row), as long as their
mask is still there. ``--part I/N`` writes ``predictions.partIofN.csv`` instead, so that parts
running side by side never write one file; ``unet eval`` reads them all.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetcli.atomic import atomic_write_text
from unetcli.data.nifti import is_nifti, nifti_stem
from unetcli.data.scan_geometry import ScanGeometry
from unetcli.errors import OutputError
from unetcli.inference.confidence import ConfidenceSums
from unetcli.inference.quality import RULES, SignalCheck, compare_with_training, ood_distance, ood_excess
from unetcli.inference.quality_context import QualityContext
from unetcli.inference.quality_signals import CaseMeasures, measure_case

CSV_NAME = "predictions.csv"
PART_PATTERN = re.compile(r"^predictions\.part(\d+)of(\d+)\.csv$")
SIGNAL_COLUMNS = ["softmax_dice", "margin", "entropy", "mirror_disagreement", "fragments", "ood_distance",
                  *[f"ood_{name}" for name in RULES]]
"""Numeric signal columns, in file order; ``unet eval`` correlates each with the real Dice."""
LEADING_COLUMNS = ["case", "file", "shape", "spacing_mm", "seconds", "predicted_dice", "flagged", "reasons", "estimate"]


def csv_name(part: tuple[int, int] | None) -> str:
    return CSV_NAME if part is None else f"predictions.part{part[0]}of{part[1]}.csv"


class CaseQuality:
    """The quality signals of one case, collected while it is predicted."""

    def __init__(self, context: QualityContext) -> None:
        self.context = context
        self.confidence = ConfidenceSums(context.num_outputs, context.regions)
        self.measures: CaseMeasures | None = None
        self.volumes: list[float] | None = None
        self.shape: tuple[int, ...] = ()
        self.spacing: tuple[float, ...] | None = None

    def network_labels(self, prediction: np.ndarray | torch.Tensor) -> np.ndarray:
        """The painted label map of a network-grid prediction: labels as they are, or the labels of
        probabilities (K, *S)."""
        array = prediction.numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
        if array.ndim == self.context.spatial_dims:
            return array
        if not self.context.regions:
            return array.argmax(0)
        painted = np.zeros(array.shape[1:], np.uint8)
        for k, p in enumerate(array):
            painted[p > 0.5] = k + 1
        return painted

    def observe_network(self, image: np.ndarray, prediction: np.ndarray | torch.Tensor, geometry: ScanGeometry) -> None:
        """The network's normalised input and its prediction (labels or probabilities) on its grid."""
        labels = self.network_labels(prediction)
        self.measures = measure_case(geometry, image, labels, len(self.context.structures), self.context.grid_voxel_volume)

    def observe_output(self, labels: np.ndarray, spacing: Sequence[float] | None = None) -> None:
        """The label map written (class indices or painted regions) and its voxel size in mm (None
        for a PNG image: volumes in pixels)."""
        voxel = float(np.prod(spacing)) / 1000 if spacing is not None else 1.0
        counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=len(self.context.structures) + 1)
        self.volumes = [float(counts[k]) * voxel for k in range(1, len(self.context.structures) + 1)]
        self.shape, self.spacing = tuple(np.shape(labels)), None if spacing is None else tuple(float(s) for s in spacing)

    def checks(self) -> list[SignalCheck]:
        if self.measures is None or self.context.reference is None:
            return []
        return compare_with_training(self.measures, self.context.reference, self.context.channels, self.context.structures)

    def row(self, name: str, files: Sequence[Path], seconds: float) -> dict[str, Any]:
        """The case's ``predictions.csv`` row (numbers as numbers, NaN for what is not known)."""
        checks = self.checks()
        signals = self.confidence.summary()
        model = self.context.model
        predicted = model.predict(signals["softmax_dice"], ood_excess(checks))
        reasons = [c.message for c in checks if c.outside]
        if math.isfinite(predicted) and predicted < model.threshold:
            reasons.insert(0, f"predicted Dice {predicted:.2f} below {model.threshold:.2f}")
        row: dict[str, Any] = {
            "case": name, "file": str(files[0]), "shape": "x".join(str(int(n)) for n in self.shape),
            "spacing_mm": "x".join(f"{s:.4g}" for s in self.spacing) if self.spacing else "", "seconds": round(seconds, 3),
            "predicted_dice": predicted, "flagged": bool(reasons), "reasons": "; ".join(reasons),
            "estimate": self._estimate_kind(), **signals,
            "fragments": max(self.measures.pieces, default=0) if self.measures else math.nan,
            "ood_distance": ood_distance(checks),
        }
        row.update({f"ood_{name}": math.nan for name in RULES})
        row.update({f"ood_{c.name}": c.distance for c in checks})
        row["axis_codes"] = self.measures.geometry.axis_codes if self.measures else ""
        for structure, volume in zip(self.context.structures, self.volumes or []):
            row[f"volume_{structure}_{self.context.unit}"] = volume
        return row

    def _estimate_kind(self) -> str:
        kind = "fitted on out-of-fold cases" if self.context.model.fitted else "unfitted"
        return kind if self.context.reference is not None else f"{kind}; no training reference (uncertainty only)"


# --------------------------------------------------------------------------- the file


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def rows_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV: the fixed columns first, then each structure's volume as first met."""
    columns = [*LEADING_COLUMNS, *SIGNAL_COLUMNS, "axis_codes"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``predictions.csv`` (cells as text); no file, no rows."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OutputError(f"{path}: cannot read the quality report ({exc})",
                          hint="remove or rename it; it is written again by `unet predict`") from exc


WRITE_EVERY_S = 2.0
"""The file is rewritten after a case at most this often (and at the end): cheap for many small cases."""


class QualityReport:
    """The rows of one ``unet predict`` call, merged with the file's earlier rows and written."""

    def __init__(self, path: Path, context: QualityContext, keep_earlier: Callable[[str], bool]) -> None:
        self.path, self.context = path, context
        self.earlier = [r for r in read_rows(path) if r.get("case") and keep_earlier(r["case"])]
        self.rows: list[dict[str, Any]] = []
        self.last_write = time.monotonic()

    def case(self) -> CaseQuality:
        """A collector for the next case."""
        return CaseQuality(self.context)

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["case"] != row["case"]] + [row]
        if time.monotonic() - self.last_write >= WRITE_EVERY_S:
            self.write()

    def write(self) -> None:
        names = {r["case"] for r in self.rows}
        merged = [r for r in self.earlier if r["case"] not in names] + self.rows
        atomic_write_text(self.path, rows_csv_text(sorted(merged, key=lambda r: str(r["case"]))))
        self.last_write = time.monotonic()

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """This call's flagged rows."""
        return [r for r in self.rows if r["flagged"]]


@dataclass
class Review:
    """What ``unet predict`` tells about the quality of the cases it just wrote."""

    path: Path
    cases: int
    flagged: list[str]
    lines: list[str]
    """One line per flagged case and reason: ``CASE: reason``."""
    no_reference: bool


def review(path: Path, written: Sequence[Path]) -> Review:
    """The rows of ``written`` (mask files of this call) in the report ``path``: the flagged cases
    and their reasons, worst predicted Dice first."""
    names = {nifti_stem(p) if is_nifti(p) else p.stem for p in written}
    rows = [r for r in read_rows(path) if r.get("case") in names]

    def predicted(row: dict[str, str]) -> float:
        try:
            return float(row.get("predicted_dice") or "nan")
        except ValueError:
            return math.nan

    flagged = sorted((r for r in rows if r.get("flagged") == "yes"), key=lambda r: (not math.isfinite(predicted(r)), predicted(r)))
    lines = [f"{r['case']}: {reason}" for r in flagged for reason in (r.get("reasons") or "").split("; ") if reason]
    no_reference = any("no training reference" in (r.get("estimate") or "") for r in rows)
    return Review(path, len(rows), [r["case"] for r in flagged], lines, no_reference)


def read_folder_rows(folder: Path) -> list[dict[str, str]]:
    """Every quality row of a prediction folder: ``predictions.csv`` and the ``--part`` files
    (``predictions.partIofN.csv``), one row per case (a later file's row wins)."""
    if not folder.is_dir():
        return []
    files = [folder / CSV_NAME] + sorted(p for p in folder.iterdir() if PART_PATTERN.match(p.name))
    rows: dict[str, dict[str, str]] = {}
    for path in files:
        for row in read_rows(path):
            if row.get("case"):
                rows[row["case"]] = row
    return [rows[name] for name in sorted(rows)]


def is_quality_file(path: Path) -> bool:
    """``predictions.csv`` or a ``--part`` share of it."""
    return path.name == CSV_NAME or PART_PATTERN.match(path.name) is not None
