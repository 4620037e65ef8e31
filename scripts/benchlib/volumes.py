"""NIfTI and source-data helpers shared by the ``prepare_*`` scripts."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")

AAL_COLIN_LICENCE_AND_CITATIONS = (
    "Licence: see `debian-copyright` (the Debian `mricron-data` package's copyright file,\n"
    "copied here unchanged; BSD-3-clause for the package).\n\n"
    "Citations (required when using AAL / Colin27):\n"
    "- Tzourio-Mazoyer N. et al., \"Automated anatomical labeling of activations in SPM\n"
    "  using a macroscopic anatomical parcellation of the MNI MRI single-subject brain\",\n"
    "  NeuroImage 15(1):273-289, 2002.\n"
    "- Holmes C.J. et al., \"Enhancement of MR images using registration for signal\n"
    "  averaging\", J Comput Assist Tomogr 22(2), 1998.\n\n"
)


def read_aal_names(path: Path) -> dict[int, str]:
    """Parse ``aal.nii.txt`` lines ``<index> <name> [<code>]``."""
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def extract(volume: np.ndarray, starts: tuple[int, ...], stops: tuple[int, ...]) -> np.ndarray:
    """Sub-volume [starts, stops) of ``volume``, zero-filled where it leaves the array."""
    out = np.zeros(tuple(b - a for a, b in zip(starts, stops)), dtype=volume.dtype)
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(starts, stops, volume.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, starts))
    out[dst] = volume[src]
    return out


def replace_dir(build: Callable[[Path], T], out: Path, overwrite: bool) -> T:
    """Run ``build(tmp)`` into ``OUT.tmp`` and move it to ``out`` when it succeeds."""
    out = out.resolve()
    if out.exists() and not overwrite:
        raise SystemExit(f"{out} exists (use --overwrite)")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        result = build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return result
