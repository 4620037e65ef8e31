"""The fine-tuning benchmark's task: the shipped 2D tissue slices with grey and white matter merged
into one class (``scripts/prepare_finetune_demo.py`` writes it; ``bench_finetune.py`` uses it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path(__file__).resolve().parents[2] / "unetcli" / "demo_data" / "mni_tissue_2d"
LABEL_NAMES = ["background", "brain"]
MERGE = np.array([0, 1, 1], dtype=np.uint8)
"""Shipped class index -> fine-tuning class index (background/CSF, grey matter, white matter -> background, brain)."""


def build(out: Path) -> Path:
    """Write the merged-class dataset into ``out`` (which must not exist or be empty); returns ``out``."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out}: exists and is not empty; pass a new --out folder")
    for split in ("train", "test"):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        for image in sorted((SOURCE / split / "images").glob("*.png")):
            shutil.copyfile(image, out / split / "images" / image.name)
            mask = np.asarray(Image.open(SOURCE / split / "masks" / image.name))
            Image.fromarray(MERGE[mask]).save(out / split / "masks" / image.name)
    return out
