"""Planning benchmark: does `unet plan` help on thick-slice MRI, and how does it compare with nnU-Net v2?

On a thick-slice dataset made by ``scripts/prepare_thick_slice_data.py`` (the MNI ICBM 2009a
template cut into octants, re-gridded to e.g. 2 x 2 x 8 mm; two octants held out, also stored in
another orientation), this trains for the same number of iterations, one after the other on the
same CPU threads:

* unetcli with today's fixed defaults (``--no-plan``),
* unetcli with its plan (``unet train`` as a user runs it; optionally ``--preset resenc-m``),
* nnU-Net v2 ``3d_fullres`` (``scripts/nnunet_reference.py`` in its own virtualenv),

then predicts the held-out octants (as stored, and reoriented) with each final model, scores every
prediction with the same scorer (``unet eval``), and prints both plans and a table of held-out Dice
and seconds per training iteration.

    python scripts/prepare_thick_slice_data.py /tmp/mni_thick_228 --spacing 2,2,8 --overlap-mm 0
    python scripts/bench_plan.py /tmp/mni_thick_228 --iterations 250 --out /tmp/bench_plan \\
        --nnunet-python /path/to/nnunet-venv/bin/python

Every model trains on all six training octants (unetcli: ``data.val_fraction=0``; nnU-Net: fold
``all``) and predicts with its last checkpoint, without test-time augmentation.

``--variant NAME=ARGS`` adds an arm with extra ``unet train`` arguments, planned unless they
say ``--no-plan`` (e.g. ``--variant planned_bn="--set model.norm=batch"``) to find which part of a plan helps; ``--arms`` picks
which of ``fixed`` and ``planned`` to train. Results accumulate in ``OUT/results.json``, so the
table can grow one arm at a time. Given a folder from ``scripts/prepare_robustness_data.py``
(the same octants; ``--spacing 1,1,4`` for thick slices), every model also predicts the other-
scanner sets there (bias field, noise, contrast, regrid, Colin27) and the table adds their mean.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from benchlib.runs import (dice_by_class, eval_summary, record_result, run, seconds_per_iteration, train_iterations,
                          unet)
from benchlib.scoring import ROBUST_IMAGES, dice_per_set, perturbed_mean

HERE = Path(__file__).resolve().parent
TEST_SETS = {"as stored": ("imagesTs", "labelsTs"), "reoriented": ("imagesTs_reoriented", "labelsTs_reoriented")}


def score(pred: Path, truth: Path, out: Path) -> dict[str, float]:
    return dice_by_class(eval_summary(pred, truth, out))


def train_unetcli(name: str, data: Path, out: Path, iterations: int, per_epoch: int, extra: list[str], *,
                  seed: int, threads: int, reuse: bool) -> dict[str, Any]:
    run_dir = out / "runs" / name
    wall = train_iterations(data, run_dir, iterations, per_epoch, seed=seed, threads=threads, extra=extra, reuse=reuse)
    config = (run_dir / "config.yaml").read_text()
    result: dict[str, Any] = {"train_wall_s": round(wall, 1),
                              "s_per_iteration": seconds_per_iteration(run_dir, iterations),
                              "config": config}
    for label, (images, labels) in TEST_SETS.items():
        if not (data / images).is_dir():
            continue
        pred = out / "pred" / name / images
        unet("predict", run_dir / "checkpoints" / "last.pt", data / images, pred, "--overwrite", quiet=False)
        result[label] = score(pred, data / labels, out / "eval" / name / images)
    if (data / "robustness_sets.json").is_file():  # DATA from prepare_robustness_data.py: also other scanners' scans
        pred = out / "pred" / name / ROBUST_IMAGES
        unet("predict", run_dir / "checkpoints" / "last.pt", data / ROBUST_IMAGES, pred, "--overwrite", quiet=False)
        result["robust"] = dice_per_set(pred, data)
    return result


def train_nnunet(data: Path, out: Path, iterations: int, python: str, threads: int, reuse: bool) -> dict[str, Any]:
    work = out / "nnunet"
    wall = run([python, HERE / "nnunet_reference.py", data, "--work-dir", work,
                "--train-iterations", iterations, "--threads", threads, *(["--continue"] if reuse else [])])
    summary = json.loads((work / "nnunet_reference_summary.json").read_text())
    result: dict[str, Any] = {"train_wall_s": summary["train"]["train_command_wall_s"],
                              "s_per_iteration": summary["train"]["iteration_s_median_incl_data"],
                              "plans": summary["plans"], "script_wall_s": round(wall, 1)}
    for label, (images, labels) in TEST_SETS.items():
        if images in summary["predictions"]:
            pred = Path(summary["predictions"][images]["output"])
            result[label] = score(pred, data / labels, out / "eval" / "nnunet" / images)
    if (data / "robustness_sets.json").is_file():
        result["robust"] = dice_per_set(Path(summary["predictions"][ROBUST_IMAGES]["output"]), data)
    return result


def held_out_mean(r: dict[str, Any]) -> float:
    """Mean GM/WM Dice over the held-out thick-slice test sets there are."""
    means = [r[label]["mean"] for label in TEST_SETS if label in r]
    return sum(means) / len(means)


def table(results: dict[str, dict[str, Any]]) -> str:
    robust = all("robust" in r for r in results.values())
    lines = ["| model | s / iteration | " + " | ".join(f"GM / WM Dice, held-out {label}" for label in TEST_SETS)
             + " | mean |" + (" other scanners' scans: mean of the perturbed sets |" if robust else ""),
             "|---|---|---|---|---|" + ("---|" if robust else "")]
    for name, r in results.items():
        cells = []
        for label in TEST_SETS:
            classes = [v for k, v in r[label].items() if k != "mean"] if label in r else []
            cells.append(" / ".join(f"{v:.3f}" for v in classes) or "-")
        lines.append(f"| {name} | {r['s_per_iteration']:.2f} | {' | '.join(cells)} | **{held_out_mean(r):.3f}** |"
                     + (f" **{perturbed_mean(r['robust']):.3f}** |" if robust else ""))
    arms: dict[str, list[tuple[float, float]]] = {}
    for name, r in results.items():
        if ", seed " in name:
            arms.setdefault(name.split(", seed ")[0], []).append((held_out_mean(r), perturbed_mean(r['robust']) if robust else 0.0))
    for arm, pairs in arms.items():
        if len(pairs) > 1:
            clean, other = [p[0] for p in pairs], [p[1] for p in pairs]
            lines.append(f"| {arm}, mean of {len(pairs)} seeds (min..max) | | {' | '.join('' for _ in TEST_SETS)} | "
                         f"**{sum(clean) / len(clean):.3f}** ({min(clean):.3f}..{max(clean):.3f}) |"
                         + (f" **{sum(other) / len(other):.3f}** ({min(other):.3f}..{max(other):.3f}) |" if robust else ""))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    unet("plan", args.data, "--out", out / "plans.yaml", "--overwrite", quiet=False)
    saved = out / "results.json"
    results: dict[str, dict[str, Any]] = json.loads(saved.read_text()) if saved.is_file() else {}
    per_epoch = min(args.iterations, 25)
    arms = {"fixed": ("unetcli, fixed defaults (--no-plan)", ["--no-plan"]), "planned": ("unetcli, planned", [])}
    chosen = [(label, extra, name) for name, (label, extra) in arms.items() if name in args.arms.split(",")]
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        chosen.append((f"unetcli, {name}", shlex.split(extra), name))
    for seed in args.seeds:
        tag = f", seed {seed}" if len(args.seeds) > 1 else ""
        for label, extra, name in chosen:
            entry = train_unetcli(f"{name}{tag and f'_s{seed}'}", args.data, out, args.iterations,
                                  per_epoch, extra, seed=seed, threads=args.threads, reuse=args.reuse)
            results.update(record_result(saved, f"{label}{tag}", entry))
    if args.resenc:
        entry = train_unetcli("resenc", args.data, out, args.iterations, per_epoch, ["--preset", "resenc-m"], seed=0,
                              threads=args.threads, reuse=args.reuse)
        results.update(record_result(saved, "unetcli, planned, --preset resenc-m", entry))
    if args.nnunet_python:
        entry = train_nnunet(args.data, out, args.iterations, args.nnunet_python, args.threads, args.reuse)
        results.update(record_result(saved, "nnU-Net v2 3d_fullres", entry))
        plans = results["nnU-Net v2 3d_fullres"]["plans"]
        print("\nnnU-Net's plan (array axes z, y, x for RAS files):")
        print(json.dumps(plans, indent=1)[:4000])
    print(f"\n{args.iterations} iterations each, {args.threads} threads, dataset {args.data}\n")
    print(table(results))
    print(f"\nwritten: {saved}, {out / 'plans.yaml'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench_plan_out"))
    parser.add_argument("--iterations", type=int, default=50,
                        help="training iterations per model (default 50, a short run; docs/benchmarks.md used 250 and 1000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train the fixed and planned arms once per seed")
    parser.add_argument("--arms", default="fixed,planned", help="which of fixed,planned to train (comma-separated; '' for none)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="an arm with extra `unet train` arguments, planned unless they say --no-plan (repeatable)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a run that finished (predict and score it) and continue one that was stopped (nnU-Net's too)")
    parser.add_argument("--resenc", action="store_true", help="also train the planned residual-encoder preset")
    parser.add_argument("--nnunet-python", help="python of a virtualenv with nnunetv2 (see scripts/nnunet_reference.py)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
