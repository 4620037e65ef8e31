#!/usr/bin/env python
"""Training-step throughput of unetcli's U-Net: our training step against a plain PyTorch loop.

What is measured
----------------
One training step = forward, loss, backward, optimiser step, on a fixed batch that lives on
the device (no data loading). Two problems:

* 2D: batch 8x1x256x256, 3 classes, ``ModelConfig()`` defaults (features 32,64,128,256,
  batch norm, concat skips, transposed-convolution upsampling).
* 3D: batch 2x1xS^3, 3 classes, features 16,32,64,128. ``S`` is ``--size3d``: 96 on CUDA,
  64 on CPU by default (a 96^3 step on two CPU cores takes long enough that a run with a
  few repeats no longer fits in minutes).

Variants, all in one process, all starting from the same weights and the same batch:

* ``reference``     plain PyTorch fp32: default (contiguous) memory format,
                    ``torch.optim.AdamW`` with its defaults (no ``foreach``/``fused`` flag),
                    loss = ``F.cross_entropy`` + a separately computed softmax Dice (background
                    excluded, like the trainer's default), ``loss.item()`` every step.
* ``ours``          what ``unetcli.training.trainer`` does: ``resolve_precision('auto')``
                    autocast (bf16 on a CPU with avx512_bf16/amx_bf16, else fp32; bf16/fp16 on
                    CUDA), channels_last (2D) / channels_last_3d (3D) for weights and batch
                    where ``resolve_channels_last`` turns it on (CUDA, AVX-512/AMX CPU kernels;
                    converted every step, as the trainer does), ``make_optimizer`` (foreach
                    AdamW on CPU, fused on CUDA), ``DiceCELoss``, gradient clipping at 12 and the
                    LR scheduler (the trainer's defaults), no per-step host sync (loss summed on
                    the device), cudnn.benchmark on CUDA, and on CPU glibc heap reuse
                    (``unetcli.runtime.configure_cpu_allocator``, which ``unet train`` calls).
* ``ours fp32``     ``ours`` with precision fp32: what ``auto`` chose against. ``auto`` must
                    never be slower than this; the script says so and exits 1 if it is.
* levers            the reference plus exactly one change: ``+channels_last`` (in 3D
                    ``+channels_last_3d``), ``+bf16 autocast`` (on CUDA: the AMP dtype ``auto``
                    picks), ``+foreach AdamW``, ``+DiceCELoss, no sync``, on CPU ``+heap reuse``;
                    and ``ours, default malloc`` (ours without heap reuse); with ``--compile``
                    also ``+torch.compile`` and ``ours +torch.compile`` (the first steps then
                    include compilation, whose time is reported separately).

The allocator setting is process-wide, so ``unetcli.runtime.set_heap_reuse`` switches it before
every variant's block: on for the variants that use it, back to glibc's steady-state default
(mmap for blocks above 32 MiB) for the others, the reference included.

Timing: every variant first runs ``--warmup`` steps. Then ``--rounds`` rounds; in each round
every variant, in turn, runs one untimed step (after the memory hand-back that the RSS figures
need, so that each block starts from the steady state of a training run) and ``--steps`` steps,
timed as one block (device synchronised
before and after). Interleaving the variants spreads slow drift (other tenants, clock
changes) over all of them. A variant's figure is the median over rounds of its per-step time;
``spread`` is (max - min) / median of those rounds: differences smaller than the spread are
noise.

How to read the table
---------------------
``ratio`` is throughput / the reference's throughput (median rounds), measured in this process
on the same work: >1 is faster. Absolute images/s depend on the machine and are printed for
context only. Two cross-checks for a shared machine (the load average is printed before and
after): ``best`` compares the fastest round of each (the least disturbed one), ``cpu-time``
compares process CPU seconds per step (blind to time spent waiting for a core, though OpenMP
spin-waiting inflates it). ``CPU use`` = CPU seconds / (wall seconds x torch threads): near
100 % the variant had the cores to itself; well below, others were running and the wall-clock
figures of that row are unreliable. Trust a ratio where the three columns agree.

``peak RSS`` is the resident-set high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is
missing) over the variant's timed blocks: before each block freed heap memory is handed back
(``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``), so it is that
variant's peak, but it includes the baseline of the process (interpreter, torch, every
variant's weights and optimiser state), printed above the table; ``over base`` is the peak
minus the RSS just before the block (activations, gradients, workspace of one step).
``loss@1`` is the loss of the first step: fp32 variants that compute the same loss must
agree, bf16 variants are close.

Examples::

    python scripts/bench_train.py                         # both problems, CPU: ~6 min on 2 cores
    python scripts/bench_train.py --dims 2 --steps 3 --rounds 5 --json out/train.json
    python scripts/bench_train.py --device cuda --size3d 96 --steps 20

On a CPU without native bf16 (no avx512_bf16/amx_bf16, e.g. AVX2-only) the ``+bf16 autocast``
lever is skipped, and the output says so: emulated bf16 is many times slower than fp32 (one
warm-up step took 494 s on a 2-core AVX2 machine). ``--emulated-bf16`` measures it anyway.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from benchlib import machine as bl
from torch import nn

from unetcli.config import ModelConfig, RunConfig
from unetcli.models import UNet
from unetcli.runtime import cpu_has_native_bf16, resolve_channels_last, resolve_device, resolve_precision, set_heap_reuse
from unetcli.training.losses import DiceCELoss
from unetcli.training.schedule import lr_factor
from unetcli.training.setup import make_optimizer
from unetcli.training.trainer import train_step

NUM_CLASSES = 3


# --------------------------------------------------------------------------- the reference loss


def reference_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What a user writes by hand: cross-entropy plus a softmax Dice computed separately."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, logits.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * intersection + 1e-5) / (denominator + 1e-5)
    return ce + (1.0 - dice[:, 1:].mean())


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool = False
    precision: str = "fp32"
    optimizer: str = "torch-default"  # or "unetcli" (make_optimizer)
    loss: str = "reference"  # or "ours" (DiceCELoss)
    sync_each_step: bool = True
    grad_clip: float | None = None
    scheduler: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False
    heap_reuse: bool = False  # unetcli.runtime.set_heap_reuse(True), as `unet train` sets it


EMULATED_BF16_NOTE = ("this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 would be emulated, many times slower "
                      "than fp32 (one warm-up step took 494 s on a 2-core AVX2 CPU); --emulated-bf16 measures it anyway")


def skips_emulated_bf16(device: torch.device, emulated_bf16: bool) -> bool:
    """Whether to leave out the variants that run bf16 on a CPU that only emulates it."""
    return device.type == "cpu" and not cpu_has_native_bf16() and not emulated_bf16


def build_variants(dims: int, device: torch.device, compile_: bool, emulated_bf16: bool = False) -> list[Variant]:
    auto = resolve_precision("auto", device)
    lever_precision = "bf16" if device.type == "cpu" else auto
    cl_name = "+channels_last" if dims == 2 else "+channels_last_3d"
    ref = Variant("reference (plain fp32)")
    ours = Variant(
        f"ours (auto={auto})", channels_last=resolve_channels_last(None, device), precision=auto, optimizer="unetcli", loss="ours",
        sync_each_step=False, grad_clip=12.0, scheduler=True, cudnn_benchmark=device.type == "cuda",
        heap_reuse=device.type == "cpu",
    )
    variants = [ref, ours]
    if auto != "fp32":
        variants.append(replace(ours, name="ours fp32", precision="fp32"))
    variants.append(replace(ref, name=f"{cl_name}", channels_last=True))
    if not skips_emulated_bf16(device, emulated_bf16):
        variants.append(replace(ref, name=f"+{lever_precision} autocast", precision=lever_precision))
    variants += [
        replace(ref, name="+foreach AdamW" if device.type == "cpu" else "+fused AdamW", optimizer="unetcli"),
        replace(ref, name="+DiceCELoss, no sync", loss="ours", sync_each_step=False),
    ]
    if device.type == "cpu":
        variants += [replace(ref, name="+heap reuse", heap_reuse=True),
                     replace(ours, name="ours, default malloc", heap_reuse=False)]
    if compile_:
        variants += [replace(ref, name="+torch.compile", compile=True), replace(ours, name=ours.name + " +torch.compile", compile=True)]
    return variants


@dataclass
class Runner:
    """One variant's model, optimiser and step function; all variants share the batch."""

    variant: Variant
    model: nn.Module
    step_fn: Any
    images: torch.Tensor
    loss_sum: torch.Tensor
    first_loss: float | None = None
    block_seconds: list[float] = field(default_factory=list)
    block_cpu_seconds: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    rss_increment_mib: float = 0.0
    peak_cuda_mib: float = 0.0
    warmup_seconds: list[float] = field(default_factory=list)


