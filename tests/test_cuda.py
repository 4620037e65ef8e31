"""The CUDA code paths: autocast dtypes and ``--precision auto``, fp16 training with a GradScaler,
pinned-memory batches, channels_last convolutions, ``unet train --device cuda`` end to end, and
data-parallel training on 2 GPUs with NCCL (started the way torchrun starts its workers).

Skipped without a CUDA GPU; ``scripts/gpu_check.sh`` runs them (``pytest -m cuda``) on a GPU machine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import finish, invoke, make_blobs, start_ranks

from unetcli.data.sampling import PatchSampler, iterate_batches
from unetcli.data.types import Case
from unetcli.models import UNet
from unetcli.runtime import autocast, memory_format, resolve_channels_last, resolve_precision
from unetcli.checkpoint import load_checkpoint
from unetcli.training.losses import DiceCELoss
from unetcli.training.trainer import train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TINY = ["--set", "model.features=[8,16,32]", "--set", "train.iterations_per_epoch=4", "--set", "train.warmup_iterations=1",
        "--batch-size", "4", "--lr", "0.01", "--seed", "3"]


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def tiny_unet(dims: int = 2, classes: int = 3) -> UNet:
    torch.manual_seed(0)
    return UNet(dims, 1, classes, features=(8, 16, 32))


@pytest.fixture
def strict_fp32() -> Iterator[None]:
    """No TF32 in convolutions and matmuls for the block, so fp32 results are fp32-accurate."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_gives_logits_in_the_asked_dtype(precision: str) -> None:
    if precision == "bf16" and not bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = tiny_unet().to(CUDA).eval()
    x = torch.randn(2, 1, 32, 32, device=CUDA)
    with torch.no_grad():
        with autocast(CUDA, precision):
            logits = model(x)
        with autocast(CUDA, "fp32"):
            full = model(x)
    assert logits.dtype == DTYPES[precision] and logits.device.type == "cuda"
    assert logits.shape == (2, 3, 32, 32) and bool(torch.isfinite(logits).all())
    assert full.dtype == torch.float32
    assert float((logits.float() - full).abs().max()) < 0.1  # the same network, only rounded differently


def test_auto_precision_is_bf16_where_the_gpu_has_it_else_fp16() -> None:
    assert resolve_precision("auto", CUDA) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert resolve_precision("fp16", CUDA) == "fp16"  # refused on CPU, allowed here
    assert resolve_channels_last(None, CUDA) is True


def test_fp16_training_with_grad_scaler_learns() -> None:
    """A few ``train_step``s in fp16 with the scaler the trainer builds: loss finite and falling,
    the scale finite (gradient clipping makes the step unscale first)."""
    model = tiny_unet().to(CUDA).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 32, 32, generator=gen)
    labels = (images[:, 0] > 0.5).long() + (images[:, 0] < -0.5).long() * 2  # a function of the pixel: learnable
    images, labels = images.to(CUDA), labels.to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", enabled=True)
    loss_fn = DiceCELoss().to(CUDA)
    losses = [float(train_step(model, images, labels, loss_fn, optimizer, scaler, CUDA, "fp16", grad_clip=12.0))
              for _ in range(15)]
    assert all(math.isfinite(v) for v in losses), losses
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    assert scaler.is_enabled() and math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- data and memory format


def test_pinned_memory_batches_match_the_in_process_ones() -> None:
    rng = np.random.default_rng(0)
    cases = [Case(f"c{i}", rng.normal(size=(1, 32, 32)).astype(np.float32), rng.integers(0, 3, (32, 32)).astype(np.int64))
             for i in range(3)]
    sampler = PatchSampler(cases, (32, 32), batch_size=2, num_classes=3, seed=1)
    batches = list(iterate_batches(sampler, 0, 2, num_workers=1, pin_memory=True))
    assert len(batches) == 2
    for i, (images, labels) in enumerate(batches):
        assert images.is_pinned() and labels.is_pinned()
        expected_images, expected_labels = sampler.batch(i)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
        on_gpu = images.to(CUDA, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), expected_images)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_contiguous_output(dims: int, strict_fp32: None) -> None:
    fmt = memory_format(dims, True)
    model = tiny_unet(dims).to(CUDA).eval()
    fast = copy.deepcopy(model).to(memory_format=fmt)
    weight = next(p for p in fast.parameters() if p.ndim == dims + 2 and p.shape[1] > 1)
    assert weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()
    x = torch.randn((2, 1) + (32,) * dims, device=CUDA)
    with torch.no_grad():
        expected = model(x)
        got = fast(x.contiguous(memory_format=fmt))
    assert float((got - expected).abs().max()) < 1e-3


# --------------------------------------------------------------------------- end to end


def test_unet_train_and_predict_on_cuda(tmp_path: Path) -> None:
    """``unet train --device cuda`` with batch-building workers (pinned memory), then ``unet predict``
    on the GPU."""
    data = make_blobs(tmp_path / "blobs", n=6)
    run = tmp_path / "run"
    result = invoke("train", data, "--out", run, "--epochs", "1", "--device", "cuda", "--precision", "auto",
                    "--set", "train.num_workers=1", *TINY)
    assert result.exit_code == 0, result.output
    log = (run / "log.txt").read_text()
    precision = resolve_precision("auto", CUDA)
    assert "device cuda" in log and f"precision {precision}" in log and "channels_last" in log, log
    weights = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())
    predicted = invoke("predict", run, data / "images", tmp_path / "pred", "--device", "cuda")
    assert predicted.exit_code == 0, predicted.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == 6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_nccl_train_one_run(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "blobs", n=6)
    procs = start_ranks(["-q", "train", str(data), "--out", "run", "--epochs", "2", "--device", "cuda", "--precision", "auto",
                         "--set", "train.num_workers=0", *TINY], tmp_path, n=2)
    results = finish(procs, timeout=300)
    assert all(code == 0 for code, _ in results), results
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "run"]  # rank 0 alone writes
    log = (run / "log.txt").read_text()
    assert "world size 2" in log and "device cuda" in log and log.count("epoch 2/2") == 1, log
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["resume"]["world_size"] == 2
    single = UNet(2, 1, 3, features=(8, 16, 32)).state_dict()
    assert list(checkpoint["model"]) == list(single)  # SyncBatchNorm leaves the checkpoint's keys as they were
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint["model"].values() if v.is_floating_point())
