#!/usr/bin/env python
"""Regions and partial annotations on real MRI: what each label structure buys, at an equal budget.

1. **Nested regions** (``regions``): Colin27 + AAL blocks whose labels nest as grey matter ⊃
   frontal lobe ⊃ middle frontal gyrus (``scripts/prepare_label_structures.py regions``). The same
   images and label maps are trained twice with the same seed and iterations: as a region model
   (one sigmoid per region, ``regions/dataset.json``) and as a plain softmax model of the three
   disjoint labels (``disjoint/dataset.json``), whose predictions are turned into regions
   afterwards. Both are scored per region on the 2 held-out blocks with ``unet eval --region``.
2. **Partial annotation** (``sparse``): the MNI template's tissue labels (2 mm octants,
   ``scripts/prepare_thick_slice_data.py --spacing 2,2,2``) with only every k-th axial slice
   labelled and the rest ``ignore`` (``prepare_label_structures.py sparse --every k``), k = 1, 5,
   10, each trained for the same iterations; held-out octants are scored against their dense
   labels, and each k is reported as a fraction of the dense (k = 1) model's Dice.

    python scripts/bench_label_structures.py --out /tmp/bench_labels [--iterations 300] [--seed 0] [--part regions|sparse]

Everything goes through the ``unet`` command as a user runs it (auto-planned configuration).
Datasets are built into OUT/data on first use; training reruns are skipped when a run finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchlib.runs import dice_by_class, eval_summary, run, unet

SCRIPTS = Path(__file__).resolve().parent
REGIONS = {"grey_matter": "1,2,3", "lobe": "2,3", "area": "3"}


def train_predict_eval(data: Path, test_images: Path, test_labels: Path, out: Path, args: argparse.Namespace,
                       *eval_args: str) -> dict[str, float]:
    """Train (unless finished), predict the held-out cases, score them; per class/region Dice."""
    run_dir = out / "run"
    iterations = args.iterations
    train_s = 0.0
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        epochs = max(1, iterations // 50)
        train_s = unet("train", data, "--out", run_dir, "--epochs", epochs, "--set", "train.iterations_per_epoch=50",
                       "--seed", args.seed, "--num-threads", args.threads, "--overwrite")
    unet("predict", run_dir, test_images, out / "pred", "--overwrite")
    dice = dice_by_class(eval_summary(out / "pred", test_labels, out / "eval", *eval_args, quiet=True))
    dice["train_s"] = train_s
    return dice


def bench_regions(args: argparse.Namespace) -> None:
    data = args.out / "data" / "colin_regions"
    if not (data / "regions" / "dataset.json").is_file():
        run([sys.executable, SCRIPTS / "prepare_label_structures.py", "regions", data, "--overwrite"])
    region_args = [a for name, labels in REGIONS.items() for a in ("--region", f"{name}={labels}")]
    rows = {}
    for kind in ("disjoint", "regions"):
        folder = data / kind
        rows[kind] = train_predict_eval(folder, folder / "imagesTs", folder / "labelsTs", args.out / f"regions_{kind}",
                                        args, *region_args)
    print(f"\nNested regions, Colin27 + AAL, {args.iterations} iterations, seed {args.seed}; held-out Dice per region "
          f"(2 blocks):\n")
    print("| model | " + " | ".join(REGIONS) + " | mean | train s |\n|---|" + "---|" * (len(REGIONS) + 2))
    labels = {"disjoint": "softmax on disjoint labels, regions formed afterwards", "regions": "region model (sigmoid per region)"}
    for kind, r in rows.items():
        print(f"| {labels[kind]} | " + " | ".join(f"{r[n]:.4f}" for n in REGIONS) + f" | {r['mean']:.4f} | {r['train_s']:.0f} |")
    (args.out / "regions.json").write_text(json.dumps(rows, indent=1))


def bench_sparse(args: argparse.Namespace) -> None:
    dense = args.out / "data" / "mni_iso_222"
    if not (dense / "dataset.json").is_file():
        run([sys.executable, SCRIPTS / "prepare_thick_slice_data.py", dense, "--spacing", "2,2,2", "--overlap-mm", "0",
             "--overwrite"])
    rows = {}
    for k in args.every:
        folder = args.out / "data" / f"mni_sparse_{k}"
        if not (folder / "dataset.json").is_file():
            run([sys.executable, SCRIPTS / "prepare_label_structures.py", "sparse", dense, folder, "--every", k,
                 "--overwrite"])
        rows[k] = train_predict_eval(folder, folder / "imagesTs", folder / "labelsTs", args.out / f"sparse_{k}", args)
    base = rows[args.every[0]]["mean"]
    classes = [c for c in rows[args.every[0]] if c not in ("mean", "train_s")]
    print(f"\nPartial annotation, MNI tissue octants at 2 mm, every k-th axial slice labelled (rest 'ignore'), "
          f"{args.iterations} iterations, seed {args.seed}; held-out Dice (dense references):\n")
    print("| labelled slices | " + " | ".join(classes) + " | mean | of dense | train s |\n|---|" + "---|" * (len(classes) + 3))
    for k, r in rows.items():
        print(f"| every {k} | " + " | ".join(f"{r[c]:.4f}" for c in classes)
              + f" | {r['mean']:.4f} | {r['mean'] / base:.1%} | {r['train_s']:.0f} |")
    (args.out / "sparse.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_labels_out"))
    parser.add_argument("--iterations", type=int, default=50,
                        help="training iterations per model, a multiple of 50 (default 50, a short run; docs/benchmarks.md used 250)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 5, 10], help="k values for the sparse part (first = reference)")
    parser.add_argument("--part", choices=["regions", "sparse", "both"], default="both")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("regions", "both"):
        bench_regions(args)
    if args.part in ("sparse", "both"):
        bench_sparse(args)


if __name__ == "__main__":
    main()