def make_runner(v: Variant, base: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                device: torch.device, total_steps: int) -> Runner:
    model = copy.deepcopy(base).to(device).train()
    channels_last = v.channels_last
    memory_format = torch.channels_last if images.ndim == 4 else torch.channels_last_3d
    if channels_last:
        model.to(memory_format=memory_format)
    if v.optimizer == "unetcli":
        optimizer = make_optimizer(model, RunConfig(), device)
    else:
        t = RunConfig().train
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = None
    if v.scheduler:
        t = RunConfig().train
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: lr_factor(t.schedule, it, total_steps, t.warmup_iterations))
    loss_fn: Any = DiceCELoss(include_background=False).to(device) if v.loss == "ours" else reference_loss
    forward: Any = torch.compile(model) if v.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=v.precision == "fp16")
    runner = Runner(v, model, None, images, torch.zeros((), device=device))

    def step() -> None:
        x = runner.images
        if channels_last:  # the trainer converts every batch it draws
            x = x.contiguous(memory_format=memory_format)
        # The trainer's own step; with fp32, no clipping and a disabled scaler it is the plain loop.
        loss = train_step(forward, x, labels, loss_fn, optimizer, scaler, device, v.precision, v.grad_clip)
        if scheduler is not None:
            scheduler.step()
        if v.sync_each_step:
            value = loss.item()  # the host sync of typical user code (logging every step)
            if runner.first_loss is None:
                runner.first_loss = value
        else:
            runner.loss_sum += loss
            if runner.first_loss is None:  # once, outside the timed blocks (warm-up)
                runner.first_loss = float(loss)

    runner.step_fn = step
    return runner


