#!/usr/bin/env python
"""Sliding-window inference: unetcli's ``sliding_window_predict`` against MONAI's
``sliding_window_inference``, same network, same volume, same windows.

What is measured
----------------
A seeded, smooth synthetic single-channel volume (default 160x160x128, z-scored) is segmented
into 3 classes by a 3D U-Net (features 16,32,64,128, batch norm, eval mode; its BatchNorm
running statistics are set from one forward pass over the volume so that its outputs are
not trivially uniform). Windows: roi 64^3, overlap 0.5, Gaussian weighting (sigma 0.125 *
roi), ``--window-batch`` windows per forward pass (default 2, unetcli's 3D default) on both sides.

* ``monai``        ``monai.inferers.sliding_window_inference(x, roi, sw_batch_size,
                   lambda x: torch.softmax(net(x), 1), overlap=0.5, mode="gaussian")`` under
                   ``torch.no_grad()``, fp32, the network as built, glibc's default allocator
                   settings (what a MONAI script gets). This is the reference.
* ``ours``         what ``unet predict`` runs, fp32: ``sliding_window_predict`` on the network
                   prepared as ``load_trained_model`` prepares it (BatchNorm folded into the
                   convolutions, weights in channels_last_3d) with heap reuse on
                   (``unetcli.runtime.configure_cpu_allocator``).
* ``ours_bf16``    the same with bf16 autocast of the forward pass.
* levers, each ``ours`` with one thing taken away or given to MONAI:
  ``ours_plain``   our sliding window on the network as built, default allocator: the
                   blending machinery alone against MONAI's;
  ``monai_reuse``  MONAI with our heap-reuse allocator setting: how much of the ratio is the
                   allocator;
  ``ours_labels``  ``ours`` returning labels (uint8, band by band), as ``unet predict`` asks;
  ``ours_ensemble5`` ``ours_labels`` with an ensemble of 5 networks (``unet predict CV``: each
                   window's softmax averaged over the models): peak RSS should stay within ~10 %
                   of ``ours_labels`` and the time be ~5x (only with ``--methods`` / ``--rss``);
  ``ours_nofold``, ``ours_contig``, ``ours_malloc`` (only with ``--methods``): ``ours`` without
                   BatchNorm folding / without channels_last_3d / with the default allocator.

The allocator setting is process-wide, so it is switched before every timed block
(``unetcli.runtime.set_heap_reuse``): on for the methods that use it, back to glibc's
steady-state default (mmap for blocks above 32 MiB) for the others.

Speed: the methods run in this process, in turn, ``--rounds`` times (order reversed every other
round), after a warm-up forward pass in each precision; a method's time is its median round.
The network is wrapped in a timer, so each time is split into the network's forward pass and
the rest (window extraction, softmax, weighting, accumulation, normalisation): the rest is
what the two sliding-window implementations themselves cost.

Memory: the peak RSS increment of each method is measured in a fresh child process
(``--only METHOD``, started by this script) so the figures do not pollute each other: after
building the network and data and one warm-up forward pass, freed heap is handed back
(``malloc_trim``), the RSS high-water mark is reset (``/proc/self/clear_refs``), the method
runs once, and ``increment = VmHWM - RSS before``. (Not ``ru_maxrss``: in a child it is at
least the parent's RSS at the fork, which the kernel carries across exec.) The float32 input
volume, the float32 probability output and the model size are printed for scale.

Agreement: max |p_ours - p_monai| over all voxels and classes of the probability maps.

On a GPU (``--device cuda``) the network, its prepared copies and every window batch live on the
GPU: MONAI gets the volume as a CUDA tensor (``sw_device`` and ``device`` cuda: windows, weighting
and accumulation on the GPU) and its output is copied back to the host inside the timed call, since
``sliding_window_predict`` (``device=cuda``) returns its result on the host too; both therefore end
with the same thing, probabilities in host memory. The device is synchronised before and after every
timed call, and the network's forward time comes from CUDA events. The default methods are then
``monai``, ``ours``, ``ours_bf16`` (where the GPU has bf16), ``ours_fp16``, ``ours_labels`` and
``ours_plain``; ``monai_reuse`` and the allocator levers are left out (the heap-reuse setting is about
host memory). Peak RSS is not measured on a GPU: the children measure host memory, which holds neither
the activations nor the window batches there; the table shows the peak CUDA memory each method
allocated on top of what was allocated before it (``torch.cuda.max_memory_allocated``) instead.

How to read it: ``speed-up`` is MONAI's time / the method's time in the same process on the same
work, so > 1 is faster than MONAI. Absolute seconds are context only. ``cpu-time`` is the same
ratio with process CPU seconds, a cross-check when other processes share the cores (the load
average is printed before and after; ``CPU use`` well below 100 % flags a disturbed run).

Examples::

    python scripts/bench_infer.py                              # full size: ~2 min on 2 cores
    python scripts/bench_infer.py --size 96 96 64 --json out/infer.json
    python scripts/bench_infer.py --only ours                  # one method, peak RSS only (what the children run)
    python scripts/bench_infer.py --methods ours_labels ours_ensemble5 --rss ours_labels ours_ensemble5 --rss-repeats 5
                                                               # 5-model ensemble vs one model: memory and time
    python scripts/bench_infer.py --device cuda --rounds 3 --json out/infer_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from benchlib import machine as bl
from monai.inferers import sliding_window_inference
from torch import nn

from unetcli.inference.ensemble import EnsembleNetwork
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.models import UNet, fold_batch_norm
from unetcli.runtime import autocast, cpu_has_native_bf16, set_heap_reuse


@dataclass(frozen=True)
class Method:
    label: str
    impl: str = "ours"  # "ours" (sliding_window_predict) or "monai" (sliding_window_inference)
    precision: str = "fp32"
    fold: bool = True  # BatchNorm folded into the convolutions
    channels_last: bool = True  # weights and windows in channels_last_3d
    heap_reuse: bool = True  # unetcli.runtime.set_heap_reuse(True)
    output: str = "probabilities"  # or "labels": what unet predict asks for
    models: int = 1  # > 1: an EnsembleNetwork of this many networks (unet predict CV), seeds seed, seed+1, ...


PLAIN = dict(fold=False, channels_last=False, heap_reuse=False)
METHODS = {
    "monai": Method("monai (fp32, reference)", impl="monai", **PLAIN),
    "monai_reuse": Method("monai + heap reuse", impl="monai", fold=False, channels_last=False),
    "ours": Method("ours fp32 (unet predict)"),
    "ours_bf16": Method("ours bf16 (unet predict)", precision="bf16"),
    "ours_fp16": Method("ours fp16 (unet predict)", precision="fp16"),  # CUDA only
    "ours_labels": Method("ours fp32, labels output", output="labels"),
    "ours_ensemble5": Method("ours fp32, labels, 5-model ensemble", output="labels", models=5),
    "ours_plain": Method("ours fp32, plain network", **PLAIN),
    "ours_nofold": Method("ours fp32, BN not folded", fold=False),
    "ours_contig": Method("ours fp32, contiguous", channels_last=False),
    "ours_malloc": Method("ours fp32, default malloc", heap_reuse=False),
}
LABELS = {name: m.label for name, m in METHODS.items()}
DEFAULT_METHODS = ["monai", "monai_reuse", "ours", "ours_bf16", "ours_labels", "ours_plain"]
CUDA_DEFAULT_METHODS = ["monai", "ours", "ours_bf16", "ours_fp16", "ours_labels", "ours_plain"]
RESULT_TAG = "BENCH_INFER_RESULT "
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- setup


class TimedNet(nn.Module):
    """Wraps the network and adds up the time spent inside its forward pass: wall time on the CPU;
    on CUDA the GPU time between two CUDA events per call, read once the device has been synchronised
    (:attr:`seconds`), so that timing adds no synchronisation of its own."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.reset()

    def reset(self) -> None:
        self.host_seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.calls = 0

    @property
    def seconds(self) -> float:
        return self.host_seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = self.net(x)
            end.record()
            self.events.append((start, end))
        else:
            start_s = time.perf_counter()
            y = self.net(x)
            self.host_seconds += time.perf_counter() - start_s
        self.calls += 1
        return y


