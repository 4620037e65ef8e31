#!/usr/bin/env python
"""Build a thick-slice brain-tissue dataset (nnU-Net v2 raw layout) for the planning benchmark.

Usage::

    python scripts/prepare_thick_slice_data.py OUT [--spacing 1,1,4] [--overlap-mm 10]
        [--test-blocks LAS,RAS] [--held-out-orientation SLA] [--source DIR] [--overwrite]

Why
---
Clinical MRI is often acquired with thick slices (e.g. 1 x 1 mm in plane, 4-5 mm apart), and
test scans are not always stored in the same voxel orientation as the training scans. This
dataset lets a benchmark check what a segmentation tool *plans* for such data (target
spacing, patch shape, anisotropic kernels/strides, normalisation) and whether its
predictions survive a change of storage orientation, against nnU-Net v2 as the reference
(``scripts/nnunet_reference.py``). ``--spacing 2,2,2`` builds an isotropic control dataset
from the same source.

What it builds
--------------
Source: the MNI ICBM 2009a nonlinear symmetric template (``t1.nii.gz``,
``gm_probability.nii.gz``, ``wm_probability.nii.gz``; 197x233x189, 1 mm isotropic, RAS,
uint8, skull-stripped T1) in ``shared/data/mni152_2009a``. Provenance and licence: see
``NOTICE.md`` in that folder (Copyright (C) Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University; Fonov et al., NeuroImage 54(1), 2011;
Fonov et al., NeuroImage 47 S102, 2009). Anything derived from these files and shipped must
carry that notice.

* Labels (1 mm): ``argmax(bg, gm, wm)`` with ``gm, wm`` the probability maps (/255) and
  ``bg = clip(1 - gm - wm, 0, 1)`` (ties go to the lower label), restricted to the
  skull-stripped brain (``T1 > 0``; outside it the label is 0). 0 = background/CSF,
  1 = grey matter, 2 = white matter.
* Cases: the brain's bounding box (``T1 > 0``) is cut at its centre along x, y and z into
  8 octants; each octant is extended by ``overlap/2`` mm past the cut voxel on every inner
  face (so neighbouring blocks share a slab of ``overlap + 1`` 1 mm voxels centred on the cut
  voxel; default ``--overlap-mm 10``). Block bounds are then snapped outwards to the output
  grid (multiples of the spacing factor from the template's voxel 0), so every case lies on
  one common world grid. Case names give the octant
  as three letters: ``mni_LPI`` = left, posterior, inferior (the template is RAS: array
  index increases to the Right, Anterior, Superior). The x cut is the template's mid-line
  (world x = 0), so the L and R blocks are mirror images of each other (the template is
  symmetric; exactly so for a 1 mm x spacing, to within one 1 mm voxel for an even x factor,
  whose grid cannot be symmetric about a voxel centre).
* Split: ``--test-blocks`` (default ``LAS,RAS``: the two anterior-superior octants, a
  left/right *mirror pair*) are held out for test; the other 6 are training cases. Holding
  out a mirror pair together means that no training block is the mirror image of a test
  block, which matters because nnU-Net-style training mirrors patches and the template is
  symmetric. Test blocks still share the overlap slabs with their training neighbours (the
  summary prints that fraction; use ``--overlap-mm 0`` for none).
* Thick slices: each case is re-gridded from 1 mm to ``--spacing`` (default ``1,1,4``: x and y
  in-plane 1 mm, z = 4 mm) by integer blocks of the 1 mm grid. Image = mean of the block
  (for 1,1,4: the average of 4 consecutive axial slices, i.e. realistic partial volume),
  stored as float32. Label = majority of the 1 mm labels in the block, ties broken by the
  larger mean class probability (then by the lower label). The affine has the new zooms and
  puts each voxel at the centre of the 1 mm voxels it averages.
* Held-out orientation: the test cases are written twice. ``imagesTs``/``labelsTs`` use the
  same storage as training (RAS). ``imagesTs_reoriented``/``labelsTs_reoriented`` hold the same
  voxels stored in the orientation ``--held-out-orientation`` (default ``SLA``: the thick
  z axis becomes the first array axis, and x is flipped to run Right->Left), with the affine
  updated so that world coordinates are unchanged. The script verifies this with nibabel:
  the axis codes differ from the training cases', reorienting back reproduces the arrays
  and affine exactly, and every reoriented voxel's world position maps onto the original
  voxel with the same value. ``--held-out-orientation none`` skips this variant.

Output (written to ``OUT.tmp`` and renamed to ``OUT`` when complete)::

    OUT/imagesTr/<case>_0000.nii.gz   OUT/labelsTr/<case>.nii.gz
    OUT/imagesTs/<case>_0000.nii.gz   OUT/labelsTs/<case>.nii.gz
    OUT/imagesTs_reoriented/...       OUT/labelsTs_reoriented/...
    OUT/dataset.json                  (nnU-Net v2: channel_names, labels, numTraining, file_ending)
    OUT/summary.json                  (cases, shapes, zooms, axis codes, label fractions)

The NIfTI files are written deterministically (gzip mtime 0), so re-running gives identical
bytes. This is a single-subject template: a planning/robustness benchmark, not evidence of
generalisation to other brains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchlib.thick_slices import DEFAULT_SOURCE, DEFAULT_TEST_BLOCKS, build, parse_spacing, print_summary
from benchlib.volumes import replace_dir
from nibabel.orientations import axcodes2ornt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output dataset folder (nnU-Net raw layout)")
    p.add_argument("--spacing", type=parse_spacing, default=parse_spacing("1,1,4"),
                   help="output voxel size x,y,z in whole mm (default 1,1,4; e.g. 2,2,2)")
    p.add_argument("--overlap-mm", type=int, default=10, help="overlap of neighbouring blocks in mm (even; default 10)")
    p.add_argument("--test-blocks", default=",".join(DEFAULT_TEST_BLOCKS),
                   help="held-out octants, comma-separated (default LAS,RAS: a left/right mirror pair)")
    p.add_argument("--held-out-orientation", default="SLA",
                   help="axis codes for the extra reoriented copy of the test cases (default SLA: thick z axis first, x flipped); 'none' to skip")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                   help=f"folder with t1/gm_probability/wm_probability .nii.gz (default {DEFAULT_SOURCE})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)

    if args.overlap_mm < 0 or args.overlap_mm % 2:
        p.error("--overlap-mm must be a non-negative even number")
    test_blocks = tuple(b.strip().upper() for b in args.test_blocks.split(",") if b.strip())
    if not 1 <= len(test_blocks) <= 7:
        p.error("--test-blocks needs 1 to 7 octants")
    codes = None if args.held_out_orientation.lower() == "none" else args.held_out_orientation.upper()
    if codes is not None:
        try:
            axcodes2ornt(tuple(codes))
            ok = len(codes) == 3
        except Exception:
            ok = False
        if not ok or codes == "RAS":
            p.error("--held-out-orientation must be three axis codes other than RAS, e.g. SLA, or 'none'")

    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out.resolve()} exists (use --overwrite)")
    out = args.out.resolve()
    summary = replace_dir(lambda tmp: build(args.source, tmp, args.spacing, args.overlap_mm, test_blocks, codes), out, True)
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