# --------------------------------------------------------------------------- one problem


def bench_problem(dims: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if dims == 2:
        features, batch, size = list(ModelConfig().features), args.batch2d, args.size2d
        unit = "img/s"
    else:
        features, batch, size = [16, 32, 64, 128], args.batch3d, args.size3d
        unit = "vol/s"
    shape = (batch, 1) + (size,) * dims
    cfg = ModelConfig()
    torch.manual_seed(args.seed)
    base = UNet(dims, 1, NUM_CLASSES, features=features, skip=cfg.skip, padding=cfg.padding,
                upsample=cfg.upsample, norm=cfg.norm, dropout=cfg.dropout, convs_per_level=cfg.convs_per_level)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(shape, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,) + (size,) * dims, generator=gen).to(device)

    variants = build_variants(dims, device, args.compile, args.emulated_bf16)
    if args.variants:
        keep = [s.lower() for s in args.variants]
        variants = [v for i, v in enumerate(variants) if i == 0 or any(k in v.name.lower() for k in keep)]
    total_steps = args.warmup + args.rounds * args.steps
    runners = [make_runner(v, base, images, labels, device, total_steps) for v in variants]

    print(f"\n== {dims}D: batch {'x'.join(map(str, shape))}, {NUM_CLASSES} classes, features {features}, "
          f"{n_params:,} parameters; {args.warmup} warm-up steps, {args.rounds} rounds x {args.steps} timed steps")
    for r in runners:
        torch.backends.cudnn.benchmark = r.variant.cudnn_benchmark  # autotuning happens during warm-up
        set_heap_reuse(r.variant.heap_reuse)
        for _ in range(args.warmup):
            r.warmup_seconds.append(bl.timed(r.step_fn, device))
        print(f"   warmed up {r.variant.name:<40} first step {r.warmup_seconds[0]:7.2f} s"
              f"{'  (includes compilation)' if r.variant.compile else ''}", flush=True)
    bl.release_memory()
    baseline_rss = bl.current_rss_mib()
    can_reset = bl.reset_peak_rss()
    for rnd in range(args.rounds):
        order = runners if rnd % 2 == 0 else runners[::-1]  # alternate order: no variant always runs first
        for r in order:
            torch.backends.cudnn.benchmark = r.variant.cudnn_benchmark
            set_heap_reuse(r.variant.heap_reuse)  # process-wide: switched for every block
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            bl.release_memory()
            block_base = bl.current_rss_mib()
            bl.reset_peak_rss()
            # release_memory handed the heap back to the OS: one untimed step brings every variant
            # back to its steady state (a training run never trims between steps).
            r.step_fn()

            def block(r: Runner = r) -> None:
                for _ in range(args.steps):
                    r.step_fn()
                if not r.variant.sync_each_step:
                    float(r.loss_sum)  # the trainer's once-per-epoch sync, inside the timed block

            wall, cpu = bl.timed_wall_cpu(block, device)
            r.block_seconds.append(wall)
            r.block_cpu_seconds.append(cpu)
            r.peak_rss_mib = max(r.peak_rss_mib, bl.peak_rss_mib())
            r.rss_increment_mib = max(r.rss_increment_mib, bl.peak_rss_mib() - block_base)
            if device.type == "cuda":
                r.peak_cuda_mib = max(r.peak_cuda_mib, torch.cuda.max_memory_allocated(device) / 2**20)
        print(f"   round {rnd + 1}/{args.rounds} done", flush=True)

    ref = runners[0]
    ref_med, ref_best = bl.median(ref.block_seconds), min(ref.block_seconds)
    ref_cpu = bl.median(ref.block_cpu_seconds)
    threads = torch.get_num_threads()
    rows, results = [], []
    for r in runners:
        per_step = [s / args.steps for s in r.block_seconds]
        tp = batch / bl.median(per_step)
        ratio = ref_med / bl.median(r.block_seconds)
        ratio_best = ref_best / min(r.block_seconds)
        ratio_cpu = ref_cpu / bl.median(r.block_cpu_seconds)
        cpu_use = bl.median([c / w / threads for c, w in zip(r.block_cpu_seconds, r.block_seconds)])
        row = [r.variant.name, f"{tp:.3f}", f"{ratio:.2f}x", f"{ratio_best:.2f}x", f"{ratio_cpu:.2f}x",
               f"{bl.spread(per_step) * 100:.0f}%", f"{cpu_use * 100:.0f}%",
               f"{r.peak_rss_mib:,.0f}", f"{r.rss_increment_mib:+,.0f}", f"{r.first_loss:.4f}"]
        if device.type == "cuda":
            row.append(f"{r.peak_cuda_mib:,.0f}")
        rows.append(row)
        results.append({
            "variant": asdict(r.variant), "throughput": tp, "unit": unit, "ratio_vs_reference": ratio,
            "ratio_best_vs_reference": ratio_best, "ratio_cpu_time_vs_reference": ratio_cpu, "cpu_use": cpu_use,
            "seconds_per_step_rounds": per_step,
            "cpu_seconds_per_step_rounds": [c / args.steps for c in r.block_cpu_seconds], "spread": bl.spread(per_step),
            "peak_rss_mib": r.peak_rss_mib,
            "rss_increment_mib": r.rss_increment_mib,
            "peak_cuda_mib": r.peak_cuda_mib if device.type == "cuda" else None, "first_loss": r.first_loss,
            "warmup_seconds": r.warmup_seconds,
        })
    print(f"   process RSS before the timed rounds, after malloc_trim (inside every peak): {baseline_rss:,.0f} MiB"
          + ("" if can_reset else "; peak RSS could not be reset: figures are cumulative process peaks"))
    headers = ["variant", unit, "ratio", "best", "cpu-time", "spread", "CPU use", "peak RSS MiB", "over base", "loss@1"]
    if device.type == "cuda":
        headers.append("peak CUDA MiB")
    bl.print_table(headers, rows)
    for r in runners:
        if r.variant.compile:
            print(f"   {r.variant.name}: first (compiling) step {r.warmup_seconds[0]:.1f} s")

    verdict = check_auto(results)
    print(f"   {verdict['message']}")
    goal = check_goal(results, device)
    print(f"   {goal['message']}")
    return {"goal": goal, "dims": dims, "batch_shape": list(shape), "features": features, "parameters": n_params,
            "num_classes": NUM_CLASSES, "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps,
            "baseline_rss_mib": baseline_rss, "peak_rss_reset": can_reset, "results": results, "auto_check": verdict}