def make_volume(size: tuple[int, int, int], seed: int) -> np.ndarray:
    """(1, *size) float32: trilinearly upsampled coarse noise plus fine noise, z-scored."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1) + tuple(max(2, s // 8) for s in size), generator=gen)
    smooth = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)[0]
    volume = smooth + 0.1 * torch.randn((1,) + size, generator=gen)
    volume = (volume - volume.mean()) / volume.std()
    return volume.numpy().astype(np.float32)


def make_net(features: list[int], volume: np.ndarray, roi: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = UNet(3, 1, 3, features=features)
    # Set BatchNorm running statistics from one pass over a crop of the volume (cumulative average).
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    crop = torch.from_numpy(volume[None, :, :roi, :roi, :roi].copy())
    net.train()
    with torch.no_grad():
        net(crop)
    return net.eval()


def model_mib(net: nn.Module) -> float:
    tensors = list(net.parameters()) + list(net.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def net_for(method: str, net: TimedNet) -> TimedNet:
    """The network a method runs, prepared once per (fold, channels_last) combination."""
    m = METHODS[method]
    key = (m.fold, m.channels_last, m.models)
    if key == (False, False, 1):
        return net
    prepared = getattr(net, "prepared", {})
    net.prepared = prepared
    if key not in prepared:
        model = fold_batch_norm(net.net) if m.fold else copy.deepcopy(net.net)
        if m.models > 1:  # the other members: same architecture, other seeds (as k folds would be)
            others = [net.make_member(i) for i in range(1, m.models)]
            model = EnsembleNetwork([model] + [fold_batch_norm(o) if m.fold else o for o in others])
        if m.channels_last:
            model.to(memory_format=torch.channels_last_3d)
        prepared[key] = TimedNet(model)
    return prepared[key]


def precision_of(method: str) -> str:
    return METHODS[method].precision


def run_method(method: str, net: TimedNet, volume: np.ndarray, args: argparse.Namespace,
               device: torch.device = CPU) -> torch.Tensor:
    """(K, *S) float32 probabilities (or labels), in host memory."""
    roi = [args.roi] * 3
    if METHODS[method].impl == "monai":
        x = torch.from_numpy(volume)[None]
        on_gpu = {}
        if device.type == "cuda":  # windows, weighting and accumulation on the GPU
            x, on_gpu = x.to(device), {"sw_device": device, "device": device}
        with torch.no_grad():
            out = sliding_window_inference(x, roi, args.window_batch, lambda w: torch.softmax(net(w), 1),
                                           overlap=args.overlap, mode="gaussian", **on_gpu)
        return out[0].cpu()  # a no-op on the CPU; on CUDA the copy to the host that ours makes too
    return sliding_window_predict(net, volume, roi, 3, overlap=args.overlap, window_batch_size=args.window_batch,
                                  gaussian=True, device=device, precision=precision_of(method), output=METHODS[method].output)


def warm_up(net: nn.Module, args: argparse.Namespace, precisions: list[str], device: torch.device = CPU) -> None:
    """One window batch through the network per precision: oneDNN (cuDNN) builds its kernels here."""
    x = torch.zeros((args.window_batch, 1) + (args.roi,) * 3, device=device)
    if next(net.parameters()).is_contiguous(memory_format=torch.channels_last_3d):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for precision in precisions:
            with autocast(device, precision):
                net(x)
    bl.synchronize(device)


# --------------------------------------------------------------------------- child: one method, peak RSS


def child(args: argparse.Namespace) -> dict[str, Any]:
    size = tuple(args.size)
    volume = make_volume(size, args.seed)
    base = TimedNet(make_net(args.features, volume, args.roi, args.seed))
    base.make_member = lambda i: make_net(args.features, volume, args.roi, args.seed + i)
    net = net_for(args.only, base)
    set_heap_reuse(METHODS[args.only].heap_reuse)
    warm_up(net, args, [precision_of(args.only)])
    # The network's own working memory: one window batch through it, nothing else.
    bl.release_memory()
    before = bl.current_rss_mib()
    bl.reset_peak_rss()
    warm_up(net, args, [precision_of(args.only)])
    forward_mib = bl.peak_rss_mib() - before
    bl.release_memory()
    before = bl.current_rss_mib()
    can_reset = bl.reset_peak_rss()
    net.reset()
    start = time.perf_counter()
    out = run_method(args.only, net, volume, args)
    seconds = time.perf_counter() - start
    peak = bl.peak_rss_mib()
    result = {"method": args.only, "rss_before_mib": before, "peak_rss_mib": peak, "rss_increment_mib": peak - before,
              "forward_increment_mib": forward_mib, "peak_reset": can_reset, "seconds": seconds, "network_seconds": net.seconds,
              "output_shape": list(out.shape)}
    print(f"{LABELS[args.only]}: peak RSS {peak:,.0f} MiB, increment {peak - before:+,.0f} MiB over {before:,.0f} MiB; "
          f"one window batch through the network alone {forward_mib:+,.0f} MiB (time in this child {seconds:.1f} s, not a comparison)")
    print(RESULT_TAG + json.dumps(result), flush=True)
    return result


def measure_rss_in_children(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Each method's peak RSS in a fresh child, ``--rss-repeats`` times with the methods in turn (the
    heap's layout makes one child's peak vary by tens of MiB); the child with the median increment counts."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for _ in range(args.rss_repeats):
        for method in methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", method, "--seed", str(args.seed),
                   "--size", *map(str, args.size), "--roi", str(args.roi), "--overlap", str(args.overlap),
                   "--window-batch", str(args.window_batch), "--features", *map(str, args.features)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((out for out in proc.stdout.splitlines() if out.startswith(RESULT_TAG)), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"child {method} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            runs[method].append(json.loads(line[len(RESULT_TAG):]))
            print(f"   child {LABELS[method]:<24} peak RSS {runs[method][-1]['peak_rss_mib']:,.0f} MiB, increment "
                  f"{runs[method][-1]['rss_increment_mib']:+,.0f} MiB", flush=True)
    results = {}
    for method, done in runs.items():
        ordered = sorted(done, key=lambda r: r["rss_increment_mib"])
        results[method] = {**ordered[(len(ordered) - 1) // 2],
                           "increments_mib": [r["rss_increment_mib"] for r in done],
                           "peaks_mib": [r["peak_rss_mib"] for r in done]}
    return results


# --------------------------------------------------------------------------- parent: timing and agreement


def parent(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info = bl.machine_info(device)
    bl.print_machine(info)
    size = tuple(args.size)
    volume = make_volume(size, args.seed)
    net = TimedNet(make_net(args.features, volume, args.roi, args.seed).to(device))
    net.make_member = lambda i: make_net(args.features, volume, args.roi, args.seed + i).to(device)
    n_params = sum(p.numel() for p in net.parameters())
    in_mib = volume.nbytes / 2**20
    out_mib = 3 * volume[0].size * 4 / 2**20
    print(f"volume {'x'.join(map(str, size))} float32 = {in_mib:.1f} MiB; probabilities 3 x that = {out_mib:.1f} MiB; "
          f"model features {args.features}: {n_params:,} parameters = {model_mib(net.net):.1f} MiB")
    print(f"roi {args.roi}^3, overlap {args.overlap}, gaussian, {args.window_batch} windows per forward pass, "
          f"{args.rounds} timed round(s)")
    load_before = bl.load_note()
    print(f"before: {load_before}")
    start = time.perf_counter()
    for method in args.methods:
        warm_up(net_for(method, net), args, [precision_of(method)], device)

    methods = [m for m in METHODS if m in args.methods]
    times: dict[str, list[float]] = {m: [] for m in methods}
    net_times: dict[str, list[float]] = {m: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m: [] for m in methods}
    cuda_mib: dict[str, float] = {m: 0.0 for m in methods}  # peak CUDA memory over what was allocated before
    calls: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    for rnd in range(args.rounds):
        for method in methods if rnd % 2 == 0 else methods[::-1]:
            timed_net = net_for(method, net)
            timed_net.reset()
            set_heap_reuse(METHODS[method].heap_reuse)
            bl.release_memory()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                allocated = torch.cuda.memory_allocated(device)
            def call(method: str = method, timed_net: TimedNet = timed_net) -> None:
                outputs[method] = run_method(method, timed_net, volume, args, device)

            wall, cpu = bl.timed_wall_cpu(call, device)
            if cuda:
                cuda_mib[method] = max(cuda_mib[method], (torch.cuda.max_memory_allocated(device) - allocated) / 2**20)
            times[method].append(wall)
            cpu_times[method].append(cpu)
            net_times[method].append(timed_net.seconds)
            calls[method] = timed_net.calls
            print(f"   round {rnd + 1}: {LABELS[method]:<24} {times[method][-1]:7.{2 if cuda else 1}f} s", flush=True)

    if cuda:
        rss: dict[str, dict[str, Any]] = {}
        print("   peak RSS not measured on CUDA: the child processes measure host memory, which holds neither the "
              "activations nor the window batches on a GPU; see the peak CUDA column instead", flush=True)
    else:
        rss = measure_rss_in_children(args, [m for m in methods if m in args.rss]) if args.rss else {}

    ref = "monai" if "monai" in methods else methods[0]
    ref_time, ref_cpu = bl.median(times[ref]), bl.median(cpu_times[ref])
    threads = torch.get_num_threads()
    rows, results = [], {}
    for m in methods:
        t, tn, tc = bl.median(times[m]), bl.median(net_times[m]), bl.median(cpu_times[m])
        cpu_use = bl.median([c / w / threads for c, w in zip(cpu_times[m], times[m])])
        if METHODS[m].output == "labels":  # fraction of voxels whose label differs from argmax(MONAI)
            ref_labels = outputs[ref].long() if METHODS[ref].output == "labels" else outputs[ref].argmax(0)
            diff = float((outputs[m].long() != ref_labels).float().mean()) if m != ref else 0.0
        else:
            diff = float((outputs[m] - outputs[ref]).abs().max()) if m != ref else 0.0
        r = rss.get(m, {})
        results[m] = {"seconds_rounds": times[m], "seconds": t, "network_seconds": tn, "rest_seconds": t - tn,
                      "ratio_vs_monai": t / ref_time,
                      "cpu_seconds_rounds": cpu_times[m], "ratio_cpu_time_vs_monai": tc / ref_cpu, "cpu_use": cpu_use,
                      "forward_calls": calls[m], "max_abs_diff_vs_monai": diff,
                      "rss": r or None, "peak_cuda_increment_mib": cuda_mib[m] if cuda else None}
        memory = ([f"{cuda_mib[m]:+,.0f}"] if cuda else
                  [f"{r['rss_increment_mib']:+,.0f}" if r else "-", f"{r['forward_increment_mib']:+,.0f}" if r else "-"])
        rows.append([LABELS[m], f"{t:.2f}" if cuda else f"{t:.1f}", f"{ref_time / t:.2f}x", f"{ref_cpu / tc:.2f}x",
                     f"{cpu_use * 100:.0f}%", f"{tn:.2f}" if cuda else f"{tn:.1f}", f"{t - tn:.2f}", str(calls[m]), *memory,
                     "-" if m == ref else f"{diff:.2e}" if METHODS[m].output != "labels" else f"{diff:.1e} labels"])
    print()
    bl.print_table(["method", "seconds", "speed-up", "cpu-time", "CPU use", "network s", "rest s", "forwards",
                    *(["peak CUDA incr MiB"] if cuda else ["peak RSS incr MiB", "net alone MiB"]), "max|dp| vs monai"], rows)
    print("speed-up = MONAI's time / the method's time, same process, same work (>1 is faster); cpu-time = the same\n"
          "with process CPU seconds (a cross-check on a shared machine); CPU use = CPU s / (wall s x threads), well\n"
          "below 100 % means other processes took the cores. 'rest' = total - network forward = the sliding-window\n"
          "machinery itself. 'net alone' = peak RSS increment of one window batch through the network by itself.\n"
          "For the labels output (what unet predict asks for) the last column is the fraction of voxels whose\n"
          "label differs from argmax(MONAI)."
          + ("\nOn CUDA: 'network' is GPU time (CUDA events), cpu-time and CPU use count host time only, and 'peak CUDA\n"
             "incr' is the most device memory the method allocated on top of what was allocated before it." if cuda else ""))
    if "ours" in results and ref == "monai":
        ours = results["ours"]
        speedup = 1 / ours["ratio_vs_monai"]
        print(f"goal speed: ours fp32 {speedup:.2f}x MONAI (goal >= 2): {'met' if speedup >= 2 else 'NOT met'}; "
              f"max |dp| {ours['max_abs_diff_vs_monai']:.1e} (goal < 1e-3): "
              f"{'met' if ours['max_abs_diff_vs_monai'] < 1e-3 else 'NOT met'}")
        for m in ("ours_labels", "ours"):
            r = results.get(m, {}).get("rss")
            if not r:
                continue
            budget = 3 * in_mib + model_mib(net.net) + r["forward_increment_mib"]
            incr = r["rss_increment_mib"]
            print(f"goal memory, {LABELS[m]}: peak RSS increment {incr:,.0f} MiB vs 3 x volume + model weights + "
                  f"one window batch through the network = {budget:,.0f} MiB: {'met' if incr <= budget else 'NOT met'}")
    one, five = results.get("ours_labels", {}), results.get("ours_ensemble5", {})
    if one.get("rss") and five.get("rss"):
        peak1, peak5 = bl.median(one["rss"]["peaks_mib"]), bl.median(five["rss"]["peaks_mib"])
        incr1, incr5 = one["rss"]["rss_increment_mib"], five["rss"]["rss_increment_mib"]
        print(f"goal ensemble: 5 models' peak RSS {peak5:,.0f} MiB vs one model's {peak1:,.0f} MiB "
              f"({(peak5 / peak1 - 1) * 100:+.1f} %; increments {incr5:+,.0f} vs {incr1:+,.0f} MiB, "
              f"{(incr5 / incr1 - 1) * 100:+.1f} %; medians of {args.rss_repeats} child(ren)): "
              f"{'met' if peak5 <= 1.1 * peak1 else 'NOT met'} (goal within 10 %); time "
              f"{five['seconds'] / one['seconds']:.2f}x one model's (goal about 5x)")
    load_after = bl.load_note()
    print(f"after: {load_after}")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")
    return {"script": "bench_infer", "machine": info, "args": vars(args), "device": str(device), "load_before": load_before,
            "load_after": load_after, "volume_mib": in_mib, "output_mib": out_mib,
            "parameters": n_params, "model_mib": model_mib(net.net), "results": results}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[160, 160, 128],
                   help="volume size: 3 numbers, or 1 for a cube (default 160 160 128)")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--window-batch", type=int, default=2, help="windows per forward pass (sw_batch_size; default 2, unetcli's 3D default)")
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per method (median counts)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the networks run (default cpu)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"default: {' '.join(DEFAULT_METHODS)} (CUDA: {' '.join(CUDA_DEFAULT_METHODS)}, ours_bf16 only where "
                        "the GPU has bf16); also ours_nofold, ours_contig, ours_malloc, and ours_fp16 on CUDA")
    p.add_argument("--rss", nargs="*", default=None, choices=list(METHODS),
                   help="methods whose peak RSS is measured in a child process (default: monai ours ours_bf16 ours_labels; "
                        "none: skip; not measured with --device cuda)")
    p.add_argument("--rss-repeats", type=int, default=1, help="children per method for peak RSS (median counts; default 1)")
    p.add_argument("--only", choices=list(METHODS), help="child mode: run one method once and report its peak RSS")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="keep ours_bf16 in the defaults on a CPU without native bf16 (emulated: very slow; left out by default)")
    args = p.parse_args(argv)
    args.skipped_bf16 = args.device == "cpu" and not cpu_has_native_bf16() and not args.emulated_bf16
    if args.rss is None:
        args.rss = [m for m in ("monai", "ours", "ours_bf16", "ours_labels") if m != "ours_bf16" or not args.skipped_bf16]
    if len(args.size) == 1:
        args.size = args.size * 3
    if len(args.size) != 3:
        p.error("--size takes 1 or 3 numbers")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
        if args.only:
            p.error("--only measures the peak RSS of host memory: run it without --device cuda")
        if args.methods is None:
            args.methods = [m for m in CUDA_DEFAULT_METHODS if m != "ours_bf16" or torch.cuda.is_bf16_supported()]
    else:
        args.methods = args.methods or [m for m in DEFAULT_METHODS if m != "ours_bf16" or not args.skipped_bf16]
        if "ours_fp16" in args.methods or args.only == "ours_fp16":
            p.error("ours_fp16 needs --device cuda (fp16 autocast is for CUDA GPUs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        child(args)
        return 0
    if args.skipped_bf16:
        print("skipped: ours_bf16; this CPU has no native bf16 (avx512_bf16/amx_bf16), so bf16 would be emulated, "
              "many times slower than fp32; --emulated-bf16 keeps it in the defaults")
    payload = parent(args)
    if args.json:
        bl.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
