"""Quality-check benchmark: do the per-case quality estimates of ``unet predict`` rank the cases as
their real Dice does, do the flagged cases include the worst ones, and what does the check cost?

On the robustness benchmark (``scripts/prepare_robustness_data.py``: a model trained on clean MNI
template octants; held-out octants stored as other scanners store them, and another person's
brain), this predicts every held-out scan with the quality check on (``predictions.csv``) and off,
alternately, with no test-time augmentation; scores each case with the benchmark's own scorer
(``benchlib/scoring.py``: mean Dice over the set's classes); and prints Spearman's rho between
each signal and the real Dice, the predicted Dice's rho, how many of the worst 20 % of cases are
flagged, and the time of prediction with and without the check.

    python scripts/prepare_robustness_data.py /tmp/robust222
    python scripts/bench_robustness.py /tmp/robust222 --out /tmp/bench_robust --iterations 500 --variant base_s0=
    python scripts/bench_qc.py /tmp/robust222 /tmp/bench_robust/runs/base_s0 --out /tmp/qc_bench --num-threads 1

The run folder is only read: its last checkpoint is linked into ``OUT/run``. A run trained before
quality checks existed gets its training reference measured from DATA there
(``unetcli.workflows.quality.add_quality_reference``), as its training would have stored it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from benchlib.machine import cpu_model
from benchlib.scoring import ROBUST_IMAGES, dice_per_case

from unetcli.checkpoint import load_checkpoint
from unetcli.evaluation.quality_fit import signal_correlations
from unetcli.inference import sliding_window
from unetcli.inference.confidence import ConfidenceSums
from unetcli.inference.predict import predict
from unetcli.inference.quality_report import CSV_NAME, SIGNAL_COLUMNS, CaseQuality, QualityReport, read_rows
from unetcli.runtime import configure_threads
from unetcli.workflows.quality import add_quality_reference


def prepare_run(run: Path, data: Path, out: Path) -> tuple[Path, str]:
    """``OUT/run``: the run's last checkpoint (linked) and split; its training reference where the
    checkpoint has none. Returns the folder and where the reference came from."""
    copy = out / "run"
    if copy.exists():
        shutil.rmtree(copy)
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "last.pt").symlink_to((run / "checkpoints" / "last.pt").resolve())
    shutil.copy2(run / "split.json", copy / "split.json")
    if load_checkpoint(copy / "checkpoints" / "last.pt")["metadata"].get("quality_reference"):
        return copy, "checkpoint metadata (stored at training)"
    add_quality_reference(copy, data)
    return copy, "measured from DATA with add_quality_reference (the run predates quality checks)"


QC_STEPS = [(ConfidenceSums, "add"), (ConfidenceSums, "add_flips"), (CaseQuality, "observe_network"),
            (CaseQuality, "observe_output"), (CaseQuality, "row"), (QualityReport, "__init__"), (QualityReport, "write")]
"""The quality check's own work (they do not call each other): its time within a prediction."""


NETWORK = [(sliding_window, "_predict_windows")]
"""The network's forward passes (every window batch): the part of a prediction the check cannot change."""


@contextlib.contextmanager
def clock(steps: list[tuple[Any, str]], spent: list[float]) -> Iterator[None]:
    """Add the seconds spent in ``steps`` (class or module, function name) to ``spent[0]`` while the block runs."""
    originals = {(owner, name): getattr(owner, name) for owner, name in steps}

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    for (cls, name), method in originals.items():
        setattr(cls, name, timed(method))
    try:
        yield
    finally:
        for (cls, name), method in originals.items():
            setattr(cls, name, method)


