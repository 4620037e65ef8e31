"""Time to Dice on the shipped 2D demo: seconds of training until held-out Dice first reaches the
no-learning threshold baseline, unetcli's defaults against MONAI trained the usual way.

Both run in this process on the same data (the 40 training slices of ``mni_tissue_2d``, scored
on the 15 held-out slices after every evaluation interval; scoring time is not counted):

- ours: ``unet demo``'s configuration through the real trainer (``unetcli.training.trainer.train``:
  U-Net 16-32-64-128, batch norm, AdamW + warm-up + poly, CE + Dice, flips/rotations, ``--precision
  auto`` + channels_last); held-out Dice is computed from ``last.pt`` after every epoch.
- MONAI: ``monai.networks.nets.UNet`` (channels 16..256, strides 2, 2 residual units, the
  tutorials' configuration) + ``monai.losses.DiceCELoss(to_onehot_y, softmax)``, Adam 1e-3, batch
  8 of whole slices with random flips, fp32; held-out Dice every ``--eval-every`` iterations.

MONAI runs after ours, in the same process, and so also with the glibc heap reuse that ``unet
train`` switches on (``unetcli.runtime.configure_cpu_allocator``): that can only make MONAI
faster, so the ratio is conservative.

The target is the mean foreground Dice of multi-Otsu thresholding inside the brain (GM, WM) on the
same held-out slices. Ratio = MONAI's time to target / ours. A run that does not reach the target
within ``--budget`` seconds is reported with its best Dice.

    python scripts/bench_time_to_dice.py --budget 300 --json ttd.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib.machine import load_note, machine_info, print_machine, print_table, with_peak_rss, write_json
from skimage.filters import threshold_multiotsu

from unetcli.config import DataConfig, RunConfig, apply_overrides
from unetcli.data.dataset import discover_dataset, load_dataset
from unetcli.inference.predict import load_trained_model
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.training.trainer import train
from unetcli.workflows.demo import DEMOS, demo_data_dir


def foreground_dice(preds: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mean over classes 1, 2 of the per-slice mean Dice (as ``unet eval`` reports it)."""
    per_class = []
    for k in (1, 2):
        scores = []
        for p, t in zip(preds, truths):
            denom = (p == k).sum() + (t == k).sum()
            if denom:
                scores.append(2 * ((p == k) & (t == k)).sum() / denom)
        per_class.append(np.mean(scores))
    return float(np.mean(per_class))


def threshold_baseline(images: list[np.ndarray], truths: list[np.ndarray]) -> float:
    preds = []
    for image in images:
        pred = np.zeros(image.shape, np.int64)
        brain = image > 0
        t1, t2 = threshold_multiotsu(image[brain], classes=3)
        pred[brain & (image > t1)] = 1
        pred[brain & (image > t2)] = 2
        preds.append(pred)
    return foreground_dice(preds, truths)


def held_out(data: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    files = discover_dataset(data / "test")
    normalised = load_dataset(files, DataConfig())
    from unetcli.data.png import read_png_image

    raw = [read_png_image(c.images[0])[0] for c in files.cases]
    return [c.image for c in normalised.cases], [c.label for c in normalised.cases], raw  # type: ignore[misc]


def run_ours(data: Path, images, truths, target: float, budget: float, out: Path) -> dict:
    cfg = apply_overrides(RunConfig(), DEMOS["2d"].overrides)
    # As many epochs as fit the budget; the schedule is planned for the demo's length.
    curve: list[tuple[float, float]] = []
    excluded = [0.0]

    def on_epoch(record: dict) -> None:
        tick = time.perf_counter()
        loaded = load_trained_model(out, torch.device("cpu"), which="last")
        preds = [sliding_window_predict(loaded.model, im, loaded.metadata["patch_size"], 3).argmax(0).numpy() for im in images]
        curve.append((record["elapsed_seconds"] - excluded[0], foreground_dice(preds, truths)))
        excluded[0] += time.perf_counter() - tick
        print(f"  ours  {curve[-1][0]:7.1f} s  held-out Dice {curve[-1][1]:.4f}", flush=True)

    train(data / "train", cfg, out, progress=False, on_epoch=on_epoch)
    return summarise("unetcli defaults (demo config)", curve, target)


def run_monai(data: Path, images, truths, target: float, budget: float, eval_every: int, seed: int = 0) -> dict:
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set = load_dataset(discover_dataset(data / "train"), DataConfig())
    xs = np.stack([c.image for c in train_set.cases]).astype(np.float32)
    ys = np.stack([c.label for c in train_set.cases])
    net = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    curve: list[tuple[float, float]] = []
    trained, iteration = 0.0, 0
    while trained < budget:
        tick = time.perf_counter()
        net.train()
        for _ in range(eval_every):
            idx = rng.integers(0, len(xs), 8)
            x, y = xs[idx].copy(), ys[idx].copy()
            for axis in (2, 3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis - 1)
            x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))[:, None]
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            iteration += 1
        trained += time.perf_counter() - tick
        net.eval()
        with torch.no_grad():
            preds = [net(torch.from_numpy(im)[None]).argmax(1)[0].numpy() for im in images]
        curve.append((trained, foreground_dice(preds, truths)))
        print(f"  MONAI {trained:7.1f} s  held-out Dice {curve[-1][1]:.4f}  (iteration {iteration})", flush=True)
        if curve[-1][1] >= target:
            break
    return summarise("MONAI UNet + DiceCELoss, Adam, fp32", curve, target)


def summarise(name: str, curve: list[tuple[float, float]], target: float) -> dict:
    reached = next((t for t, d in curve if d >= target), None)
    return {"name": name, "curve": curve, "seconds_to_target": reached, "best_dice": max(d for _, d in curve)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0,
                        help="training seconds allowed to MONAI (default 240, so that a run stays within about 10 minutes;"
                             " docs/benchmarks.md used 300)")
    parser.add_argument("--eval-every", type=int, default=40, help="MONAI iterations between held-out evaluations")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    info = machine_info(torch.device("cpu"))
    print_machine(info)
    print(load_note())
    data = demo_data_dir("2d")
    images, truths, raw = held_out(data)
    target = threshold_baseline(raw, truths)
    print(f"target: multi-Otsu threshold baseline, held-out mean foreground Dice {target:.4f}\n")
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours["peak_rss_increment_mib"] = with_peak_rss(
            lambda: run_ours(data, images, truths, target, args.budget, Path(tmp) / "run"))
    monai, monai["peak_rss_increment_mib"] = with_peak_rss(
        lambda: run_monai(data, images, truths, target, args.budget, args.eval_every))
    rows = []
    for r in (ours, monai):
        reached = f"{r['seconds_to_target']:.0f}" if r["seconds_to_target"] is not None else f"not in {r['curve'][-1][0]:.0f} s"
        rows.append([r["name"], reached, f"{r['best_dice']:.4f}", f"{r['peak_rss_increment_mib']:+,.0f}"])
    print()
    print_table(["", f"seconds to Dice {target:.3f}", "best held-out Dice", "peak RSS incr MiB"], rows)
    if ours["seconds_to_target"] and monai["seconds_to_target"]:
        print(f"ratio (MONAI / ours): {monai['seconds_to_target'] / ours['seconds_to_target']:.2f}x")
    elif ours["seconds_to_target"]:
        print(f"ratio (MONAI / ours): > {monai['curve'][-1][0] / ours['seconds_to_target']:.2f}x (MONAI did not reach the target)")
    if args.json:
        write_json(args.json, {"machine": info, "target": target, "ours": ours, "monai": monai})


if __name__ == "__main__":
    main()
