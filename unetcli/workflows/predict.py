"""``unet predict`` in one process or shared over the processes ``torchrun`` starts.

Under ``torchrun --nproc-per-node N -m unetcli predict RUN IN OUT`` every rank predicts its own
share of the cases (share ``rank+1`` of ``N``, as ``--part`` would pick it) on its own device
(``cuda:LOCAL_RANK`` where there are GPUs), so each case has exactly one writer. When all ranks are
done, rank 0 merges their quality rows into ``OUT/predictions.csv`` and reports the flagged cases of
the whole folder. Nothing else is exchanged: the ranks need no collective while they predict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from unetcli.atomic import atomic_write_text
from unetcli.errors import ConfigError, UnetCliError
from unetcli.inference.predict import predict
from unetcli.inference.quality_report import CSV_NAME, csv_name, read_rows, rows_csv_text
from unetcli.training.distributed import gather_rows, join_world, launched_by_torchrun, leave_world, report_failure


@dataclass
class PredictResult:
    written: list[Path]
    """The masks written by this call (by every rank under torchrun)."""
    quality_csv: Path
    """The quality report holding their rows."""
    is_main: bool
    """False on the ranks other than 0 (they print nothing)."""


def predict_folder(runs: Sequence[Path], input_path: Path, output: Path, *, part: tuple[int, int] | None = None,
                   device_name: str = "auto", progress: bool = True, qc: bool = True, **options: Any) -> PredictResult:
    """:func:`unetcli.inference.predict.predict`, shared over the ranks when ``torchrun`` started this process."""
    if not launched_by_torchrun():
        written = predict(runs, input_path, output, device_name=device_name, progress=progress, part=part, qc=qc, **options)
        return PredictResult(written, output / csv_name(part), True)
    if part is not None:
        refused = ConfigError(f"--part {part[0]}/{part[1]} under torchrun: the processes already share the cases",
                              hint="use one of them: torchrun (the ranks share the cases) or --part I/N (one share per job)")
        refused.quiet = os.environ.get("RANK") != "0"  # every rank refuses it: one line, rank 0's
        raise refused
    world = join_world(device_name)
    share = (world.rank + 1, world.world_size)
    try:
        written = predict(runs, input_path, output, device_name=device_name, progress=progress and world.is_main,
                          part=share, qc=qc, **options)
        everyone = [Path(p) for p in gather_rows([str(p) for p in written])]  # also waits for every rank
        if world.is_main and qc:
            merge_part_reports(output, world.world_size)
    except BaseException as exc:
        if not report_failure(exc) and isinstance(exc, UnetCliError):
            exc.quiet = True  # another rank failed first and prints the one error line
        raise
    finally:
        leave_world()
    return PredictResult(everyone, output / CSV_NAME, world.is_main)


def merge_part_reports(output: Path, count: int) -> None:
    """Fold the ranks' ``predictions.partIofN.csv`` into ``predictions.csv`` (its earlier rows stay
    unless a rank predicted the case again), then remove them: one report per folder, as one process writes it."""
    parts = [output / csv_name((index, count)) for index in range(1, count + 1)]
    rows = {row["case"]: row for path in [output / CSV_NAME, *parts] for row in read_rows(path) if row.get("case")}
    atomic_write_text(output / CSV_NAME, rows_csv_text([rows[name] for name in sorted(rows)]))
    for path in parts:
        path.unlink(missing_ok=True)
