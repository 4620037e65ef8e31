"""Shared test settings and fixtures (data generators live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_blobs


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
