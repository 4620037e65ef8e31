"""Device, precision and seeding: small functions shared by training and inference."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetcli.errors import ConfigError

log = logging.getLogger("unetcli")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


DEVICE_NAMES = "auto | cpu | cuda | cuda:N | mps"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda:N`` picks a GPU; ``mps`` Apple's GPU.
    Asking for a device this machine does not have is an error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}' is not a device", hint=f"use one of {DEVICE_NAMES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name} was asked for but no CUDA GPU is available", hint="use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}",
                              hint="pick one of them, or --device cuda for the first")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--device mps was asked for but this torch has no MPS (Apple GPU) support here", hint="use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"--device '{name}' is not supported", hint=f"use one of {DEVICE_NAMES}")
    return device


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where bf16 convolutions run natively (AVX512-BF16 or AMX); elsewhere they are emulated
    and many times slower than fp32. Both the CPU's flags and the kernels torch dispatches to
    count: with ``ATEN_CPU_CAPABILITY=avx2`` torch runs AVX2 kernels even on a bf16-capable CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) and ("AVX512" in capability or "AMX" in capability)


def resolve_precision(name: str, device: torch.device) -> str:
    """Pick ``fp32``/``bf16``/``fp16``. ``auto`` picks only what the hardware runs natively."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("fp16 autocast is for CUDA GPUs", hint="use --precision bf16 or fp32 on CPU")
        if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 will be much slower than fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> Any:
    """The loss scaler fp16 training needs (a pass-through otherwise). ``torch.amp.GradScaler`` exists
    from torch 2.3; the package allows torch 2.2, whose scaler lives in ``torch.cuda.amp``."""
    scaler_class = getattr(torch.amp, "GradScaler", None)
    if scaler_class is None:  # torch 2.2
        return torch.cuda.amp.GradScaler(enabled=precision == "fp16")
    return scaler_class(device.type, enabled=precision == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)


def resolve_channels_last(setting: bool | None, device: torch.device) -> bool:
    """``None`` (auto): channels_last on CUDA and where the CPU kernels are AVX-512 (or AMX) ones.

    oneDNN's AVX2 kernels run channels_last convolutions slower than contiguous ones (measured
    0.76x for the 2D training step with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``,
    and slower on a real AVX2-only machine too), its AVX-512 kernels 1.2-1.4x faster.
    """
    if setting is not None:
        return setting
    if device.type == "cuda":
        return True
    capability = torch.backends.cpu.get_cpu_capability()
    return device.type == "cpu" and ("AVX512" in capability or "AMX" in capability)


def memory_format(spatial_dims: int, channels_last: bool) -> torch.memory_format:
    """channels_last (2D) / channels_last_3d (3D) when asked for: faster convolutions on CPUs
    (oneDNN) and GPUs (tensor cores); measured by scripts/bench_train.py and bench_infer.py."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


# glibc mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULT_MMAP_MAX = 65536
_GLIBC_MAX_DYNAMIC_MMAP_THRESHOLD = 32 * 2**20  # where glibc's sliding threshold stops on 64-bit


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - musl and other libcs may lack it
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    return libc


def set_heap_reuse(reuse: bool) -> bool:
    """Keep (``True``) or give back (``False``, glibc's steady-state default) large freed blocks.

    glibc serves every block above 32 MiB (one 8 x 32 x 256 x 256 float32 activation is 64 MiB)
    with a fresh ``mmap`` and unmaps it on free, so each training step or window batch page-faults
    and zeroes its activations again: on 2 CPU cores that was 15 % of a 2D training step and 40 %
    of a 3D forward pass (scripts/bench_train.py, bench_infer.py). With reuse, large blocks come
    from the heap and freed memory stays there for the next step (the reason tcmalloc/jemalloc
    are recommended for PyTorch on CPU). ``False`` restores mmap for blocks above 32 MiB, which
    is what glibc's sliding threshold settles to. Returns False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    if reuse:
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    else:
        ok = (libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
              and libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_DYNAMIC_MMAP_THRESHOLD)
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MAX_DYNAMIC_MMAP_THRESHOLD))
        libc.malloc_trim(0)
    return bool(ok)


def configure_cpu_allocator() -> bool:
    """Turn on heap reuse for this process unless ``UNETCLI_MALLOC=default`` asks not to.

    Called once by ``unet train`` and ``unet predict``; the memory a step frees is kept for the
    next step, so the process's RSS stays at its peak rather than dropping between steps.
    """
    if os.environ.get("UNETCLI_MALLOC", "").lower() == "default":
        log.info("UNETCLI_MALLOC=default: leaving the C allocator at its defaults")
        return False
    tuned = set_heap_reuse(True)
    if tuned:
        log.debug("glibc malloc: large freed blocks are kept for reuse (UNETCLI_MALLOC=default turns this off)")
    return tuned
