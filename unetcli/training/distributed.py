"""Data-parallel training on PyTorch's own engine: ``torchrun`` starts the processes, this module
joins them (NCCL on GPUs, Gloo on CPUs), wraps the model, shares out each global batch, syncs
BatchNorm and makes every rank stop together.

One process (no ``torchrun``) is a world of size 1 and nothing here changes its arithmetic.
Under ``torchrun`` every rank builds the same global batch ``i`` from the stateless sampler and
keeps its own slice of it (building a batch costs well under 1 % of a step; see
``scripts/bench_data.py``), so the data each step sees is the same for any process count, and the
averaged DDP gradient equals the single-process gradient of the whole batch.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from unetcli.errors import ConfigError, TrainingError

log = logging.getLogger("unetcli")

FAILURE_KEY = "unetcli/failed"
"""Store key a failing rank sets so that the others stop instead of waiting in a collective."""
WATCH_INTERVAL = 0.3
"""Seconds between two looks at the store for another rank's failure."""
TIMEOUT_SECONDS = int(os.environ.get("UNETCLI_DIST_TIMEOUT", "900"))
"""How long a collective may wait for the other ranks before it fails with an error."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def join_world(device_name: str) -> World:
    """Join the process group ``torchrun`` set up (a no-op for a single process), once per process.

    The backend follows the device: NCCL where training runs on CUDA, Gloo on CPU. Each rank
    then watches the store for another rank's failure (see :func:`report_failure`).
    """
    if not launched_by_torchrun():
        return World()
    if dist.is_initialized():
        return current_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    world = current_world()
    if not world.is_main:
        log.setLevel(logging.WARNING)  # one progress log, rank 0's; warnings and errors from every rank
    global _watcher
    _watch_stop.clear()
    _watcher = threading.Thread(target=_watch_for_failures, args=(world.rank,), daemon=True, name="unetcli-failure-watch")
    _watcher.start()
    return world


def report_failure(exc: BaseException) -> bool:
    """Tell the other ranks that this one failed, so they exit within a second instead of
    waiting in a collective until it times out. Safe to call in any state. Returns False when
    another rank reported a failure first (e.g. every rank refused the same config): that rank
    prints the one error line, this one exits quietly."""
    world = current_world()
    if not world.distributed:
        return True
    _watch_stop.set()  # this rank reports (and prints) its own failure: its watch must not end it first
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    code = getattr(exc, "exit_code", 1)
    try:
        first = int(_store().add(FAILURE_KEY + "/count", 1)) == 1
        if first:
            _store().set(FAILURE_KEY, f"{world.rank}|{code}|{message}")
    except Exception:  # the store may be gone already (the launcher died); the timeout still ends the wait
        return True
    # The store may live in this process (rank 0 without torchrun's agent): stay until the others read it.
    time.sleep(3 * WATCH_INTERVAL)
    return first


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()


_watch_stop = threading.Event()
_watcher: threading.Thread | None = None


def _watch_for_failures(rank: int, interval: float = WATCH_INTERVAL) -> None:
    """Poll the store; when another rank reports a failure, leave at once (exit code of that
    rank). The main thread may be blocked inside a collective, so only a hard exit ends it."""
    store = _store()
    while not _watch_stop.wait(interval):
        try:
            if not store.check([FAILURE_KEY]):
                continue
            failed_rank, code, _ = store.get(FAILURE_KEY).decode().split("|", 2)
        except Exception:
            return  # the store is gone: the run is over
        if int(failed_rank) != rank:
            sys.stderr.flush()
            os._exit(int(code) or 1)


def leave_world() -> None:
    """Stop the failure watch, then leave the process group. The watch thread must not be inside
    a store call while the process group is torn down at exit (that aborts the process)."""
    _watch_stop.set()
    if _watcher is not None and _watcher.is_alive():
        _watcher.join(timeout=5)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- model and batches


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are pooled over all ranks, for CPU (Gloo) training,
    where ``torch.nn.SyncBatchNorm`` is not supported. Per-channel sums and squared sums are
    all-reduced with autograd, so the forward and backward equal one BatchNorm over the whole
    global batch. Same parameters and buffers as ``BatchNorm{2,3}d``: checkpoints are unchanged."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"expected an (N, C, *S) input, got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        stats = dist_fn.all_reduce(torch.cat([x.float().sum(dims), (x.float() * x.float()).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batch_norm(model: nn.Module, device: torch.device) -> None:
    """Replace, in place, every BatchNorm inside ``model`` by one synced over the ranks (before
    building the optimiser: the parameters are new tensors). No-op for one process."""
    if not current_world().distributed:
        return
    for name, child in list(model.named_children()):
        model.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child) if device.type == "cuda" else _convert_cpu(child))


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def wrap_for_training(model: nn.Module, device: torch.device, frozen_parts: bool = False) -> nn.Module:
    """The module the training step calls: DistributedDataParallel over the ranks, or ``model``.
    ``frozen_parts``: some parameters get no gradient for a while (a frozen encoder)."""
    if not current_world().distributed:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=frozen_parts)


def check_batch_divides(batch_size: int) -> None:
    world = current_world()
    if batch_size % world.world_size:
        raise ConfigError(f"train.batch_size {batch_size} cannot be shared equally by {world.world_size} processes",
                          hint=f"use a global batch size that is a multiple of {world.world_size}")


def rank_share(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the global batch."""
    world = current_world()
    if not world.distributed:
        return images, labels
    per_rank = images.shape[0] // world.world_size
    part = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    return images[part], labels[part]


