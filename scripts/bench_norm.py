#!/usr/bin/env python
"""Cost of the normalisation layer in a training step: PyTorch's instance norm, ours, batch norm.

The planned 3D U-Nets use instance norm (nnU-Net's choice; it depends on no batch statistics, which
matters at batch 2). On a CPU, ``nn.InstanceNorm3d`` copies a channels-last input into another
layout and back in every layer; ``unetcli.models.blocks.InstanceNorm`` gives the same result
through ``batch_norm`` on each sample. This times one training step (the trainer's own
``train_step``: precision and memory format as ``unet train`` picks them, DiceCE loss, AdamW)
of the same network three ways, in one process, interleaved over rounds, from the same weights:

* ``torch InstanceNorm``   the reference: every norm layer is ``nn.InstanceNorm{2,3}d(affine=True)``
* ``unetcli InstanceNorm`` what ``model.norm: instance`` builds
* ``BatchNorm``            ``model.norm: batch`` (for scale: the cheapest normalisation)

    python scripts/bench_norm.py                                 # the robustness benchmark's plan
    python scripts/bench_norm.py --features 32 64 128 256 320 --patch 64 64 64

Ratios are the reference's median step time over the variant's (> 1 = faster).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from benchlib.machine import median, spread
from unetcli.config import ModelConfig, RunConfig
from unetcli.models import build_model
from unetcli.models.blocks import InstanceNorm
from unetcli.runtime import (configure_cpu_allocator, configure_threads, resolve_channels_last, resolve_device,
                             resolve_precision)
from unetcli.training.losses import DiceCELoss
from unetcli.training.setup import make_optimizer
from unetcli.training.trainer import train_step


def with_torch_instance_norm(model: nn.Module, spatial_dims: int) -> nn.Module:
    """A copy of ``model`` whose :class:`InstanceNorm` layers are PyTorch's, with the same parameters."""
    model = copy.deepcopy(model)
    torch_class = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, InstanceNorm):
                torch_norm = torch_class(child.weight.numel(), affine=True)
                torch_norm.load_state_dict(child.state_dict())
                setattr(module, name, torch_norm)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, default=3, choices=[2, 3])
    p.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--patch", type=int, nargs="+", default=[40, 56, 48], help="training patch (default: the robustness benchmark's plan)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    args = p.parse_args()

    configure_threads(args.threads)
    configure_cpu_allocator()
    device = resolve_device("cpu")
    precision = resolve_precision(args.precision, device)
    channels_last = resolve_channels_last(None, device)
    fmt = torch.channels_last_3d if args.dims == 3 else torch.channels_last
    torch.manual_seed(0)
    cfg = ModelConfig(spatial_dims=args.dims, in_channels=1, out_channels=args.classes, features=args.features, norm="instance")
    ours = build_model(cfg)
    variants: dict[str, nn.Module] = {"torch InstanceNorm": with_torch_instance_norm(ours, args.dims), "unetcli InstanceNorm": ours}
    batch_cfg = ModelConfig(spatial_dims=args.dims, in_channels=1, out_channels=args.classes, features=args.features, norm="batch")
    variants["BatchNorm"] = build_model(batch_cfg)
    images = torch.randn(args.batch, 1, *args.patch)
    labels = torch.randint(0, args.classes, (args.batch, *args.patch))
    loss_fn = DiceCELoss(include_background=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    steps = {}
    for name, model in variants.items():
        model.train()
        if channels_last:
            model.to(memory_format=fmt)
        optimizer = make_optimizer(model, RunConfig(), device)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            x = images.contiguous(memory_format=fmt) if channels_last else images
            train_step(model, x, labels, loss_fn, optimizer, scaler, device, precision, 12.0)
        step()
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)

    x = torch.randn(args.batch, 8, *args.patch[:args.dims])
    torch_norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[args.dims](8, affine=True)
    ours_norm = InstanceNorm(8)
    with torch.no_grad():
        torch_norm.weight.uniform_(0.5, 1.5), torch_norm.bias.uniform_(-0.5, 0.5)
        ours_norm.load_state_dict(torch_norm.state_dict())
        diff = float((torch_norm(x) - ours_norm(x)).abs().max())

    ref = median(times["torch InstanceNorm"])
    print(f"{args.dims}D U-Net {args.features}, batch {args.batch} x {args.patch}, precision {precision}, "
          f"channels_last {channels_last}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    print(f"unetcli InstanceNorm vs torch's on the same input (fp32): max |difference| {diff:.1e}\n")
    print(f"| {'variant':<22} | s / step (median) | spread | ratio |")
    print(f"|{'-' * 24}|---|---|---|")
    for name, ts in times.items():
        med = median(ts)
        print(f"| {name:<22} | {med:.3f} | {spread(ts):.0%} | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
