"""Data-parallel training with 2 Gloo processes on the CPU, started the way torchrun starts them
(RANK / WORLD_SIZE / MASTER_ADDR in the environment): same weights as one process with the same
global batch, one run folder, exact resume after a SIGKILL, and a failure on one rank that ends all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import finish, invoke, make_nnunet, start_ranks

from unetcli.checkpoint import load_checkpoint

FLAGS = ["--set", "model.features=[4,8,16]", "--set", "model.norm=batch", "--set", "train.iterations_per_epoch=6",
         "--set", "train.warmup_iterations=2",
         "--batch-size", "4", "--lr", "0.01", "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--seed", "3",
         "--set", "train.num_workers=0"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def two_process_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("ddp")
    results = finish(start_ranks(["-q", "train", str(data), "--out", "run", "--epochs", "2", *FLAGS], cwd))
    assert all(code == 0 for code, _ in results), results
    return cwd / "run"


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run: Path, data: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert invoke("-q", "train", data, "--out", single, "--epochs", "2", *FLAGS).exit_code == 0
    a, b = weights(single), weights(two_process_run)
    assert list(a) == list(b)  # synced BatchNorm keeps the checkpoint's keys
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-5
    assert any("running_var" in k for k in a)  # BatchNorm statistics were part of the comparison
    assert load_checkpoint(two_process_run / "checkpoints" / "last.pt")["resume"]["world_size"] == 2


def test_rank_zero_alone_writes_one_run_folder(two_process_run: Path) -> None:
    assert sorted(p.name for p in two_process_run.parent.iterdir()) == ["run"]
    log = (two_process_run / "log.txt").read_text()
    assert "world size 2" in log and log.count("epoch 2/2") == 1  # one log, not one per rank
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(two_process_run: Path, data: Path, tmp_path: Path) -> None:
    args = ["-q", "train", str(data), "--out", "run", "--epochs", "2", "--set", "train.checkpoint_interval=2", *FLAGS]
    procs = start_ranks(args, tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    for p in procs:  # like a power cut: no handler runs
        p.send_signal(signal.SIGKILL)
    finish(procs)
    killed_at = load_checkpoint(last)["iteration"]
    assert killed_at < 12, "the run finished before it could be killed"
    results = finish(start_ranks(["-q", "train", "--resume", "run"], tmp_path))
    assert all(code == 0 for code, _ in results), results
    a, b = weights(two_process_run), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_on_one_rank_ends_every_rank_with_one_clear_line(tmp_path: Path) -> None:
    """Rank 1 cannot write its preprocessing cache; rank 0 would wait for it in the first collective."""
    data = make_nnunet(tmp_path / "vol", n=3)
    env = {0: {"UNETCLI_CACHE": str(tmp_path / "cache")}, 1: {"UNETCLI_CACHE": "/dev/null/cache"}}
    started = time.monotonic()
    procs = start_ranks(["train", str(data), "--out", "run", "--epochs", "1", *FLAGS], tmp_path, env_of_rank=env)
    results = finish(procs, timeout=60)
    assert time.monotonic() - started < 45
    assert all(code != 0 for code, _ in results), results
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: /dev/null/cache: cannot create the preprocessing cache (Not a directory)"]
    assert not any("Traceback" in err for _, err in results)


def test_a_batch_every_rank_refuses_gives_one_error_line(data: Path, tmp_path: Path) -> None:
    """Every rank refuses the same config at once: one `error: rank N: ...` line in all, not a rank
    killed by another's failure report before it could print (or a line per rank)."""
    flags = [f if f != "4" else "3" for f in FLAGS]  # --batch-size 3 for 2 processes
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "unetcli",
               "train", str(data), "--out", "run", "--epochs", "1", *flags]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: rank ") and "train.batch_size 3 cannot be shared equally by 2 processes" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_batch_that_cannot_be_shared_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from unetcli.errors import ConfigError
    from unetcli.training import distributed

    monkeypatch.setattr(distributed, "current_world", lambda: distributed.World(rank=0, world_size=2))
    distributed.check_batch_divides(4)
    with pytest.raises(ConfigError, match="train.batch_size 3 cannot be shared equally by 2 processes"):
        distributed.check_batch_divides(3)


def test_gpus_option_without_cuda_is_one_clear_error(data: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs")
    result = invoke("train", data, "--gpus", "2")
    assert result.exit_code == 2
    assert "--gpus 2 asks for more CUDA GPUs than this machine has (0)" in result.output


@pytest.mark.slow
def test_torchrun_line_from_the_readme_trains_one_run(data: Path, tmp_path: Path) -> None:
    """The launcher users type: torchrun --standalone --nproc-per-node 2 -m unetcli train ..."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "unetcli", "-q",
               "train", str(data), "--out", "run", "--epochs", "1", *FLAGS]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert "world size 2" in (tmp_path / "run" / "log.txt").read_text()
