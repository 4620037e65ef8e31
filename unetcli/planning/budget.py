"""What a training step may cost: a memory budget (GPU memory, ``--memory``, or on a CPU nnU-Net's
8 GB reference), or, only when asked for (``--step-seconds``), a step time measured against this
machine's convolution throughput.

Why a CPU plans for a fixed memory and not for its own speed: a plan sized from a speed reading
differs between machines and, worse, on one machine depending on its load when it was measured
(a reading taken beside another job once gave 2 mm brain octants a 16 x 20 x 14 patch instead of
40 x 48 x 40, and the model lost 0.2 Dice on other scanners' scans). The patch is the context
the network sees, so it stays the plan's; a slow machine trains fewer iterations instead
(``unet train --time``). The measured speed only estimates seconds per step in the plan table."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unetcli.planning.rules import Network, training_flops, training_memory_bytes

CPU_STEP_SECONDS = 2.0
"""The step-time budget of ``unet plan --step-seconds`` when a caller asks for one without a value."""
REFERENCE_MEMORY_GB = 8.0
"""Without ``--memory`` a CPU plans for nnU-Net's reference GPU: 8 GB, 16-bit activations."""
NETWORK_EFFICIENCY = 1.0
"""A whole U-Net training step runs at about the throughput of the timed convolution (measured on a
2-core AVX2 CPU: probe 82 GFLOP/s; 3D U-Net steps of 110-220 GFLOP at 71-95 GFLOP/s)."""


@dataclass(frozen=True)
class Budget:
    """Either ``memory_bytes`` (GPU memory or ``--memory``) or ``step_seconds`` at ``flops_per_second``."""

    bytes_per_element: int
    """2 for bf16/fp16 training, 4 for fp32."""
    memory_bytes: float | None = None
    step_seconds: float | None = None
    flops_per_second: float | None = None
    description: str = ""

    def seconds(self, net: Network, patch: list[int], batch: int) -> float | None:
        if not self.flops_per_second:
            return None
        return training_flops(net, patch, batch) / (self.flops_per_second * NETWORK_EFFICIENCY)

    def memory(self, net: Network, patch: list[int], batch: int) -> float:
        return training_memory_bytes(net, patch, batch, self.bytes_per_element)

    def fits(self, net: Network, patch: list[int], batch: int) -> bool:
        if self.memory_bytes is not None:
            return self.memory(net, patch, batch) <= self.memory_bytes
        seconds = self.seconds(net, patch, batch)
        return seconds is None or self.step_seconds is None or seconds <= self.step_seconds

    def largest_batch(self, net: Network, patch: list[int], limit: int = 1024) -> int:
        """The largest batch this budget fits (1 when even that does not fit)."""
        if self.memory_bytes is not None:
            per_sample = self.memory(net, patch, 2) - self.memory(net, patch, 1)
            fixed = self.memory(net, patch, 1) - per_sample
            return max(1, min(limit, int((self.memory_bytes - fixed) // max(per_sample, 1.0))))
        seconds = self.seconds(net, patch, 1)
        if not seconds or self.step_seconds is None:
            return limit
        return max(1, min(limit, int(self.step_seconds // seconds)))


def memory_budget(gigabytes: float, bytes_per_element: int, where: str) -> Budget:
    return Budget(bytes_per_element, memory_bytes=gigabytes * 1e9, description=f"{gigabytes:g} GB ({where})")


def cpu_budget(step_seconds: float = CPU_STEP_SECONDS, bytes_per_element: int = 4, remeasure: bool = False) -> Budget:
    rate = cpu_convolution_rate(remeasure, bf16=bytes_per_element == 2)
    return Budget(bytes_per_element, step_seconds=step_seconds, flops_per_second=rate,
                  description=f"{step_seconds:g} s per step on this CPU ({rate / 1e9:.0f} GFLOP/s measured, {torch.get_num_threads()} threads)")


def default_budget(device: torch.device, memory_gb: float | None, step_seconds: float | None,
                   bytes_per_element: int, remeasure: bool = False) -> Budget:
    """``--memory`` wins; else the GPU's memory on CUDA (85 % of it, the rest is the CUDA context and
    the allocator's slack); else ``--step-seconds`` on this CPU if given; else nnU-Net's 8 GB
    reference at 16 bits, whatever this CPU's precision, so that every machine plans alike. The CPU
    throughput is still measured (once, cached; ``remeasure`` measures again) so the table can show
    seconds per step."""
    if memory_gb is not None:
        budget = memory_budget(memory_gb, bytes_per_element, "--memory")
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 1e9
        budget = memory_budget(round(0.85 * total, 1), bytes_per_element, f"85 % of {torch.cuda.get_device_name(device)}")
    elif step_seconds is not None:
        return cpu_budget(step_seconds, bytes_per_element, remeasure)
    else:
        budget = memory_budget(REFERENCE_MEMORY_GB, 2, "nnU-Net's reference GPU; on a CPU the plan does not depend on its speed")
    rate = cpu_convolution_rate(remeasure, bf16=bytes_per_element == 2) if device.type == "cpu" else None
    return Budget(budget.bytes_per_element, memory_bytes=budget.memory_bytes, flops_per_second=rate,
                  description=budget.description)


def _rate_cache() -> Path:
    base = os.environ.get("UNETCLI_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "unetcli") / "cpu_rate.json"


def cpu_convolution_rate(remeasure: bool = False, bf16: bool = False) -> float:
    """FLOP/s of a 32-channel 3x3x3 convolution's forward + backward on this CPU with torch's
    current threads, in fp32 or (``bf16``) under bf16 autocast as bf16 training runs (about twice as
    fast on an AVX-512-BF16 CPU: one fp32 reading there estimated 7.1 s for a step that took 3.6 s).
    The best of a few short runs (about 0.5 s), cached per machine, thread count, precision and
    torch version so every run (and every process of a multi-process run) estimates alike.
    ``remeasure`` replaces the cached reading (one taken while the machine was busy is too low)."""
    key = (f"{platform.node()}|{platform.processor()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
           f"|{'bf16' if bf16 else 'fp32'}")
    path = _rate_cache()
    try:
        readings = json.loads(path.read_text())
        readings = readings if isinstance(readings, dict) and "key" not in readings else {}  # the one-reading format before
    except (OSError, ValueError):
        readings = {}
    if not remeasure and isinstance(readings.get(key), (int, float)):
        return float(readings[key])
    rate = _measure_rate(bf16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**readings, key: rate}))
        tmp.replace(path)
    except OSError:
        pass
    return rate


def _measure_rate(bf16: bool = False) -> float:
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False)
    x = torch.randn(2, 32, 24, 24, 24, requires_grad=True)  # one sample is too small to keep the cores busy
    flops = 3 * 2 * 27 * 32 * 32 * x.shape[0] * math.prod(x.shape[2:])
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().sum().backward()
        best = min(best, time.perf_counter() - start)
    return flops / best
