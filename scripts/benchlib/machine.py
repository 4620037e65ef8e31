"""Machine description, peak-RSS bookkeeping, timing and table printing for the scripts in
``scripts/``. Importing it does not import torch (``bench_eval.py`` times worker processes that
must start before torch is loaded)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    import torch

    from unetcli.runtime import cpu_flags

    flags = cpu_flags()  # the same reading --precision auto decides from
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": {f: f in flags for f in INTERESTING_FLAGS},
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def print_machine(info: dict[str, Any]) -> None:
    flags = "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["cpu_flags"].items())
    print(f"machine : {info['cpu']}")
    print(f"flags   : {flags}")
    print(f"torch   : {info['torch']}  threads={info['torch_threads']}  cpu_capability={info['cpu_capability']}"
          f"  python {info['python']}")
    print(f"device  : {info['device']}" + (f"  ({info['gpu']})" if info["gpu"] else ""))


def load_note() -> str:
    """The 1-minute load average against the core count: other processes on the same cores
    slow every variant down unevenly, so ratios get noisy (see the spread columns)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    cores = os.cpu_count() or 1
    note = f"load average (1 min) {load:.1f} on {cores} cores"
    if load > cores + 0.5:
        note += " -- OTHER PROCESSES ARE COMPETING FOR THE CPU: expect noisy figures"
    return note


# --------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB: ``VmHWM`` from /proc/self/status.

    ``getrusage().ru_maxrss`` reads the same high-water mark but takes the maximum with the
    RSS the process had *before its exec*: a child forked from a 1 GB Python parent reports
    >= 1 GB whatever it does itself. VmHWM does not carry that over. ``ru_maxrss`` is the
    fallback where /proc is missing.
    """
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else float("nan")


def _proc_status_mib(key: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def release_memory() -> None:
    """Return freed heap memory to the OS (``gc`` + glibc ``malloc_trim``) so that the next
    phase's RSS peak is not hidden under memory an earlier phase freed but malloc kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    After a successful reset :func:`peak_rss_mib` reports the peak since the reset, which lets
    one process attribute a peak to each phase. Returns False where that is not possible (then
    the figure stays the whole-process peak and per-phase figures are upper bounds).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def with_peak_rss(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn``; return its result and the peak RSS increment (MiB) over the RSS before it."""
    release_memory()
    before = current_rss_mib()
    reset_peak_rss()
    result = fn()
    return result, peak_rss_mib() - before


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by ``fn()``, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_wall_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over all threads) taken by ``fn()``.

    On a shared machine the wall time also counts time this process spent waiting for a core;
    CPU time does not (but OpenMP threads spin-waiting for a descheduled sibling add to it). On a
    quiet machine CPU time ~= wall time x threads. On CUDA the CPU time is host time only.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of repeated timings: how noisy a figure is."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / statistics.median(values)


# --------------------------------------------------------------------------- output


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = ["<"] + [">"] * (len(headers) - 1)
    for n, row in enumerate(cells):
        print("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, aligns, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