# --------------------------------------------------------------------------- agreeing across ranks


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop request)."""
    if not current_world().distributed:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over the ranks (e.g. elapsed seconds, so that every rank takes the same
    learning rate and stops at the same iteration of a time budget)."""
    if not current_world().distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if not current_world().distributed:
        return value
    total = value.detach().clone().float().cpu()
    dist.all_reduce(total)
    return (total / current_world().world_size).to(value.device)


def first_over_ranks(first_bad: torch.Tensor) -> torch.Tensor:
    """The earliest non-finite iteration over the ranks (-1 where none)."""
    if not current_world().distributed:
        return first_bad
    big = torch.iinfo(torch.int64).max
    value = torch.where(first_bad < 0, torch.full_like(first_bad, big), first_bad).cpu().reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return torch.where(value >= big, torch.full_like(value, -1), value).reshape(()).to(first_bad.device)


def gather_rows(rows: list[Any]) -> list[Any]:
    """Every rank's ``rows``, concatenated in rank order, on every rank."""
    if not current_world().distributed:
        return rows
    parts: list[Any] = [None] * current_world().world_size
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def my_share(names: Sequence[str]) -> list[str]:
    """The validation cases this rank predicts (every world_size-th, from its rank)."""
    world = current_world()
    return list(names[world.rank::world.world_size])


# --------------------------------------------------------------------------- launching


def launch_on_gpus(gpus: int, argv: Sequence[str]) -> int:
    """``unet train ... --gpus N``: run the same command under ``torchrun`` with N processes on
    this machine; returns torchrun's exit code."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be at least 1", hint="leave --gpus out to train in this process")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > available:
        raise ConfigError(f"--gpus {gpus} asks for more CUDA GPUs than this machine has ({available})",
                          hint="for several CPU processes run: torchrun --nproc-per-node N -m unetcli train ...")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m", "unetcli", *argv]
    log.info("launching: %s", " ".join(command))
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:  # torchrun forwards the signal to the ranks, which save and stop
        return 130


def collective_timeout(exc: RuntimeError) -> TrainingError | None:
    """A clear error for a collective that waited too long for another rank (None otherwise)."""
    text = str(exc)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return None
    world = current_world()
    return TrainingError(f"rank {world.rank}: waited more than {TIMEOUT_SECONDS} s for the other processes "
                         f"({text.splitlines()[0][:200]})",
                         hint="another rank died or hangs; check its output, or raise UNETCLI_DIST_TIMEOUT (seconds)")
