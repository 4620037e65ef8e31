"""Checkpoints: plain containers of tensors and numbers, written atomically, read without pickle code.

A checkpoint carries everything prediction needs (model config, label values and names,
channel names, normalisation, patch size), so ``unet predict RUN`` needs no other file.
Loading uses ``torch.load(weights_only=True)``: a file carrying pickled objects that would
run code is refused, not executed.
"""

from __future__ import annotations

import pickle
import random
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetcli import __version__
from unetcli.atomic import atomic_path
from unetcli.errors import CheckpointError, OutputError

FORMAT = "unetcli-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain containers and tensors only) to ``path`` atomically."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "unetcli_version": __version__, **state}
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise OutputError(f"{path}: cannot write the checkpoint ({reason}); the previous one, if any, is intact",
                          hint=f"check the free space and permissions of {Path(path).parent}") from exc


def resolve_checkpoint(run: Path, which: str = "best") -> Path:
    """A run folder -> its ``checkpoints/{which}.pt`` (falling back to ``last.pt``); a file -> itself."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise CheckpointError(f"{run}: run folder or checkpoint not found", hint="pass the folder `unet train` wrote (its --out)")
    for name in (which, "last"):
        candidate = run / "checkpoints" / f"{name}.pt"
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{run}: no checkpoints/{which}.pt or checkpoints/last.pt inside", hint="is this a unetcli run folder?")


def state_dict_problem(exc: BaseException) -> str:
    """The telling line of a ``load_state_dict`` error (a size mismatch or missing/unexpected keys)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    text = (useful or lines or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        first = (f"it references {found[1]}" if found
                 else next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "unsupported content"))
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data ({first[:200]})",
            hint="only load checkpoints written by unetcli; nothing in the file was executed",
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError, struct.error) as exc:
        raise CheckpointError(
            f"{path}: checkpoint is corrupt or truncated ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})",
            hint="use the run's other checkpoint (best.pt / last.pt) or retrain",
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unetcli checkpoint", hint="pass a checkpoint written by `unet train`")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported by unetcli {__version__} (expects {FORMAT_VERSION})",
            hint="use the unetcli version that wrote it",
        )
    for key in ("config", "metadata", "model"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks its '{key}' entry", hint="the file is incomplete; retrain or use another checkpoint")
    return state


# --------------------------------------------------------------------------- random number generators
# Checkpoints are read with weights_only=True, so RNG states are stored as tensors, lists and ints
# (no numpy arrays, no tuples of arbitrary objects).


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, numpy's (global), torch's CPU and every CUDA generator."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss},
        "numpy": {"kind": str(kind), "keys": [int(v) for v in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only where the same GPUs are there)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
