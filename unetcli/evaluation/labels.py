"""Class names for the reports: from a ``dataset.json`` next to the references, or from a run's checkpoint metadata.

Reading the checkpoint itself needs torch (:mod:`unetcli.checkpoint`); that is left to
the caller (:func:`unetcli.workflows.eval.checkpoint_label_names`), so that scoring never
imports training code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unetcli.errors import CheckpointError

log = logging.getLogger("unetcli")


def _names_from_mapping(labels: object) -> dict[int, str]:
    """nnU-Net ``{"name": index}`` or Decathlon ``{"index": "name"}`` -> ``{index: name}``.

    nnU-Net region entries (``"whole_tumour": [1, 2, 3]``) are skipped.
    """
    out: dict[int, str] = {}
    if isinstance(labels, list) and all(isinstance(n, str) for n in labels):  # names in label order
        return {i: n for i, n in enumerate(labels)}
    if not isinstance(labels, dict):
        return out
    for key, value in labels.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[value] = str(key)
        elif isinstance(value, str) and str(key).strip().lstrip("-").isdigit():
            out[int(key)] = value
    return out


def _dataset_json(truth: Path) -> tuple[Path, dict[str, Any]] | None:
    """The ``dataset.json`` in TRUTH (its folder for a file) or its parent folder, read."""
    folder = truth if truth.is_dir() else truth.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("%s: ignored, not readable JSON (%s)", candidate, exc)
                return None
            return (candidate, meta) if isinstance(meta, dict) else None
    return None


def dataset_label_names(truth: Path) -> dict[int, str] | None:
    """Class names from a ``dataset.json`` in TRUTH (its folder for a file) or its parent folder."""
    found = _dataset_json(truth)
    if found is None:
        return None
    names = _names_from_mapping(found[1].get("labels"))
    if names:
        return names
    log.warning("%s: no usable 'labels' entry; classes are named by their label values", found[0])
    return None


def dataset_regions_and_ignore(truth: Path) -> tuple[dict[str, list[int]] | None, int | None]:
    """nnU-Net regions (labels given as lists: ``{"whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}``)
    and the ``ignore`` label value from the ``dataset.json`` next to the references."""
    found = _dataset_json(truth)
    labels = found[1].get("labels") if found else None
    if isinstance(labels, list) and "ignore" in labels:  # names in label order
        return None, labels.index("ignore")
    if not isinstance(labels, dict):
        return None, None
    ignore = labels.get("ignore")
    ignore = ignore if isinstance(ignore, int) and not isinstance(ignore, bool) else None
    if not any(isinstance(v, list) for v in labels.values()):
        return None, ignore
    regions = {str(name): [int(v) for v in (value if isinstance(value, list) else [value])]
               for name, value in labels.items() if name not in ("background", "ignore")}
    return regions, ignore


def metadata_label_names(meta: Any, run: Path) -> dict[int, str]:
    """Class names in a checkpoint's ``metadata["label_names"]`` (of run ``run``), keyed by the label
    value written in prediction files (``label_values``) and by class index."""
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names:
        raise CheckpointError(f"{run}: the checkpoint stores no class names", hint="pass --label-names instead")
    out = {i: str(n) for i, n in enumerate(names)}
    values = meta.get("label_values")
    if isinstance(values, (list, tuple)) and len(values) == len(names):
        for value, name in zip(values, names):
            if isinstance(value, int) and not isinstance(value, bool):
                out[value] = str(name)
    return out


def eval_label_values(meta: dict[str, Any]) -> list[int] | None:
    """The label values predictions are scored on (as ``unet eval`` reads them: 0/255 PNG masks as 0/1)."""
    values = meta.get("label_values")
    if not isinstance(values, list):
        return None
    labels = [int(v) for v in values if int(v) != 0]
    if meta.get("file_format", "png") == "png" and labels == [255]:
        labels = [1]
    return labels or None


def metadata_eval_options(meta: dict[str, Any], run: Path) -> dict[str, Any]:
    """How a run's predictions are scored against its own training references: its classes by
    name, or its regions; reference voxels of its ``ignore`` label are not scored. (Region and
    ignore label maps hold class indices 0..K-1, so an index is its label value.)"""
    regions = meta.get("regions")
    options: dict[str, Any] = {"ignore_label": meta.get("ignore_index")}
    if regions:
        names = meta["label_names"][1:]
        options["regions"] = {str(n): [int(v) for v in members] for n, members in zip(names, regions)}
    else:
        options.update(labels=eval_label_values(meta), label_names=metadata_label_names(meta, run))
    return options
