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
import tempfile
from pathlib import Path

from benchlib.finetune_data import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder to create (default: a new temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="unetcli-finetune-"))
    print(build(out))


if __name__ == "__main__":
    main()
