"""Plain vs residual encoder (nnU-Net's ResEnc blocks) on the data shipped with unetcli.

Runs ``unet demo`` (2D: MNI tissue slices; 3D: Colin27 lobes) once with the plain encoder and once
with ``model.encoder=residual`` (1, 3, 4, 6 residual blocks per level, one convolution per decoder
block), same budget, seed and everything else, one after the other, and prints parameters,
seconds per training step and held-out mean foreground Dice.

    python scripts/bench_resenc.py --out /tmp/bench_resenc [--kinds 2d,3d] [--epochs N]

By default it runs the 2D demo only, at half its budget (4 epochs), so that it finishes within
about 10 minutes on 2 CPU cores; ``--kinds 2d --epochs 8`` is the 2D demo's own budget (the
figures in docs/benchmarks.md), ``--kinds 2d,3d --epochs 0`` each demo's own budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchlib.runs import epoch_records, unet

from unetcli.config import apply_overrides, config_from_dict
from unetcli.models import build_model, count_parameters
from unetcli.workflows.demo import DEMOS, demo_data_dir

ENCODERS = {"plain": [], "residual": ["--set", "model.encoder=residual"]}


def parameters(kind: str, encoder: str) -> int:
    cfg = apply_overrides(config_from_dict({}), {**DEMOS[kind].overrides, "model.encoder": encoder})
    channels = {"2d": (2, 1, 4), "3d": (3, 1, 9)}[kind]
    cfg.model.spatial_dims, cfg.model.in_channels, cfg.model.out_channels = channels
    return count_parameters(build_model(cfg.model))


def run_demo(kind: str, encoder: str, out: Path, epochs: int | None) -> dict[str, float]:
    folder = out / f"{kind}_{encoder}"
    unet("demo", "--out", folder, "--overwrite", "--seed", 0, *(["--3d"] if kind == "3d" else []),
         *(["--epochs", epochs] if epochs else []), *ENCODERS[encoder], quiet=False)
    records = epoch_records(folder)
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    steps = sum(r["epoch_seconds"] for r in records)
    per_epoch = apply_overrides(config_from_dict({}), DEMOS[kind].overrides).train.iterations_per_epoch
    return {"dice": summary["foreground_mean"]["dice"], "s_per_step": steps / (len(records) * per_epoch),
            "train_s": steps, "iterations": len(records) * per_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_resenc_out"))
    parser.add_argument("--kinds", default="2d", help="demos to run, comma-separated: 2d, 3d (default 2d)")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run (default 4: half the 2D demo's budget); 0: each demo's own budget")
    args = parser.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        demo_data_dir(kind)  # fails early if the data is missing
        for encoder in ENCODERS:
            result = run_demo(kind, encoder, args.out, args.epochs)
            rows.append((kind, encoder, parameters(kind, encoder), result))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; each demo's budget and seed")
    print("| data | encoder | parameters | s / step | held-out mean foreground Dice |\n|---|---|---|---|---|")
    for kind, encoder, params, r in rows:
        print(f"| {DEMOS[kind].folder} | {encoder} | {params / 1e6:.2f} M | {r['s_per_step']:.3f} | {r['dice']:.4f} |")


if __name__ == "__main__":
    main()
