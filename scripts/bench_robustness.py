"""Robustness benchmark: held-out Dice on scans stored as other scanners store them, unetcli next to nnU-Net v2.

On a dataset made by ``scripts/prepare_robustness_data.py`` (clean MNI template octants for
training; the held-out octants once per perturbation: intensity scale, bias field, noise, contrast,
another grid and orientation, all of them together; and another person's brain), this trains each
unetcli variant for the same number of iterations, predicts every held-out scan with its last
checkpoint (no test-time augmentation), and scores all of them with one scorer. With
``--nnunet-python`` it also trains nnU-Net v2 ``3d_fullres`` for the same iterations
(``scripts/nnunet_reference.py``) and scores its predictions the same way.

    python scripts/prepare_robustness_data.py /tmp/robust222
    python scripts/bench_robustness.py /tmp/robust222 --out /tmp/bench_robust --iterations 500 \\
        --variant before="--set train.augmentation=basic" --variant after="" \\
        --nnunet-python /path/to/nnunet-venv/bin/python

With ``--reuse`` a stopped run (unetcli's or nnU-Net's) continues from its last checkpoint
instead of starting again, so arms of thousands of iterations can be trained over several sittings.

A variant is ``NAME=ARGS``: extra ``unet train`` arguments (e.g. ``--set model.norm=batch``).
Variants already trained under ``--out`` (their ``results.json`` entry exists) are kept, so a
table can grow one variant at a time; ``--retrain`` trains them again.

Every model trains on all six training octants (unetcli: ``data.val_fraction=0``; nnU-Net: fold
``all``). Dice is the mean over grey and white matter per case, then over the set's cases; the
Colin27 set scores grey matter only (its reference is the AAL atlas) outside the cerebellum.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from benchlib.runs import record_result, run, seconds_per_iteration, train_iterations, unet
from benchlib.scoring import ROBUST_IMAGES, dice_per_set, perturbed_mean

HERE = Path(__file__).resolve().parent


def train_unetcli(name: str, extra: str, data: Path, out: Path, iterations: int, per_epoch: int, threads: int,
                  seed: int, reuse: bool) -> dict[str, Any]:
    run_dir = out / "runs" / name
    wall = train_iterations(data, run_dir, iterations, per_epoch, seed=seed, threads=threads, extra=shlex.split(extra),
                            reuse=reuse)
    return {"args": extra, "seed": seed, "iterations": iterations, "train_wall_s": round(wall, 1),
            "s_per_iteration": seconds_per_iteration(run_dir, iterations),
            "dice": predict_and_score(name, data, out)}


def predict_and_score(name: str, data: Path, out: Path) -> dict[str, dict[str, float]]:
    """Predict every held-out scan with the variant's last checkpoint and score it."""
    pred = out / "pred" / name
    unet("predict", out / "runs" / name / "checkpoints" / "last.pt", data / ROBUST_IMAGES, pred, "--overwrite", quiet=False)
    return dice_per_set(pred, data)


def train_nnunet(data: Path, out: Path, iterations: int, python: str, threads: int, reuse: bool) -> dict[str, Any]:
    work = out / "nnunet"
    wall = run([python, HERE / "nnunet_reference.py", data, "--work-dir", work, "--dataset-id", "993",
                "--name", "MNIRobust", "--train-iterations", iterations, "--threads", threads,
                *(["--continue"] if reuse else [])])
    summary = json.loads((work / "nnunet_reference_summary.json").read_text())
    pred = Path(summary["predictions"][ROBUST_IMAGES]["output"])
    return {"args": "nnU-Net v2 3d_fullres, fold all", "train_wall_s": summary["train"]["train_command_wall_s"],
            "s_per_iteration": summary["train"]["iteration_s_median_incl_data"], "script_wall_s": round(wall, 1),
            "dice": dice_per_set(pred, data)}


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    sets = list(next(iter(results.values()))["dice"])
    lines = ["| held-out set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in sets:
        lines.append(f"| {s} | " + " | ".join(f"{results[n]['dice'][s]['mean']:.3f}" for n in names) + " |")
    lines.append("| **mean of the perturbed sets** (not the background sets) | " + " | ".join(
        f"**{perturbed_mean(results[n]['dice']):.3f}**" for n in names) + " |")
    lines.append("| s / iteration | " + " | ".join(f"{results[n]['s_per_iteration']:.2f}" for n in names) + " |")
    lines.append("| training wall time (s) | " + " | ".join(f"{results[n]['train_wall_s']:.0f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder written by scripts/prepare_robustness_data.py")
    p.add_argument("--out", type=Path, default=Path("bench_robustness_out"))
    p.add_argument("--iterations", type=int, default=100,
                   help="training iterations per model (default 100, a short run; docs/benchmarks.md used 500 and 1650)")
    p.add_argument("--iterations-per-epoch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="training seed of the unetcli variants (default 0)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="a unetcli variant: extra `unet train` arguments (repeatable; without it and"
                        " --nnunet-python: one variant 'unetcli' with none)")
    p.add_argument("--nnunet-python", help="python of a virtualenv with nnunetv2 (see scripts/nnunet_reference.py)")
    p.add_argument("--retrain", action="store_true", help="train variants again even if results.json has them")
    p.add_argument("--reuse", action="store_true",
                   help="continue a variant's (or nnU-Net's) stopped run under OUT instead of starting it again, and "
                        "keep one that finished: long arms can train over several sittings")
    p.add_argument("--rescore", action="store_true",
                   help="predict and score the held-out sets again with the trained variants (after adding sets to DATA)")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: dict[str, dict[str, Any]] = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save(name: str, entry: dict[str, Any]) -> None:
        results.update(record_result(results_path, name, entry))

    variants = [v.split("=", 1) if "=" in v else (v, "") for v in args.variant]
    if not variants and not args.nnunet_python:
        variants = [("unetcli", "")]
    for name, extra in variants:
        if name in results and results[name]["args"] == extra and not args.retrain:
            print(f"{name}: kept from {results_path}")
            if args.rescore:
                save(name, {**results[name], "dice": predict_and_score(name, args.data, args.out)})
            continue
        save(name, train_unetcli(name, extra, args.data, args.out, args.iterations, args.iterations_per_epoch, args.threads,
                                 args.seed, args.reuse))
    if "nnU-Net v2" in results and args.rescore:
        save("nnU-Net v2", {**results["nnU-Net v2"],
                            "dice": dice_per_set(args.out / "nnunet" / "predictions" / ROBUST_IMAGES, args.data)})
    if args.nnunet_python and ("nnU-Net v2" not in results or args.retrain):
        save("nnU-Net v2", train_nnunet(args.data, args.out, args.iterations, args.nnunet_python, args.threads,
                                               args.reuse))
    print(f"\n{args.iterations} iterations each, {args.threads} threads, dataset {args.data}; Dice = mean of GM and WM\n")
    print(table(results))
    print(f"\nwritten: {results_path}")


if __name__ == "__main__":
    main()
