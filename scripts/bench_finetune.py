#!/usr/bin/env python
"""Fine-tuning against training from scratch: iterations until held-out Dice reaches a target.

1. Pretrain: the 3-class tissue model (background/CSF, grey matter, white matter) on the 40
   shipped training slices of ``mni_tissue_2d`` (U-Net ``--features``, default 8-16-32-64, random
   ``--patch`` crops, default 128x128, ``--pretrain-epochs`` x ``--pretrain-iterations`` steps of
   batch 8: small enough to run in a few minutes on 2 cores without bf16).
2. A task with another class count, built by ``scripts/prepare_finetune_demo.py`` from the same
   shipped slices: 2 classes (background/CSF, brain = grey + white matter).
3. Two arms train on it with the same config, seed, split and budget (``--epochs`` x
   ``--iterations`` steps of batch 8, warm-up ``--warmup`` steps): ``scratch`` (random
   initialisation) and ``init`` (``train.init`` = the pretrained run: every tensor loaded except
   the head, which is re-initialised for 2 classes).

After every epoch both arms are scored on the 15 held-out slices (z = 90..118, never trained on
by any of the three runs; Dice of the brain class from ``last.pt``, fp32 sliding window; scoring
time is not counted). The validation Dice the trainer itself logs (its seeded validation split of
the training slices) is printed too. The figure of merit is the number of training iterations
until held-out Dice first reaches a target: each of ``--targets``, and the held-out Dice the
scratch arm ends its budget with; ratio = scratch / init.

    python scripts/bench_finetune.py --num-threads 2 --json finetune.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib.finetune_data import LABEL_NAMES, build
from benchlib.machine import load_note, machine_info, print_machine, print_table, write_json

from unetcli.config import DataConfig, RunConfig, apply_overrides
from unetcli.data.dataset import discover_dataset, load_dataset
from unetcli.inference.predict import load_trained_model
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.training.trainer import train
from unetcli.workflows.demo import demo_data_dir, demo_label_names


def brain_dice(preds: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """Mean over slices of the Dice of class 1."""
    return float(np.mean([2 * ((p == 1) & (t == 1)).sum() / max(1, (p == 1).sum() + (t == 1).sum()) for p, t in zip(preds, truths)]))


def config(args: argparse.Namespace, **overrides: object) -> RunConfig:
    base = {"model.features": [int(v) for v in args.features.split(",")], "train.patch_size": [int(v) for v in args.patch.split(",")],
            "train.precision": args.precision, "train.num_threads": args.num_threads, "train.seed": args.seed, "train.num_workers": 0}
    return apply_overrides(RunConfig(), {**base, **overrides})


def run_arm(name: str, data: Path, cfg: RunConfig, out: Path, held_out: tuple[list, list]) -> dict:
    images, truths = held_out
    rows: list[dict] = []
    scoring = [0.0]

    def on_epoch(record: dict) -> None:
        tick = time.perf_counter()
        loaded = load_trained_model(out, torch.device("cpu"), which="last")
        preds = [sliding_window_predict(loaded.model, im, loaded.metadata["patch_size"], 2).argmax(0).numpy() for im in images]
        rows.append({"epoch": record["epoch"], "iteration": record["iteration"], "val_dice": record["val_dice_mean"],
                     "held_out_dice": brain_dice(preds, truths), "seconds": record["elapsed_seconds"] - scoring[0]})
        scoring[0] += time.perf_counter() - tick
        print(f"  {name:7s} epoch {record['epoch']:2d}  iteration {record['iteration']:4d}  validation Dice "
              f"{record['val_dice_mean']:.4f}  held-out Dice {rows[-1]['held_out_dice']:.4f}", flush=True)

    train(data / "train", cfg, out, progress=False, on_epoch=on_epoch)
    return {"name": name, "epochs": rows}


def iterations_to(rows: list[dict], target: float) -> int | None:
    return next((r["iteration"] for r in rows if r["held_out_dice"] >= target), None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default="8,16,32,64", help="U-Net channels per level")
    parser.add_argument("--patch", default="128,128", help="training crop (rows, columns)")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--pretrain-iterations", type=int, default=20, help="steps per pretraining epoch")
    parser.add_argument("--epochs", type=int, default=16, help="epochs of each fine-tuning arm")
    parser.add_argument("--iterations", type=int, default=5, help="steps per fine-tuning epoch (the resolution of the result)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps of each arm")
    parser.add_argument("--targets", default="0.95,0.97,0.98", help="held-out brain Dice values to reach")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.num_threads)
    info = machine_info(torch.device("cpu"))
    print_machine(info)
    print(load_note())
    with tempfile.TemporaryDirectory() as tmp:
        data = build(Path(tmp) / "data")
        test = load_dataset(discover_dataset(data / "test"), DataConfig())
        held_out = ([c.image for c in test.cases], [c.label for c in test.cases])
        pretrained = Path(tmp) / "pretrained"
        tick = time.perf_counter()
        train(demo_data_dir("2d") / "train", config(args, **{
            "train.epochs": args.pretrain_epochs, "train.iterations_per_epoch": args.pretrain_iterations,
            "data.label_names": demo_label_names("2d")}), pretrained, progress=False)
        pretrain_seconds = time.perf_counter() - tick
        print(f"pretrained the 3-class tissue model: {args.pretrain_epochs * args.pretrain_iterations} iterations, "
              f"{pretrain_seconds:.0f} s\n")
        arm = {"train.epochs": args.epochs, "train.iterations_per_epoch": args.iterations,
               "train.warmup_iterations": args.warmup, "data.label_names": LABEL_NAMES}
        arms = [run_arm(name, data, config(args, **arm, **extra), Path(tmp) / name, held_out)
                for name, extra in (("scratch", {}), ("init", {"train.init": str(pretrained)}))]
    report(args, info, arms, pretrain_seconds)


def report(args: argparse.Namespace, info: dict, arms: list[dict], pretrain_seconds: float) -> None:
    scratch, init = (a["epochs"] for a in arms)
    print()
    print_table(["epoch", "iterations", "scratch: validation", "scratch: held-out", "init: validation", "init: held-out"],
                [[s["epoch"], s["iteration"], f"{s['val_dice']:.4f}", f"{s['held_out_dice']:.4f}", f"{i['val_dice']:.4f}",
                  f"{i['held_out_dice']:.4f}"] for s, i in zip(scratch, init)])
    targets = [(f"{t:.3f}", t) for t in map(float, args.targets.split(","))]
    targets.append((f"{scratch[-1]['held_out_dice']:.4f} (scratch's final)", scratch[-1]["held_out_dice"]))
    rows, reached = [], {}
    for label, target in targets:
        n = {a["name"]: iterations_to(a["epochs"], target) for a in arms}
        reached[label] = n
        ratio = f"{n['scratch'] / n['init']:.1f}x" if n["scratch"] and n["init"] else "-"
        rows.append([label] + [str(n[k]) if n[k] is not None else f"not in {scratch[-1]['iteration']}" for k in ("scratch", "init")]
                    + [ratio])
    print("\niterations until held-out brain Dice first reaches the target:")
    print_table(["target", "scratch", "init", "scratch / init"], rows)
    print(load_note())
    if args.json:
        write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "pretrain_seconds": pretrain_seconds,
                               "arms": arms, "iterations_to_target": reached})


if __name__ == "__main__":
    main()
