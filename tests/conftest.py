"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests that pass --num-threads change torch's process-wide setting; put it back after each."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
