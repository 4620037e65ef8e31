"""Tests for unetcli.runtime: the precision `auto` picks and the C allocator setting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from unetcli import runtime
from unetcli.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f"}, "fp32"),  # emulated bf16 is many times slower than fp32: auto must not pick it
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    (set(), "fp32"),
])
def test_auto_precision_follows_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert runtime.resolve_precision("auto", CPU) == expected


def test_auto_precision_is_fp32_when_torch_runs_avx2_kernels(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on a bf16-capable CPU: the kernels cannot use its bf16 instructions."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert runtime.resolve_precision("auto", CPU) == "fp32"


def test_explicit_precision_is_kept_and_fp16_on_cpu_is_refused(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    with caplog.at_level("WARNING", logger="unetcli"):
        assert runtime.resolve_precision("bf16", CPU) == "bf16"
    assert "much slower" in caplog.text
    with pytest.raises(ConfigError, match="fp16"):
        runtime.resolve_precision("fp16", CPU)


_PAGE_FAULTS = textwrap.dedent("""
    import resource, torch
    from unetcli import runtime
    tuned = runtime.configure_cpu_allocator()
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(3, 16, 512, 512)  # 48 MiB activations: above every mmap threshold glibc picks by itself

    @torch.no_grad()
    def step():
        return float(torch.relu(conv(x) * 2).sum())

    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults_of_three_steps(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "UNETCLI_MALLOC"}
    if env_value is not None:
        env["UNETCLI_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, env=env, check=True)
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(runtime._glibc() is None, reason="heap reuse is a glibc setting")
def test_heap_reuse_stops_each_step_from_page_faulting_its_activations_again():
    tuned, faults_tuned = _page_faults_of_three_steps(None)
    default, faults_default = _page_faults_of_three_steps("default")
    assert (tuned, default) == ("True", "False")
    # glibc's defaults unmap the 48 MiB blocks on free and fault them in again every step.
    assert faults_default > 3 * 12288
    assert faults_tuned * 3 < faults_default


@pytest.mark.parametrize("capability,expected", [("AVX512", True), ("AVX512_BF16", True), ("AMX", True),
                                                 ("AVX2", False), ("DEFAULT", False)])
def test_auto_channels_last_only_on_avx512_kernels(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert runtime.resolve_channels_last(None, CPU) is expected
    assert runtime.resolve_channels_last(True, CPU) is True  # an explicit choice is kept
    assert runtime.resolve_channels_last(False, CPU) is False
