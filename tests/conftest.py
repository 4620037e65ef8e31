"""Shared test settings and fixtures (data generators live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_blobs


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Run the suite's tiny networks on one thread, in this process and in the CLI subprocesses.

    On 32 x 32 blobs a second thread buys nothing and costs every operator a thread hand-off; on a
    machine with other work on the second core the hand-off spins, and the suite ran 2-3x slower.
    The demo tests, which train real-sized networks, give their subprocess all threads back.
    """
    previous = torch.get_num_threads()
    patch = pytest.MonkeyPatch()
    patch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    patch.undo()
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests that pass --num-threads change torch's process-wide setting; put it back after each."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six tiny blob images with masks, made afresh for each test module (tests may change their copy)."""
    return make_blobs(tmp_path_factory.mktemp("data") / "blobs", n=6)
