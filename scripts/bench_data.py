"""Data pipeline benchmark: the preprocessing cache and the patch loader, against decoding on every step.

What is measured, in one process, on the same synthetic NIfTI dataset (seeded, written once to a
temporary folder; writing is not timed):

1. Preprocessing cache: ``load_volume_dataset`` with an empty cache (decode, reorient, crop,
   resample, normalise, write ``.npy``) against the same call with the cache warm (checks file
   stamps and memory-maps the arrays). Ratio = cold / warm.
2. Loader throughput (batches/s) of unetcli's ``PatchSampler`` on the memory-mapped cache
   (in-process, and with ``--workers`` processes), against the naive reference that decodes
   the ``.nii.gz`` of a random case on every step (nibabel), normalises it and cuts a patch.
3. The training step's consumption (steps/s) of the default 3D U-Net at the same patch and
   batch size, so the loader rate can be read against what the model actually needs.

Read the ratios, not the absolute numbers: other processes on the machine slow everything.

    python scripts/bench_data.py                 # 6 cases of 160x160x128, patch 64^3, batch 2
    python scripts/bench_data.py --cases 4 --shape 96,96,64 --json data.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from benchlib.machine import load_note, machine_info, print_machine, print_table, with_peak_rss, write_json

from unetcli.config import DataConfig, RunConfig, apply_overrides
from unetcli.data.augment import IntensityAugmentation, resolve_augmentation
from unetcli.data.dataset import discover_dataset
from unetcli.data.sampling import PatchSampler, iterate_batches
from unetcli.data.volumes import load_volume_dataset
from unetcli.models import build_model
from unetcli.training.losses import DiceCELoss


def make_dataset(root: Path, cases: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """nnU-Net-layout dataset of smooth random volumes with a 3-class label map."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.indices(shape, dtype=np.float32)
    for i in range(cases):
        centre = rng.uniform(0.3, 0.7, 3)[:, None, None, None] * np.asarray(shape)[:, None, None, None]
        radius = ((grid - centre) ** 2).sum(0) ** 0.5
        label = np.where(radius < shape[0] * 0.15, 1, np.where(radius < shape[0] * 0.3, 2, 0)).astype(np.uint8)
        image = (label * 40 + rng.normal(100, 15, shape)).astype(np.float32)
        affine = np.diag([1.0, 1.0, 1.2, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"case{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"case{i:03d}.nii.gz"))
    return root


def rate(fn, seconds: float, min_calls: int = 3) -> float:
    """Calls per second of ``fn`` over at least ``seconds`` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", default="160,160,128")
    parser.add_argument("--patch", default="64,64,64")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per loader measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    patch = tuple(int(v) for v in args.patch.split(","))

    info = machine_info(torch.device("cpu"))
    print_machine(info)
    print(load_note())
    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}

    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "data", args.cases, shape)
        files = discover_dataset(root)
        cfg = DataConfig(cache_dir=str(Path(tmp) / "cache"))
        def timed_load() -> tuple[object, float]:
            start = time.perf_counter()
            loaded = load_volume_dataset(files, cfg)
            return loaded, time.perf_counter() - start

        (_, cold), cold_rss = with_peak_rss(timed_load)
        (dataset, warm), warm_rss = with_peak_rss(timed_load)
        print(f"\npreprocessing {args.cases} cases of {shape}")
        print_table(["", "seconds", "ratio", "peak RSS incr MiB"],
                    [["cold cache (decode + preprocess + write)", f"{cold:.2f}", "", f"{cold_rss:+,.0f}"],
                     ["warm cache (stamps + memory-map)", f"{warm:.3f}", f"{cold / warm:.0f}x", f"{warm_rss:+,.0f}"]])
        results["cache"] = {"cold_s": cold, "warm_s": warm, "speedup": cold / warm,
                            "cold_peak_rss_increment_mib": cold_rss, "warm_peak_rss_increment_mib": warm_rss}

        rng = np.random.default_rng(0)
        paths = [(c.images[0], c.label) for c in files.cases]

        def decode_each_step() -> None:
            # The reference: what a loader without a cache does on every step.
            for _ in range(args.batch):
                img_path, lab_path = paths[int(rng.integers(len(paths)))]
                image = np.asanyarray(nib.load(str(img_path)).dataobj).astype(np.float32)
                label = np.asanyarray(nib.load(str(lab_path)).dataobj)
                image = (image - image.mean()) / image.std()
                s = [int(rng.integers(0, d - p + 1)) for d, p in zip(image.shape, patch)]
                window = tuple(slice(a, a + p) for a, p in zip(s, patch))
                torch.from_numpy(np.ascontiguousarray(image[window])), torch.from_numpy(np.ascontiguousarray(label[window]))

        sampler = PatchSampler(dataset.cases, patch, args.batch, num_classes=dataset.num_classes, seed=0)
        position = iter(range(10**9))
        ours_inproc, ours_rss = with_peak_rss(lambda: rate(lambda: sampler.batch(next(position)), args.seconds))
        # The 3D default augmentation (the 'scanner' preset: nnU-Net's intensity changes + bias field, on tensors).
        aug = RunConfig().train
        resolve_augmentation(aug, 3)
        augmented = PatchSampler(dataset.cases, patch, args.batch, num_classes=dataset.num_classes, seed=0,
                                 rotate_scale_prob=aug.rotate_scale_prob, intensity_jitter=aug.intensity_jitter,
                                 intensity=IntensityAugmentation.from_config(aug))
        ours_augmented = rate(lambda: augmented.batch(next(position)), args.seconds)
        reference, reference_rss = with_peak_rss(lambda: rate(decode_each_step, args.seconds))
        stream = iterate_batches(sampler, 0, 10**9, num_workers=args.workers)
        next(stream)  # start the workers
        ours_workers = rate(lambda: next(stream), args.seconds)

        cfg_model = apply_overrides(RunConfig(), {"model.spatial_dims": 3, "model.in_channels": 1, "model.out_channels": 3,
                                                  "model.features": [16, 32, 64, 128]})
        model = build_model(cfg_model.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        loss_fn = DiceCELoss(include_background=False)
        x, y = sampler.batch(0)

        def step() -> None:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        consumption = rate(step, args.seconds, min_calls=2)
        print(f"\nloader, batch {args.batch} x patch {patch} (batches/s)")
        print_table(["", "batches/s", "vs decode every step", "peak RSS incr MiB"], [
            ["decode .nii.gz every step (reference)", f"{reference:.2f}", "1.0x", f"{reference_rss:+,.0f}"],
            ["unetcli sampler on the cache, in-process", f"{ours_inproc:.1f}", f"{ours_inproc / reference:.0f}x", f"{ours_rss:+,.0f}"],
            ["same + 3D default augmentation ('scanner' preset), in-process", f"{ours_augmented:.1f}",
             f"{ours_augmented / reference:.0f}x", ""],
            [f"unetcli sampler, {args.workers} worker processes", f"{ours_workers:.1f}", f"{ours_workers / reference:.0f}x",
             "(in the workers)"],
            ["3D U-Net 16-32-64-128 training step (consumption)", f"{consumption:.2f}", "", ""],
        ])
        print(f"loader / consumption: {ours_inproc / consumption:.0f}x in-process "
              f"({'never' if ours_inproc > consumption else 'sometimes'} waits on data); with the 3D default augmentation "
              f"{ours_augmented / consumption:.1f}x, i.e. {100 * consumption / ours_augmented:.0f} % of a step's time "
              f"when built in-process ({'hidden' if args.workers else 'not hidden'} by worker processes)")
        results["loader"] = {"reference_batches_per_s": reference, "inprocess_batches_per_s": ours_inproc,
                             "workers_batches_per_s": ours_workers,
                             "augmented_inprocess_batches_per_s": ours_augmented, "train_steps_per_s": consumption,
                             "speedup_inprocess": ours_inproc / reference, "speedup_workers": ours_workers / reference,
                             "reference_peak_rss_increment_mib": reference_rss, "inprocess_peak_rss_increment_mib": ours_rss}
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
