#!/usr/bin/env python
"""Build the fine-tuning demo dataset from the shipped 2D tissue slices (nothing new is shipped).

    python scripts/prepare_finetune_demo.py [--out DIR]    # default: a new temporary folder

The images are those of ``unetcli/demo_data/mni_tissue_2d`` unchanged; the masks merge grey
and white matter into one class, so the task has another class count than the shipped one:
0 background/CSF, 1 brain (grey + white matter). The split is the shipped one:

    DIR/train/images, DIR/train/masks   the 40 training slices
    DIR/test/images,  DIR/test/masks    the 15 held-out slices (z = 90..118)

The script prints DIR. ``scripts/bench_finetune.py`` uses it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path(__file__).resolve().parents[1] / "unetcli" / "demo_data" / "mni_tissue_2d"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder to create (default: a new temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="unetcli-finetune-"))
    print(build(out))


if __name__ == "__main__":
    main()