def check_auto(results: list[dict[str, Any]]) -> dict[str, Any]:
    """``auto`` must never be slower than fp32 with the rest of our step unchanged."""
    by_name = {r["variant"]["name"]: r for r in results}
    auto = next((r for n, r in by_name.items() if n.startswith("ours (auto=")), None)
    fp32 = by_name.get("ours fp32")
    if auto is None:
        return {"ok": True, "message": "auto check skipped (ours not measured)"}
    if auto["variant"]["precision"] == "fp32":
        return {"ok": True, "message": "--precision auto picks fp32 here: nothing to compare"}
    if fp32 is None:
        return {"ok": True, "message": "auto check skipped (ours fp32 not measured)"}
    ratios = {key: auto[key] / fp32[key] for key in
              ("ratio_vs_reference", "ratio_best_vs_reference", "ratio_cpu_time_vs_reference")}
    # Slower by more than 3 % on the median, the best round and CPU time alike: auto chose wrong.
    # Anything less consistent is noise on a shared machine, not a verdict.
    ok = not all(v < 0.97 for v in ratios.values())
    median_r, best_r, cpu_r = ratios.values()
    msg = (f"--precision auto picks {auto['variant']['precision']}: throughput vs the same step in fp32 = "
           f"{median_r:.2f}x (median) / {best_r:.2f}x (best) / {cpu_r:.2f}x (CPU time) -> "
           + ("OK, auto is not slower than fp32" if ok else "FAIL: auto is SLOWER than fp32"))
    return {"ok": ok, "auto_vs_fp32": ratios, "message": msg}