def timed_predictions(run: Path, data: Path, out: Path, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of ``predict`` over every held-out scan, with the quality check off and on,
    alternating (off, on, on, off, ...) so that a change in the machine's load hits both alike;
    and, in the passes with the check, the seconds its own steps took."""
    seconds: dict[str, list[float]] = {"off": [], "on": [], "qc_steps": [], "network_off": [], "network_on": []}
    order = [m for r in range(repeats) for m in (("off", "on") if r % 2 == 0 else ("on", "off"))]
    for mode in order:
        spent, network = [0.0], [0.0]
        with clock(QC_STEPS, spent), clock(NETWORK, network):
            start = time.perf_counter()
            predict(run, data / ROBUST_IMAGES, out / f"pred_qc_{mode}", mirror=False, overwrite=True, progress=False,
                    qc=mode == "on")
            seconds[mode].append(time.perf_counter() - start)
        seconds[f"network_{mode}"].append(network[0])
        if mode == "on":
            seconds["qc_steps"].append(spent[0])
        print(f"predict --qc {mode}: {seconds[mode][-1]:.1f} s, of which the network {network[0]:.1f} s"
              + (f", the quality check's own steps {spent[0]:.2f} s" if mode == "on" else ""), flush=True)
    return seconds


def same_masks(a: Path, b: Path) -> bool:
    """The quality check must not change a single voxel of the masks."""
    names = sorted(p.name for p in a.glob("*.nii.gz"))
    return names == sorted(p.name for p in b.glob("*.nii.gz")) and all(
        np.array_equal(np.asarray(nib.load(str(a / n)).dataobj), np.asarray(nib.load(str(b / n)).dataobj)) for n in names)


def summarise(rows: list[dict[str, str]], real: dict[str, float]) -> dict[str, Any]:
    correlations = signal_correlations(rows, real)
    ranked = sorted(real, key=real.get)  # type: ignore[arg-type]
    worst = ranked[: math.ceil(0.2 * len(ranked))]
    flagged = [r["case"] for r in rows if r["flagged"] == "yes"]
    return {"spearman": correlations, "worst_20_percent": worst, "flagged": flagged,
            "worst_flagged": [c for c in worst if c in flagged],
            "cases": [{"case": r["case"], "real_dice": real[r["case"]], "predicted_dice": float(r["predicted_dice"]),
                       "flagged": r["flagged"], "reasons": r["reasons"]} for r in rows if r["case"] in real]}


def print_report(result: dict[str, Any]) -> None:
    print("\n| signal | Spearman ρ with the real Dice |\n|---|---|")
    for name in SIGNAL_COLUMNS + ["predicted_dice"]:
        entry = result["spearman"][name]
        if entry["cases"]:
            rho = entry["spearman_rho"]
            label = "**predicted Dice (combined)**" if name == "predicted_dice" else name
            print(f"| {label} | {'–' if math.isnan(rho) else f'{rho:+.2f}'} |")
    worst, hit = result["worst_20_percent"], result["worst_flagged"]
    print(f"\nflagged: {len(result['flagged'])} of {len(result['cases'])} cases; worst 20 % ({len(worst)} cases): "
          f"{len(hit)} flagged ({', '.join(worst)})")
    t = result["seconds"]
    off, on = statistics.median(t["off"]), statistics.median(t["on"])
    share = statistics.median([q / w for q, w in zip(t["qc_steps"], t["on"])])
    rest_off = statistics.median([w - n for w, n in zip(t["off"], t["network_off"])])
    rest_on = statistics.median([w - n for w, n in zip(t["on"], t["network_on"])])
    print(f"predict time, median of {len(t['off'])}: --qc off {off:.1f} s, --qc on {on:.1f} s ({100 * (on / off - 1):+.1f} %); "
          f"the network alone {statistics.median(t['network_off']):.1f} s vs {statistics.median(t['network_on']):.1f} s "
          f"(range {min(t['network_off'] + t['network_on']):.1f}-{max(t['network_off'] + t['network_on']):.1f} s: the machine's load)")
    print(f"cost of the check: everything but the network {rest_off:.2f} s -> {rest_on:.2f} s = "
          f"{100 * (rest_on - rest_off) / off:+.1f} % of the --qc off time; its own steps {100 * share:.1f} % of the --qc on time; "
          f"masks identical: {'yes' if result['masks_identical'] else 'NO'}")
    for case in sorted(result["cases"], key=lambda c: c["real_dice"]):
        print(f"  {case['case']:<26} real {case['real_dice']:.3f}  predicted {case['predicted_dice']:.3f}  "
              f"flagged {case['flagged']:<3} {case['reasons'][:110]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder written by scripts/prepare_robustness_data.py")
    p.add_argument("run", type=Path, help="run folder trained on DATA's clean octants (scripts/bench_robustness.py)")
    p.add_argument("--out", type=Path, default=Path("qc_bench"))
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed predictions per mode (default 3)")
    args = p.parse_args()
    configure_threads(args.num_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    run, reference = prepare_run(args.run, args.data, args.out)
    seconds = timed_predictions(run, args.data, args.out, args.repeats)
    scores = {case: float(np.mean(list(classes.values())))
              for cases in dice_per_case(args.out / "pred_qc_on", args.data).values() for case, classes in cases.items()}
    result = summarise(read_rows(args.out / "pred_qc_on" / CSV_NAME), scores)
    result.update(seconds=seconds, masks_identical=same_masks(args.out / "pred_qc_on", args.out / "pred_qc_off"),
                  reference=reference, machine=cpu_model(), threads=args.num_threads, data=str(args.data), run=str(args.run))
    print_report(result)
    (args.out / "bench_qc.json").write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {args.out / 'bench_qc.json'}")


if __name__ == "__main__":
    main()
