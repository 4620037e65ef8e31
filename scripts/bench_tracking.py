"""What experiment tracking costs: the 2D demo's training, fixed work, without and with each tracker.

Each run is a real ``python -m unetcli train`` process on the shipped 2D demo data with the demo's
network (16-128 features), ``--epochs`` epochs of 40 iterations, fp32, from an empty folder (MLflow
writes ``./mlruns`` there; W&B runs offline). Runs of the variants are interleaved, ``--repeats``
times, so that a change in the machine's load hits every variant alike; the medians are compared.

Two times per run: the training loop (the last epoch's ``elapsed_seconds`` in ``metrics.jsonl``:
steps, validation, checkpoints, and the trackers' per-step and per-epoch calls and start) and the
whole process (adds importing the tracker's package and the final upload of ``best.pt``). Under load the
difference between two such times is noisy; the time the run spent in the trackers' calls and in drawing
the overlay (logged by unetcli as ``tracking: X s in the calls ...``) is reported too, as a share of the loop.

    python scripts/bench_tracking.py --epochs 4 --repeats 3
    python scripts/bench_tracking.py --variant none= --variant all=tensorboard,mlflow,wandb
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from benchlib.machine import load_note, machine_info, median, print_machine, print_table

VARIANTS = ["none=", "tensorboard=tensorboard", "mlflow=mlflow", "wandb=wandb"]


def run_train(trackers: str, epochs: int, threads: int) -> dict:
    data = Path(str(resources.files("unetcli") / "demo_data" / "mni_tissue_2d" / "train"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "unetcli", "-q", "train", str(data), "--out", str(out), "--no-plan", "--epochs", str(epochs),
                   "--set", "model.features=[16,32,64,128]", "--set", "train.iterations_per_epoch=40", "--precision", "fp32",
                   "--device", "cpu", "--num-threads", str(threads), "--seed", "0"] + (["--log-to", trackers] if trackers else [])
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": (Path(tmp) / "mlruns").as_uri()}
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        log = (out / "log.txt").read_text()
        spent = re.search(r"tracking: ([0-9.]+) s in the calls", log)
        return {"process": seconds, "loop": records[-1]["elapsed_seconds"], "iterations": records[-1]["iteration"],
                "warned": "WARNING tracking" in log, "in_tracker_calls": float(spent.group(1)) if spent else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=TRACKERS",
                        help="a --log-to value under a name (repeatable; empty: no tracking); default: none and each tracker")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench_tracking.json"))
    args = parser.parse_args()

    info = machine_info(torch.device("cpu"))
    print_machine(info)
    print(load_note())
    variants = [v.split("=", 1) for v in (args.variant or VARIANTS)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for repeat in range(args.repeats):
        for name, trackers in variants:  # interleaved: load changes hit every variant alike
            runs[name].append(run_train(trackers, args.epochs, args.threads))
            print(repeat, name, runs[name][-1], flush=True)
    base = {key: median([r[key] for r in runs[variants[0][0]] if key in r] or [float("nan")]) for key in ("loop", "process")}
    rows, results = [], {"machine": info["cpu"], "load": load_note(), "epochs": args.epochs, "variants": {}}
    for name, trackers in variants:
        ok = [r for r in runs[name] if "error" not in r]
        loop = median([r["loop"] for r in ok] or [float("nan")])
        process = median([r["process"] for r in ok] or [float("nan")])
        results["variants"][name] = {"trackers": trackers, "runs": runs[name], "loop": loop, "process": process}
        calls = median([100 * r["in_tracker_calls"] / r["loop"] for r in ok] or [float("nan")])
        results["variants"][name]["in_tracker_calls_percent"] = calls
        rows.append([name, trackers or "-", f"{loop:.1f} s", f"{100 * (loop / base['loop'] - 1):+.1f} %", f"{calls:.2f} %",
                     f"{process:.1f} s", f"{100 * (process / base['process'] - 1):+.1f} %", str(len(runs[name]) - len(ok))])
    args.json.write_text(json.dumps(results, indent=2))
    print_table(["variant", "--log-to", "training loop (median)", "vs none", "in tracker calls", "whole process", "vs none", "failed"], rows)


if __name__ == "__main__":
    main()
