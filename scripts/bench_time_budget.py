"""A time budget against an iteration schedule cut off at the same wall time, on held-out scans.

For each budget T: run A is ``unet train DATA --time T`` (the learning-rate schedule runs over
elapsed time, so it finishes its decay); run B is ``unet train DATA --epochs N`` with the same seed,
where N is twice the epochs run A reached (a schedule planned for twice the time there was), stopped
with SIGTERM when it has run as long as run A did from start to finish (it saves its checkpoint and
stops, as under a batch system's time limit). Both last checkpoints predict the held-out scans and
``unet eval`` scores them.

    python scripts/bench_time_budget.py unetcli/demo_data/mni_thick_3d --times 2m,10m,30m --out /tmp/bench_time

Results accumulate in ``OUT/results.json`` (a budget already there is kept unless ``--retrain``),
so long budgets can be added one at a time. On a machine shared with other work, ``--side-by-side``
(for a further seed) starts A and B together, so that both see the same load.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib.machine import load_note, machine_info, print_machine, print_table
from benchlib.runs import epoch_records, eval_summary, unet, unet_cmd

from unetcli.checkpoint import load_checkpoint
from unetcli.config import parse_duration

HELD_OUT = ("imagesTs:labelsTs", "imagesTs_reoriented:labelsTs_reoriented")


def train(data: Path, run_dir: Path, args: list[object], stop_after: float | None = None) -> float:
    """``unet train`` into ``run_dir``; with ``stop_after``, SIGTERM once that many seconds have
    passed (the run saves its checkpoint, then exits). Its wall time."""
    cmd = unet_cmd("train", data, "--out", run_dir, "--overwrite", *args)
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        proc.wait(timeout=stop_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    if stop_after is None and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def iterations_reached(run_dir: Path) -> int:
    """Iterations in the run's last checkpoint (a run stopped mid-epoch has no epoch record for them)."""
    return int(load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"])


def held_out_dice(run_dir: Path, data: Path, out: Path) -> dict[str, float]:
    """Mean foreground Dice of the run's last checkpoint on each held-out set."""
    scores = {}
    for pair in HELD_OUT:
        images, labels = pair.split(":")
        if not (data / images).is_dir():
            continue
        pred = out / "pred" / images
        unet("predict", run_dir / "checkpoints" / "last.pt", data / images, pred, "--overwrite")
        scores[images] = eval_summary(pred, data / labels, out / "eval" / images, quiet=True)["foreground_mean"]["dice"]
    return scores


def one_budget(data: Path, out: Path, seconds: float, common: list[object]) -> dict[str, Any]:
    """Run A (``--time``) and run B (``--epochs``, cut at A's wall time) for one budget."""
    timed_dir, cut_dir = out / "timed", out / "cut"
    timed_wall = train(data, timed_dir, [*common, "--time", f"{seconds:.0f}s"])
    epochs = 2 * len(epoch_records(timed_dir))
    cut_wall = train(data, cut_dir, [*common, "--epochs", epochs], stop_after=timed_wall)
    return {"seconds": seconds,
            "timed": {"wall_s": round(timed_wall, 1), "iterations": iterations_reached(timed_dir),
                      "dice": held_out_dice(timed_dir, data, out / "timed_scores")},
            "cut": {"wall_s": round(cut_wall, 1), "planned_epochs": epochs,
                    "iterations": iterations_reached(cut_dir),
                    "dice": held_out_dice(cut_dir, data, out / "cut_scores")}}


def side_by_side(data: Path, out: Path, seconds: float, common: list[object], epochs: int) -> dict[str, Any]:
    """Runs A and B started together, B planned for ``epochs`` and stopped (SIGTERM) when A ends: both
    see the same machine load, which a busy shared machine otherwise gives them unequally."""
    timed_dir, cut_dir = out / "timed", out / "cut"
    cut_cmd = unet_cmd("train", data, "--out", cut_dir, "--overwrite", *common, "--epochs", epochs)
    print("+", " ".join(map(str, cut_cmd)), "(beside the next)", flush=True)
    cut = subprocess.Popen(cut_cmd, stdout=subprocess.DEVNULL)
    start = time.perf_counter()
    timed_wall = train(data, timed_dir, [*common, "--time", f"{seconds:.0f}s"])
    cut.send_signal(signal.SIGTERM)
    cut.wait()
    cut_wall = time.perf_counter() - start
    return {"seconds": seconds, "side_by_side": True,
            "timed": {"wall_s": round(timed_wall, 1), "iterations": iterations_reached(timed_dir),
                      "dice": held_out_dice(timed_dir, data, out / "timed_scores")},
            "cut": {"wall_s": round(cut_wall, 1), "planned_epochs": epochs, "iterations": iterations_reached(cut_dir),
                    "dice": held_out_dice(cut_dir, data, out / "cut_scores")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="nnU-Net-layout dataset with imagesTr/labelsTr and held-out imagesTs/labelsTs")
    p.add_argument("--times", default="2m,10m,30m", help="comma-separated budgets (s/m/h)")
    p.add_argument("--out", type=Path, default=Path("bench_time_budget_out"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retrain", action="store_true", help="train budgets again even if results.json has them")
    p.add_argument("--side-by-side", action="store_true",
                   help="run A and B at the same time (same machine load), B planned for twice the epochs run A "
                        "reached with seed 0 at the same budget (that result must be in OUT/results.json)")
    args = p.parse_args()

    print_machine(machine_info(__import__("torch").device("cpu")))
    print(load_note())
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    common: list[object] = ["--seed", args.seed, "--num-threads", args.threads]
    for text in args.times.split(","):
        key = f"{text}_s{args.seed}"
        if key in results and not args.retrain:
            print(f"{key}: kept from {results_path}")
            continue
        if args.side_by_side:
            epochs = results[f"{text}_s0"]["cut"]["planned_epochs"]
            results[key] = side_by_side(args.data, args.out / key, parse_duration(text), common, epochs)
        else:
            results[key] = one_budget(args.data, args.out / key, parse_duration(text), common)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)

    rows = []
    for key, r in results.items():
        for arm, label in (("timed", "--time T"), ("cut", f"--epochs {r['cut']['planned_epochs']} cut at T")):
            d = r[arm]["dice"]
            rows.append([key, label, r[arm]["iterations"], f"{r[arm]['wall_s']:.0f} s",
                         *(f"{d[s]:.3f}" for s in sorted(d))])
    sets = sorted(next(iter(results.values()))["timed"]["dice"]) if results else []
    print_table(["budget_seed", "run", "iterations", "wall", *sets], rows)
    print(f"\nwritten: {results_path}")


if __name__ == "__main__":
    main()
