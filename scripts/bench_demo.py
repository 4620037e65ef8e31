"""The demos' wall time and held-out Dice, as a new user meets them, on this CPU and with AVX2 kernels forced.

Each run is a real ``python -m unetcli demo`` process started from an empty folder (imports, training,
prediction, scoring and printing all counted). ``--avx2`` repeats every variant with torch and oneDNN
restricted to their AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``), which
also makes ``--precision auto`` choose fp32 as it does on an AVX2-only CPU: an estimate of such a
machine, not a measurement on one. Every epoch's validation Dice and elapsed seconds are kept, so the
Dice-vs-time curve of each run is in the results file.

    python scripts/bench_demo.py --variant default= --variant small="--set train.patch_size=[128,128]" --avx2
    python scripts/bench_demo.py --3d --variant default=

Results accumulate in ``--json`` (default ``bench_demo.json``); rerunning a (variant, kernels) pair replaces it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib.machine import load_note, machine_info, print_machine, print_table

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_demo(args: list[str], env: dict[str, str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        command = [sys.executable, "-m", "unetcli", "demo", "--out", str(out), "--num-threads", str(threads), *args]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=tmp, env={**os.environ, **env}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        summary = json.loads((out / "eval" / "summary.json").read_text())
        curve = [(round(r["elapsed_seconds"], 1), round(r["val_dice_mean"], 4), r["iteration"])
                 for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        config = (out / "config.yaml").read_text()
        precision = "bf16" if "precision bf16" in (out / "log.txt").read_text() else "fp32"
        return {"seconds": round(seconds, 1), "dice": summary["foreground_mean"]["dice"], "curve": curve,
                "iterations": curve[-1][2] if curve else 0, "precision": precision, "config_lines": len(config.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="extra `unet demo` arguments under a name (repeatable); default: the demo as shipped")
    parser.add_argument("--3d", dest="three_d", action="store_true", help="the 3D demo")
    parser.add_argument("--avx2", action="store_true", help="also run every variant with AVX2 kernels forced")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench_demo.json"))
    args = parser.parse_args()

    info = machine_info(torch.device("cpu"))
    print_machine(info)
    print(load_note())
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    variants = [v.split("=", 1) for v in (args.variant or ["default="])]
    kernels = [("native", {})] + ([("avx2", AVX2_ENV)] if args.avx2 else [])
    rows = []
    for name, extra in variants:
        for kernel, env in kernels:
            demo_args = (["--3d"] if args.three_d else []) + shlex.split(extra)
            key = f"{'3d' if args.three_d else '2d'}/{name}/{kernel}"
            result = run_demo(demo_args, env, args.threads)
            results[key] = {"args": demo_args, "machine": info["cpu"], "load": load_note(), **result}
            args.json.write_text(json.dumps(results, indent=2))
            rows.append([key, result.get("precision", "-"), str(result.get("iterations", "-")),
                         f"{result['seconds']:.0f} s" if "seconds" in result else result["error"],
                         f"{result['dice']:.3f}" if "dice" in result else "-"])
            print(rows[-1], flush=True)
    print_table(["run", "precision", "iterations", "wall time (whole demo)", "held-out mean Dice"], rows)


if __name__ == "__main__":
    main()
