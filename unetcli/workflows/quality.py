"""The training reference of a run trained before quality checks existed: measured again from its
training data and written beside it, so that ``unet predict`` checks its cases for distance from
the training cases too (see docs/quality.md)."""

from __future__ import annotations

from pathlib import Path

from unetcli.atomic import read_written_json
from unetcli.checkpoint import load_checkpoint, resolve_checkpoint
from unetcli.config import config_from_dict
from unetcli.data.dataset import discover_dataset, load_dataset
from unetcli.errors import CheckpointError, DataError
from unetcli.evaluation.summary import write_json
from unetcli.inference.quality_context import REFERENCE_FILE
from unetcli.inference.quality_reference import reference_from_dataset


def add_quality_reference(run: Path, data: Path, out: Path | None = None) -> Path:
    """Measure the training cases of ``run`` (a run folder; its ``split.json`` names them) in
    ``data`` (the folder it was trained on) and write ``quality_reference.json`` into the run folder,
    or into ``out`` (a copy of the run folder, when the run itself is read-only)."""
    state = load_checkpoint(resolve_checkpoint(run))
    split = read_written_json(run / "split.json", "record of the split", hint="pass the run folder `unet train` wrote")
    files = discover_dataset(data)
    dataset = load_dataset(files, config_from_dict(state["config"]).data)
    if dataset.preprocessing != state["metadata"].get("preprocessing"):
        raise DataError(f"{data}: preprocessed differently from the data {run} was trained on",
                        hint="pass the data folder the run was trained on")
    reference = reference_from_dataset(files, dataset, list(split.get("train") or []))
    if reference is None:
        raise CheckpointError(f"{run}: none of its training cases ({run / 'split.json'}) is in {data}",
                              hint="pass the data folder the run was trained on")
    return write_json((out or run) / REFERENCE_FILE, reference)