def check_goal(results: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The issue's goal for ours vs the plain fp32 reference depends on the hardware."""
    ours = next((r for r in results if r["variant"]["name"].startswith("ours (auto=")), None)
    if ours is None:
        return {"met": None, "message": "goal check skipped (ours not measured)"}
    if device.type == "cuda":
        kind, target = "a GPU (AMP)", 2.0
    elif cpu_has_native_bf16():
        kind, target = "a bf16-native CPU", 3.0
    else:
        kind, target = "a CPU without native bf16", 1.5
    ratio = ours["ratio_vs_reference"]
    met = ratio >= target
    return {"met": met, "target": target, "ratio": ratio,
            "message": f"goal on {kind}: ours >= {target:g}x the plain fp32 loop; measured {ratio:.2f}x -> "
                       + ("met" if met else "NOT met")}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--size2d", type=int, default=256, help="2D image side (default 256)")
    p.add_argument("--batch2d", type=int, default=8)
    p.add_argument("--size3d", type=int, default=None, help="3D volume side (default 64 on CPU, 96 on CUDA)")
    p.add_argument("--batch3d", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round counts")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile variants (slow to compile)")
    p.add_argument("--variants", nargs="+", help="keep only variants whose name contains one of these (reference always kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="also run the bf16 variants on a CPU without native bf16 (emulated: very slow; skipped by default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.size3d is None:
        args.size3d = 96 if device.type == "cuda" else 64
    info = bl.machine_info(device)
    bl.print_machine(info)
    print(f"--precision auto resolves to: {resolve_precision('auto', device)}")
    if skips_emulated_bf16(device, args.emulated_bf16):
        print(f"skipped: the +bf16 autocast variant; {EMULATED_BF16_NOTE}")
    load_before = bl.load_note()
    print(f"before: {load_before}")
    start = time.perf_counter()
    problems = [bench_problem(d, args, device) for d in args.dims]
    load_after = bl.load_note()
    print(f"\nafter: {load_after}")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")
    if args.json:
        bl.write_json(args.json, {"script": "bench_train", "machine": info, "args": vars(args),
                                  "auto_precision": resolve_precision("auto", device), "load_before": load_before,
                                  "load_after": load_after, "problems": problems})
    return 0 if all(p["auto_check"]["ok"] for p in problems) else 1


if __name__ == "__main__":
    sys.exit(main())
