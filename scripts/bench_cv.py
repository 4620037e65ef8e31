"""Cross-validation on real data: does the ensemble of the folds beat its members on held-out scans?

Runs ``unet cv DATA --folds K`` (resumable: rerunning continues), then predicts held-out cases
that no fold saw with every fold's last checkpoint, with the ensemble (``unet predict CV``) without
and with the postprocessing chosen on the out-of-fold predictions, scores each with ``unet eval``
and prints the out-of-fold table and a held-out table (each fold, their mean, the ensemble).

    python scripts/bench_cv.py unetcli/demo_data/mni_tissue_2d/train \\
        unetcli/demo_data/mni_tissue_2d/test/images unetcli/demo_data/mni_tissue_2d/test/masks \\
        --folds 5 --out /tmp/bench_cv_2d -- --epochs 8 --set train.iterations_per_epoch=40
    python scripts/bench_cv.py unetcli/demo_data/colin27_lobes_3d \\
        unetcli/demo_data/colin27_lobes_3d/imagesTs unetcli/demo_data/colin27_lobes_3d/labelsTs --folds 3 --out /tmp/bench_cv_3d

Arguments after ``--`` go to ``unet cv`` (budget, --set ...). Without any, every fold trains
2 epochs x 20 iterations (``QUICK_BUDGET``), a check that finishes in minutes on 2 CPU cores;
pass the budget after ``--`` for a real run, as in the first example.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchlib.runs import eval_summary, unet


QUICK_BUDGET = ["--epochs", "2", "--set", "train.iterations_per_epoch=20"]


def held_out(model: Path, images: Path, labels: Path, out: Path, *extra: str) -> dict[str, float]:
    seconds = unet("predict", model, images, out / "pred", "--overwrite", *extra)
    summary = eval_summary(out / "pred", labels, out / "eval", quiet=True)
    return {"dice": summary["foreground_mean"]["dice"], "predict_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("test_images", type=Path)
    parser.add_argument("test_labels", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_cv_out"))
    args, rest = parser.parse_known_args()
    args.cv_args = rest[1:] if rest[:1] == ["--"] else rest  # everything after -- goes to unet cv
    if not args.cv_args:
        args.cv_args = QUICK_BUDGET
        print(f"no unet cv arguments after --: a quick run ({' '.join(QUICK_BUDGET)}); pass the budget after -- for a real one")
    cv = args.out / "cv"
    train_s = unet("cv", args.data, "--folds", args.folds, "--out", cv, "--seed", 0, *args.cv_args)
    summary = json.loads((cv / "summary.json").read_text())["cross_validation"]
    rows = {}
    for k in range(args.folds):
        rows[f"fold {k}"] = held_out(cv / f"fold_{k}" / "checkpoints" / "last.pt", args.test_images, args.test_labels,
                                     args.out / f"fold_{k}")
    mean_fold = sum(r["dice"] for r in rows.values()) / args.folds
    rows["ensemble"] = held_out(cv, args.test_images, args.test_labels, args.out / "ensemble", "--no-postprocessing")
    rows["ensemble + postprocessing"] = held_out(cv, args.test_images, args.test_labels, args.out / "ensemble_pp")
    pooled = summary["dice_with_95ci"]["mean"]
    post = summary["postprocessing"]
    print(f"\n{args.data}: {args.folds}-fold cross-validation ({train_s:.0f} s)")
    print(f"out-of-fold mean foreground Dice {pooled['mean']:.4f} (95 % CI {pooled['ci_low']:.4f}-{pooled['ci_high']:.4f}, "
          f"{pooled['cases']} cases); per fold: " + ", ".join(f"{f['dice']['mean']:.4f}" for f in summary["folds"]))
    print(f"postprocessing chosen: {post['choice']} (out-of-fold {post['mean_dice_before']:.4f} -> {post['mean_dice_after']:.4f})")
    print(f"\nheld-out cases no fold saw ({args.test_images}):\n")
    print("| model | mean foreground Dice | predict s |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['dice']:.4f} | {r['predict_s']:.1f} |")
        if name == f"fold {args.folds - 1}":
            print(f"| mean of the folds | {mean_fold:.4f} | |")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "mean_fold": mean_fold, "cv": summary}, indent=1))


if __name__ == "__main__":
    main()
