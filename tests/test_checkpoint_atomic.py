"""Tests for unetcli.checkpoint (safe loading, format checks) and unetcli.atomic (atomic writes)."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from unetcli.atomic import atomic_path, atomic_write_bytes, atomic_write_text, atomic_write_with
from unetcli.errors import CheckpointError
from unetcli.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, resolve_checkpoint, save_checkpoint


def minimal_state() -> dict:
    return {"config": {"model": {"features": [4, 8]}}, "metadata": {"label_values": [0, 1]}, "model": {}}


def full_state() -> dict:
    torch.manual_seed(0)
    return {
        "config": {"model": {"features": [4, 8], "skip": "concat"}, "train": {"lr": 0.003, "grad_clip": None}},
        "metadata": {"label_names": ["bg", "fg"], "label_values": [0, 255], "patch_size": (64, 64), "binary": True},
        "model": OrderedDict(w=torch.randn(3, 4), b=torch.arange(5, dtype=torch.int64), h=torch.ones(2, dtype=torch.bfloat16)),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "epoch": 7,
        "best_score": 0.875,
        "history": [{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": float("inf")}],
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


# --------------------------------------------------------------------------- checkpoints


def test_round_trip(tmp_path):
    state = full_state()
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["format_version"] == FORMAT_VERSION
    assert "unetcli_version" in loaded
    for key, value in state.items():
        assert_same(value, loaded[key])
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temp files left


def test_model_weights_restore(tmp_path):
    from unetcli.models import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8))
    save_checkpoint(tmp_path / "c.pt", {**minimal_state(), "model": net.state_dict()})
    other = UNet(2, 1, 2, features=(4, 8))
    other.load_state_dict(load_checkpoint(tmp_path / "c.pt")["model"])
    for (name, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, full_state())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in info.value.message


def test_truncated_legacy_format_checkpoint(tmp_path):
    path = tmp_path / "legacy.pt"
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **minimal_state(), "model": {"w": torch.ones(3)}}
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["model"]["w"].sum() == 3  # the intact legacy file loads
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    for seed in range(5):
        path.write_bytes(np.random.default_rng(seed).bytes(3000))
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in info.value.message


class _OpensAFile:
    """Unpickling this would call open(marker, 'w'): arbitrary code on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **minimal_state(), "x": _OpensAFile(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(path)
    assert str(path) in info.value.message
    assert "nothing in the file was executed" in info.value.hint
    assert not marker.exists()


def test_refused_message_is_plain_text(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": _OpensAFile(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not re.search(r"\x1b\[", str(info.value))


def test_wrong_format_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "format_version": 99, **minimal_state()}, path)
    with pytest.raises(CheckpointError, match="version 99") as info:
        load_checkpoint(path)
    assert str(FORMAT_VERSION) in info.value.message


def test_not_a_unetcli_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a unetcli checkpoint"):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a unetcli checkpoint"):
        load_checkpoint(path)


def test_missing_entry(tmp_path):
    path = tmp_path / "c.pt"
    state = minimal_state()
    del state["model"]
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="'model'"):
        load_checkpoint(path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt") as info:
        resolve_checkpoint(run)
    assert str(run) in info.value.message
    save_checkpoint(run / "checkpoints" / "last.pt", minimal_state())
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.pt"  # falls back to last
    save_checkpoint(run / "checkpoints" / "best.pt", minimal_state())
    assert resolve_checkpoint(run) == run / "checkpoints" / "best.pt"
    assert resolve_checkpoint(run, "last") == run / "checkpoints" / "last.pt"
    assert resolve_checkpoint(run / "checkpoints" / "last.pt") == run / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "missing_run")


def test_resolve_checkpoint_empty_folder(tmp_path):
    with pytest.raises(CheckpointError):
        resolve_checkpoint(tmp_path)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old content", encoding="utf-8")
    atomic_write_text(target, "new content \u00e9\n")
    assert target.read_text(encoding="utf-8") == "new content \u00e9\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


def test_writer_error_keeps_original_and_removes_temp(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("original\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half writ", encoding="utf-8")
            raise RuntimeError("disk on fire")
    assert target.read_text(encoding="utf-8") == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "x.txt"

    def writer(path: Path) -> None:
        path.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, writer)
    assert list(tmp_path.iterdir()) == []


def test_temp_name_keeps_suffix(tmp_path):
    with atomic_path(tmp_path / "pred.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    with atomic_path(tmp_path / "mask.png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "pred.nii.gz"]
