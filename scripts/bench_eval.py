"""Benchmark and cross-check ``unet eval`` against MONAI's metrics on the same cases.

Synthetic mode (default): writes N seeded cases (default 100 of 160x160x128, 3 nested blobby
classes, anisotropic spacing, predictions with smooth boundary shifts, spurious blobs and the
occasional missed class) as NIfTI files once (not timed), then times

* ours: ``unetcli.evaluation.scoring.evaluate`` with ``--jobs`` worker processes, end to end
  (reading both files of every case, all 9 metrics, 3 classes);
* MONAI: ``DiceMetric``, ``compute_hausdorff_distance(percentile=95)``,
  ``compute_average_surface_distance(symmetric=True)`` and ``compute_surface_dice`` on the same
  label maps, already in memory (reading and one-hot conversion not timed), in this process
  (MONAI works case by case; torch may use several threads).

With ``--monai-cases K`` MONAI runs on the first K cases only and its time for N cases is
extrapolated linearly (the output says so). Prints the machine, both times, their ratio and the
max |ours - MONAI| per metric over the cases MONAI ran on (values that are non-finite in both
count as agreeing: ours NaN where MONAI gives inf/NaN for an empty mask).

Real-data mode: ``--pred DIR --truth DIR`` compares our per-case Dice, HD95, ASSD and NSD with
MONAI's on existing files (PNG or NIfTI) instead of generating cases.

    python scripts/bench_eval.py --cases 100 --jobs 2 --json bench_eval.json
    python scripts/bench_eval.py --pred unet-demo/predictions --truth unetcli/demo_data/mni_tissue_2d/test/masks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchlib.machine import cpu_model

MONAI_METRICS = ("dice", "hd95", "assd", "nsd")


# --------------------------------------------------------------------------- synthetic cases


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse Gaussian noise upsampled with cubic splines to a
    quarter of the resolution, then linearly to full resolution (fast, and smooth enough)."""
    coarse = rng.standard_normal(cells)
    quarter = tuple(max(c, s // 4) for s, c in zip(shape, cells))
    mid = ndimage.zoom(coarse, [q / c for q, c in zip(quarter, cells)], order=3, grid_mode=True, mode="nearest")
    return ndimage.zoom(mid, [s / q for s, q in zip(shape, quarter)], order=1, grid_mode=True, mode="nearest")


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) uint8 label maps with nested classes 1 > 2 > 3 (like tumour regions)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n * rng.uniform(0.4, 0.6) for n in shape]
    radii = [n * rng.uniform(0.2, 0.3) for n in shape]
    r = np.sqrt(sum(((g - c) / rad) ** 2 for g, c, rad in zip(grid, centre, radii)))
    cells = tuple(max(3, n // 20) for n in shape)
    field = (1.0 - r) + 0.25 * _smooth_noise(rng, shape, cells)
    thresholds = (0.0, 0.35, 0.6)
    truth = np.zeros(shape, np.uint8)
    for label, t in enumerate(thresholds, start=1):
        truth[field > t] = label
    # Prediction: boundaries shifted by a smooth perturbation, plus the odd spurious blob or missed class.
    pred_field = field + rng.uniform(0.03, 0.12) * _smooth_noise(rng, shape, tuple(max(3, n // 10) for n in shape))
    pred = np.zeros(shape, np.uint8)
    for label, t in enumerate(thresholds, start=1):
        pred[pred_field > t + rng.normal(0, 0.02)] = label
    if rng.random() < 0.3:  # a false-positive blob of class 1 away from the object
        c = [int(n * rng.uniform(0.1, 0.9)) for n in shape]
        rad = int(rng.integers(3, 8))
        sl = tuple(slice(max(ci - rad, 0), min(ci + rad, n)) for ci, n in zip(c, shape))
        pred[sl] = np.where(pred[sl] == 0, 1, pred[sl])
    if rng.random() < 0.05:  # class 3 missed entirely (one mask empty: distances NaN)
        pred[pred == 3] = 2
    return pred, truth


def write_cases(root: Path, n: int, shape: tuple[int, int, int], spacing: tuple[float, ...], seed: int) -> tuple[Path, Path]:
    import nibabel as nib

    pred_dir, truth_dir = root / "pred", root / "truth"
    pred_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pred, truth = make_case(rng, shape)
        for folder, data in ((pred_dir, pred), (truth_dir, truth)):
            img = nib.Nifti1Image(data, affine)
            img.header.set_zooms(spacing)
            nib.save(img, str(folder / f"case_{i:03d}.nii.gz"))
    return pred_dir, truth_dir


# --------------------------------------------------------------------------- MONAI


def monai_case(pred: np.ndarray, truth: np.ndarray, labels: list[int], spacing, tolerance: float
               ) -> tuple[dict[str, np.ndarray], float, float]:
    """MONAI's per-class values, and the wall and CPU seconds of the four metric calls (one-hot not timed)."""
    import torch
    from monai.metrics import DiceMetric, compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    def onehot(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.stack([x == c for c in [0, *labels]])[None].astype(np.float32))

    yp, yt = onehot(pred), onehot(truth)
    sp = list(spacing) if spacing is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start, cpu_start = time.perf_counter(), time.process_time()
        out = {
            "dice": DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yt),
            "hd95": compute_hausdorff_distance(yp, yt, percentile=95, spacing=sp),
            "assd": compute_average_surface_distance(yp, yt, symmetric=True, spacing=sp),
            "nsd": compute_surface_dice(yp, yt, class_thresholds=[tolerance] * len(labels), spacing=sp),
        }
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {k: v.detach().cpu().numpy().reshape(-1).astype(np.float64) for k, v in out.items()}, seconds, cpu


def agreement(result, pairs_kind: str, labels: list[int], tolerance: float, limit: int | None) -> tuple[dict, float, int]:
    """Max |ours - MONAI| per metric over the first ``limit`` cases; MONAI seconds; cases run."""
    from unetcli.evaluation.cases import read_pair

    worst = {m: 0.0 for m in MONAI_METRICS}
    nonfinite_mismatch = {m: 0 for m in MONAI_METRICS}
    compared = {m: 0 for m in MONAI_METRICS}
    seconds = cpu = 0.0
    absent = 0
    pairs = result.pairs[:limit] if limit else result.pairs
    # MONAI's lazy imports and first-call set-up (seconds) are not timed: one untimed call on the first case.
    pred, truth, spacing = read_pair(pairs[0], pairs_kind, result.spacings.get(pairs[0].name))
    monai_case(pred, truth, labels, spacing, tolerance)
    names = {str(lab): result.classes[i] for i, lab in enumerate(labels)}
    by_case = {(r["case"], r["class"]): r for r in result.rows}
    for pair in pairs:
        pred, truth, spacing = read_pair(pair, pairs_kind, result.spacings.get(pair.name))
        ref, s, c = monai_case(pred, truth, labels, spacing, tolerance)
        seconds += s
        cpu += c
        for i, lab in enumerate(labels):
            row = by_case[(pair.name, names[str(lab)])]
            if not (np.any(pred == lab) or np.any(truth == lab)):
                absent += 1  # both empty: ours NaN by convention, MONAI Dice 1 / distances NaN
                continue
            for m in MONAI_METRICS:
                ours, theirs = float(row[m]), float(ref[m][i])
                if np.isfinite(ours) and np.isfinite(theirs):
                    worst[m] = max(worst[m], abs(ours - theirs))
                    compared[m] += 1
                elif np.isfinite(ours) != np.isfinite(theirs):
                    nonfinite_mismatch[m] += 1
    return ({"max_abs_diff": worst, "values_compared": compared, "finiteness_mismatches": nonfinite_mismatch,
             "class_absent_in_both_skipped": absent, "monai_cpu_seconds": cpu}, seconds, len(pairs))


# --------------------------------------------------------------------------- main


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished child processes (the workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> dict[str, object]:
    """Versions and cores. torch/MONAI are imported after our timing: with torch imported, worker
    processes would start with forkserver instead of fork (see report._start_method), which is
    not what `unet eval` does."""
    import importlib.metadata as md

    import scipy

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = cpu_model()
    versions = {}
    for package in ("torch", "monai"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "usable_cores": cores, "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__, **versions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--shape", default="160,160,128")
    ap.add_argument("--spacing", default="0.8,0.8,2.0", help="voxel size of the generated cases (mm)")
    ap.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance (mm)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--monai-cases", type=int, default=None, help="run MONAI on the first K cases only (extrapolated)")
    ap.add_argument("--monai-threads", type=int, default=1,
                    help="torch threads for MONAI (default 1: its work is serial, and 2 threads on 2 busy cores "
                         "were measured ~3x slower from thread contention)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the generated cases here (default: a temp dir)")
    ap.add_argument("--pred", type=Path, help="real-data mode: prediction folder")
    ap.add_argument("--truth", type=Path, help="real-data mode: reference folder")
    ap.add_argument("--labels", default="1,2,3", help="labels to compare (real-data mode default: every label found)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from unetcli.evaluation.scoring import evaluate

    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    report: dict[str, object] = {"machine": info}

    if args.pred or args.truth:
        if not (args.pred and args.truth):
            ap.error("--pred and --truth go together")
        labels = None if args.labels == "1,2,3" else [int(v) for v in args.labels.split(",")]
        start = time.perf_counter()
        result = evaluate(args.pred, args.truth, labels=labels, tolerance_mm=args.tolerance, jobs=args.jobs)
        ours_s = time.perf_counter() - start
        labels = [int(g[0]) for g in result.groups.values()]
        import torch

        torch.set_num_threads(args.monai_threads)
        agree, monai_s, n = agreement(result, result.kind, labels, args.tolerance, args.monai_cases)
        print(f"real data: {n} case(s) x {len(labels)} class(es) from {args.pred} vs {args.truth}")
        print(f"ours (evaluate, jobs={args.jobs}, reading included): {ours_s:.2f} s; MONAI metric calls: {monai_s:.2f} s")
        for m in MONAI_METRICS:
            print(f"  {m:5s} max |ours - MONAI| = {agree['max_abs_diff'][m]:.3g} over {agree['values_compared'][m]} values; "
                  f"finiteness mismatches: {agree['finiteness_mismatches'][m]}")
        report.update({"mode": "real", "pred": str(args.pred), "truth": str(args.truth), "cases": n,
                       "ours_seconds": ours_s, "monai_seconds": monai_s, **agree})
    else:
        shape = tuple(int(v) for v in args.shape.split(","))
        spacing = tuple(float(v) for v in args.spacing.split(","))
        labels = [int(v) for v in args.labels.split(",")]
        with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
            root = args.keep or Path(tmp)
            start = time.perf_counter()
            marker = root / f"cases-{args.cases}-{'x'.join(map(str, shape))}-{args.spacing}-{args.seed}.done"
            if marker.exists():  # --keep DIR from an earlier run with the same settings
                pred_dir, truth_dir = root / "pred", root / "truth"
                print(f"reusing the {args.cases} cases in {root}")
            else:
                pred_dir, truth_dir = write_cases(root, args.cases, shape, spacing, args.seed)
                marker.write_text("")
                print(f"generated {args.cases} cases of {shape}, spacing {spacing} mm, labels {labels} "
                      f"in {time.perf_counter() - start:.1f} s (not timed below)")
            gen_s = time.perf_counter() - start
            cpu_before = _cpu_seconds()
            start = time.perf_counter()
            result = evaluate(pred_dir, truth_dir, labels=labels, tolerance_mm=args.tolerance, jobs=args.jobs)
            ours_s = time.perf_counter() - start
            ours_cpu = _cpu_seconds() - cpu_before
            agree, monai_s, n_monai = agreement(result, "nifti", labels, args.tolerance, args.monai_cases)
        import torch

        torch.set_num_threads(args.monai_threads)
        info["torch_threads_for_monai"] = torch.get_num_threads()
        monai_total = monai_s * args.cases / n_monai
        extrapolated = n_monai < args.cases
        print(f"ours : {ours_s:7.1f} s for {args.cases} cases (evaluate, jobs={args.jobs}: reading + 9 metrics x "
              f"{len(labels)} classes; {ours_s / args.cases:.2f} s/case wall)")
        print(f"       CPU time of all our processes {ours_cpu:.1f} s -> {ours_cpu / args.jobs:.1f} s on {args.jobs} "
              f"otherwise idle cores (load average now {os.getloadavg()[0]:.1f}: other work shares these cores)")
        print(f"MONAI: {monai_total:7.1f} s for {args.cases} cases (Dice, HD95, ASSD, NSD on in-memory arrays, 1 process, "
              f"{info['torch_threads_for_monai']} torch threads"
              + (f"; measured on {n_monai} cases, {monai_s:.1f} s, extrapolated linearly)" if extrapolated else ")"))
        monai_cpu_per_case = agree["monai_cpu_seconds"] / n_monai
        print(f"       CPU time {monai_cpu_per_case:.2f} s/case (ours: {ours_cpu / args.cases:.2f} s/case incl. reading)")
        cpu_ratio = monai_cpu_per_case * args.cases / ours_cpu
        print(f"ratio MONAI / ours: {monai_total / ours_s:.2f}x wall, {cpu_ratio:.2f}x CPU; target: 100 cases in < 60 s "
              f"-> ours scaled to 100 cases: {ours_s * 100 / args.cases:.1f} s")
        print(f"agreement on {n_monai} cases x {len(labels)} classes:")
        for m in MONAI_METRICS:
            print(f"  {m:5s} max |ours - MONAI| = {agree['max_abs_diff'][m]:.3g} over {agree['values_compared'][m]} values; "
                  f"finiteness mismatches: {agree['finiteness_mismatches'][m]}")
        report.update({"mode": "synthetic", "cases": args.cases, "shape": shape, "spacing": spacing, "labels": labels,
                       "jobs": args.jobs, "generate_seconds": gen_s, "ours_seconds": ours_s, "ours_cpu_seconds": ours_cpu,
                       "load_average_after": os.getloadavg()[0],
                       "monai_seconds_measured": monai_s, "monai_cases": n_monai, "monai_seconds_for_all": monai_total,
                       "monai_extrapolated": extrapolated, **agree})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
