"""Seconds per training iteration of each training-recipe arm, data loading and augmentation included.

The robustness benchmark's s/it come from long runs that shared the CPU with other work, so they
say little about what a recipe change costs. This runs every arm as ``unet train`` on the same data
for two short epochs, in interleaved rounds (arm 1, arm 2, ..., arm 1, arm 2, ...), and reports the
second epoch's seconds per iteration (the first holds start-up and cache filling), the median over
the rounds and its ratio to the first arm measured in the same rounds.

    python scripts/bench_recipe_speed.py DATA --out /tmp/recipe_speed --threads 2 \\
        --arm former="--set train.deep_supervision=false" --arm default="" \\
        --arm rot="--set train.rotate_scale_prob=0.2" \\
        --arm both="--set train.rotate_scale_prob=0.2 --set train.deep_supervision=true"

An arm is ``NAME=ARGS`` (extra ``unet train`` arguments); the first arm is the reference.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

import torch
from benchlib.machine import load_note, machine_info, print_machine, print_table
from benchlib.runs import epoch_records, train_iterations


def arm_seconds_per_iteration(data: Path, run_dir: Path, per_epoch: int, threads: int, extra: str) -> float:
    """One two-epoch run of an arm; the second epoch's seconds per iteration."""
    train_iterations(data, run_dir, 2 * per_epoch, per_epoch, seed=0, threads=threads, extra=shlex.split(extra), quiet=True)
    return epoch_records(run_dir)[-1]["seconds_per_iteration"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench_recipe_speed_out"))
    p.add_argument("--arm", action="append", required=True, metavar="NAME=ARGS", help="repeatable; the first is the reference")
    p.add_argument("--iterations-per-epoch", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    arms = [spec.partition("=")[::2] for spec in args.arm]
    torch.set_num_threads(args.threads)
    print_machine(machine_info(torch.device("cpu")))
    times: dict[str, list[float]] = {name: [] for name, _ in arms}
    for _ in range(args.rounds):
        for name, extra in arms:
            times[name].append(arm_seconds_per_iteration(args.data, args.out / name, args.iterations_per_epoch, args.threads, extra))
    reference = statistics.median(times[arms[0][0]])
    rows = [[name, extra or "(defaults)", f"{statistics.median(times[name]):.3f}", " ".join(f"{t:.3f}" for t in times[name]),
             f"x{statistics.median(times[name]) / reference:.2f}"] for name, extra in arms]
    print(f"\n{args.iterations_per_epoch} iterations per epoch, second epoch timed, {args.rounds} round(s), "
          f"{args.threads} threads; {load_note()}\n")
    print_table(["arm", "unet train arguments", "s/it (median)", "per round", f"vs {arms[0][0]}"], rows)


if __name__ == "__main__":
    main()
