#!/usr/bin/env python
"""Build real-data NIfTI datasets (nnU-Net v2 raw layout) for two label structures: nested regions and sparse labels.

Usage::

    python scripts/prepare_label_structures.py regions OUT [--spacing 2] [--source DIR] [--overwrite]
    python scripts/prepare_label_structures.py sparse SRC OUT --every K [--axis 2] [--overwrite]

Why
---
Besides "one class per voxel", nnU-Net v2 knows two label structures that a segmentation tool
should handle: *regions* (overlapping, nested targets trained with one sigmoid output each, e.g.
BraTS whole tumour > tumour core > enhancing tumour) and an *ignore* label (voxels nobody
annotated, left out of the loss; e.g. only every k-th slice drawn). These datasets let a
benchmark compare, on the same real images, a region model with a plain softmax model of the
disjoint classes, and a model trained on sparse slices with one trained on dense labels (the
held-out references are always dense).

``regions``: nested regions of one brain (Colin27 + AAL)
--------------------------------------------------------
Source (``--source``, default ``shared/data/colin27_aal`` next to the repository):
``ch2.nii.gz`` (Colin27 T1, 181x217x181, 1 mm, RAS, uint8), ``ch2bet.nii.gz`` (the same,
skull-stripped) and ``aal.nii.gz`` (AAL atlas, 116 regions, same grid: checked) with
``aal.nii.txt`` (index -> name). Provenance and licence: ``NOTICE.md`` and ``debian-copyright``
in that folder (Debian ``mricron-data``; cite Tzourio-Mazoyer et al. 2002 for AAL and Holmes et
al. 1998 for Colin27); both are copied into the output with a description of the derivation.

* Image: ``ch2`` inside the brain mask ``ch2bet > 0 OR aal > 0``, 0 outside. Not ``ch2bet``
  alone: its mask is tight and cuts off ~9 % of the AAL voxels (the outer cortical rim), which
  would either drop labels or put labels on zero-valued voxels. Not ``ch2`` masked by
  ``aal > 0``: the image would then be non-zero exactly on grey matter, so the outermost region
  would be a threshold of the image rather than something to learn (white matter and CSF
  must stay visible).
* Three disjoint labels (1 mm, then re-gridded), nested as regions
  grey_matter = [1, 2, 3] > lobe = [2, 3] > area = [3]:
    1  grey matter (any AAL region) outside the lobe
    2  lobe outside the area
    3  area
  Lobe = the frontal lobe, grouped by AAL name as in ``scripts/prepare_demo_data.py``:
  Precentral, Frontal_* (incl. *_Orb, *_Medial, Med_Orb), Supp_Motor_Area, Olfactory, Rectus,
  Rolandic_Oper, Paracentral_Lobule (left and right; AAL 1-28, 69, 70).
  Area = the middle frontal gyrus, Frontal_Mid_L/R (AAL 7, 8; not Frontal_Mid_Orb).
  Why these: every case must hold all three labels, and the middle frontal gyrus is a large,
  long area (~79 000 mm^3) that runs from the frontal pole back to the precentral sulcus and
  from the lateral convexity up towards the superior frontal gyrus, so both the medial/lateral
  and the inferior/superior cut below pass through it. (In a grid search over the frontal areas
  and the block layouts/cut positions it gave the largest smallest count; the precentral gyrus,
  the obvious choice, leaves some block with < 250 voxels at best, and octants cut in y and z
  leave, for most areas, a block without the area or without grey matter outside the lobe.)
* Re-gridding to ``--spacing`` mm isotropic (integer, default 2) by s x s x s blocks of the 1 mm
  grid: image = block mean (float32), label = block majority of the 4 classes (ties -> the
  lower label). Voxel centres sit at the centre of the 1 mm voxels they average.
* Cases: per hemisphere (cut at the AAL mid-line: the x index that best separates ``*_L`` from
  ``*_R`` regions) the brain is cut into medial/lateral at 36 mm from the mid-line and into
  inferior/superior at world z = +35 mm (Colin27/MNI coordinates), giving 8 blocks that do not
  overlap (neighbours share a face, no voxel). The cuts are grid lines of the output grid. Each
  block is cropped to the brain mask's bounding box inside it (snapped to the output grid).
  Names: ``colin_<L|R>_<med|lat>_<inf|sup>``. The cut positions were chosen (grid search, 2 mm)
  to maximise the smallest label count over blocks: every label has >= ~900 voxels at 2 mm in
  every block.
* Split: held out = ``colin_L_med_sup`` and ``colin_R_med_sup``, a left/right mirror pair (so
  no training block is the mirror image of a test block; nnU-Net-style training mirrors
  patches), chosen because they hold the most area and lobe voxels of the superior blocks. The
  other 6 blocks are training cases. Held-out and training blocks share no voxel.
* Two dataset folders with byte-identical image/label files (copies):
  ``OUT/disjoint`` (labels background/gm_other/lobe_other/area = 0..3, softmax) and
  ``OUT/regions`` (``"grey_matter": [1, 2, 3], "lobe": [2, 3], "area": [3]``,
  ``"regions_class_order": [1, 2, 3]``).

This is one brain with its own atlas: a test of the label machinery, not of generalisation.

``sparse``: partial annotation of an existing dataset
-----------------------------------------------------
SRC is an nnU-Net raw dataset with integer label maps 0..C-1 (``dataset.json`` labels name ->
int, e.g. one built by ``scripts/prepare_thick_slice_data.py``). OUT gets ``imagesTr``,
``imagesTs``, ``labelsTs`` (and any other ``imagesTs*``/``labelsTs*`` folder, NOTICE.md,
debian-copyright) copied byte for byte: the held-out references stay dense. ``labelsTr`` keeps
the labels of every K-th slice along the canonical (RAS) axis ``--axis`` (0 = x/R, 1 = y/A,
2 = z/S, the default: axial slices); every other voxel gets the ignore value C. "Slice along
axis" is decided in the closest canonical RAS grid of each file (nibabel ``io_orientation``,
as ``as_closest_canonical`` does), not on the stored array axis: a file stored as e.g. LPS or
SLA gets the same slices (the same voxels in world space) as its RAS twin. Kept slices: the
canonical index i along the axis with ``i % K == K // 2`` (so ``--every 1`` keeps everything and
gives labels identical to SRC's). Labels are written with SRC's header (affine, sform/qform,
data type; widened only if C does not fit). ``dataset.json`` = SRC's with ``"ignore": C``
appended as the last (highest) label, the nnU-Net v2 convention.

Both subcommands write to ``OUT.tmp`` and rename it to ``OUT`` when complete; NIfTI files are
gzipped with mtime 0, so re-running gives identical bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from benchlib.thick_slices import block_view, regrid_affine, write_nifti_gz
from benchlib.volumes import AAL_COLIN_LICENCE_AND_CITATIONS, extract, read_aal_names, replace_dir
from nibabel.orientations import io_orientation

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "colin27_aal"

# ---------------------------------------------------------------- regions
LOBE_NAME = "frontal"
LOBE_RULE = r"Precentral|Frontal_.*|Supp_Motor_Area|Olfactory|Rectus|Rolandic_Oper|Paracentral_Lobule"
AREA_NAME = "middle frontal gyrus"
AREA_RULE = r"Frontal_Mid"
LATERAL_CUT_MM = 36  # medial | lateral boundary, distance from the AAL mid-line
SUPERIOR_CUT_Z_MM = 35.0  # inferior | superior boundary, world z (Colin27 / MNI coordinates)
TEST_CASES = ("colin_L_med_sup", "colin_R_med_sup")
MIN_VOXELS_MM3 = 300 * 8  # warn when a label covers less than "300 voxels at 2 mm" in a case
DISJOINT_LABELS = {"background": 0, "gm_other": 1, "lobe_other": 2, "area": 3}
REGION_LABELS = {"background": 0, "grey_matter": [1, 2, 3], "lobe": [2, 3], "area": [3]}
N_CLASSES = 4
IGNORE = "ignore"
COPY_FILES = ("NOTICE.md", "debian-copyright")


# ================================================================= shared helpers
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ================================================================= regions
def ids_matching(names: dict[int, str], rule: str) -> list[int]:
    """AAL indices whose name without the ``_L``/``_R`` suffix fully matches ``rule``."""
    return sorted(i for i, n in names.items() if re.fullmatch(rule, re.sub(r"_[LR]$", "", n)))


def find_midline(aal: np.ndarray, names: dict[int, str]) -> int:
    """x index m such that ``*_L`` regions lie at x < m and ``*_R`` at x >= m, best fit (RAS grid)."""
    left = np.isin(aal, [i for i, n in names.items() if n.endswith("_L")]).sum(axis=(1, 2))
    right = np.isin(aal, [i for i, n in names.items() if n.endswith("_R")]).sum(axis=(1, 2))
    errors = [int(left[m:].sum() + right[:m].sum()) for m in range(aal.shape[0] + 1)]
    return int(np.argmin(errors))


def nested_labels(aal: np.ndarray, lobe_ids: list[int], area_ids: list[int]) -> np.ndarray:
    """0 none, 1 AAL outside the lobe, 2 lobe outside the area, 3 area (area ids must lie in the lobe)."""
    if not set(area_ids) <= set(lobe_ids):
        raise ValueError("the area must lie inside the lobe")
    lab = (aal > 0).astype(np.uint8)
    lab[np.isin(aal, lobe_ids)] = 2
    lab[np.isin(aal, area_ids)] = 3
    return lab


def majority(labels: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Block majority of classes 0..N_CLASSES-1, ties -> the lower label."""
    blocks = block_view(labels, f)
    counts = np.stack([(blocks == c).sum(axis=-1) for c in range(N_CLASSES)])
    return np.argmax(counts, axis=0).astype(np.uint8)


def snap(a: int, b: int, anchor: int, s: int) -> tuple[int, int]:
    """Widen [a, b) to grid lines ``anchor + k * s``."""
    return anchor + ((a - anchor) // s) * s, anchor + -(-(b - anchor) // s) * s


def build_regions(source: Path, out_tmp: Path, s: int) -> dict:
    t1_img = nib.load(str(source / "ch2.nii.gz"))
    t1 = np.asarray(t1_img.dataobj)
    bet_img, aal_img = nib.load(str(source / "ch2bet.nii.gz")), nib.load(str(source / "aal.nii.gz"))
    bet, aal = np.asarray(bet_img.dataobj), np.asarray(aal_img.dataobj).astype(np.int32)
    affine = t1_img.affine
    for name, img in (("ch2bet", bet_img), ("aal", aal_img)):
        if img.shape != t1_img.shape or not np.allclose(img.affine, affine, atol=1e-5):
            raise SystemExit(f"{name} is not on the ch2 grid")
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise SystemExit("expected a 1 mm RAS grid (identity rotation/zooms)")

    names = read_aal_names(source / "aal.nii.txt")
    lobe_ids, area_ids = ids_matching(names, LOBE_RULE), ids_matching(names, AREA_RULE)
    labels = nested_labels(aal, lobe_ids, area_ids)
    brain = (bet > 0) | (aal > 0)
    image = np.where(brain, t1, 0).astype(np.float32)

    mid = find_midline(aal, names)
    d = s * round(LATERAL_CUT_MM / s)
    zc = int(round(float(np.linalg.solve(affine, [0.0, 0.0, SUPERIOR_CUT_Z_MM, 1.0])[2])))
    anchors = (mid, 0, zc)  # grid lines of the output grid (1 mm indices)
    nx, _, nz = t1.shape
    x_ranges = {("L", "lat"): (0, mid - d), ("L", "med"): (mid - d, mid), ("R", "med"): (mid, mid + d), ("R", "lat"): (mid + d, nx)}
    z_ranges = {"inf": (0, zc), "sup": (zc, nz)}
    f = (s, s, s)

    cases = []
    for (side, ml), (x0, x1) in x_ranges.items():
        for si, (z0, z1) in z_ranges.items():
            sub = brain[max(x0, 0):x1, :, z0:z1]
            if not sub.any():
                raise SystemExit(f"block {side}_{ml}_{si} holds no brain")
            idx = np.argwhere(sub)
            lo = idx.min(0) + (max(x0, 0), 0, z0)
            hi = idx.max(0) + 1 + (max(x0, 0), 0, z0)
            box = [snap(int(lo[ax]), int(hi[ax]), anchors[ax], s) for ax in range(3)]
            starts, stops = tuple(b[0] for b in box), tuple(b[1] for b in box)
            img = block_view(extract(image, starts, stops), f).mean(axis=-1, dtype=np.float64).astype(np.float32)
            lab = majority(extract(labels, starts, stops), f)
            name = f"colin_{side}_{ml}_{si}"
            cases.append({"case": name, "image": img, "label": lab, "affine": regrid_affine(affine, starts, f),
                          "box_1mm": [list(b) for b in box], "test": name in TEST_CASES})

    # Held-out blocks share no 1 mm voxel with training blocks (the cuts are grid lines).
    def shared_voxels(a: dict, b: dict) -> int:
        return int(np.prod([max(0, min(ra[1], rb[1]) - max(ra[0], rb[0])) for ra, rb in zip(a["box_1mm"], b["box_1mm"])]))
    shared = {c["case"]: sum(shared_voxels(c, t) for t in cases if not t["test"]) for c in cases if c["test"]}
    if any(shared.values()):
        raise AssertionError(f"held-out blocks overlap training blocks: {shared}")

    voxel_mm3 = s**3
    problems = []
    summary_cases = []
    for c in cases:
        counts = np.bincount(c["label"].ravel(), minlength=N_CLASSES).tolist()
        for k in range(1, N_CLASSES):
            if counts[k] == 0:
                problems.append(f"{c['case']} has no label {k}")
            elif counts[k] * voxel_mm3 < MIN_VOXELS_MM3:
                print(f"warning: {c['case']} label {k} has only {counts[k]} voxels", file=sys.stderr)
        summary_cases.append({"case": c["case"], "split": "test" if c["test"] else "train", "shape": list(c["image"].shape),
                              "origin_mm": [round(float(v), 2) for v in c["affine"][:3, 3]], "box_1mm": c["box_1mm"],
                              "label_counts": counts})
    if problems:
        raise SystemExit("label choice fails: " + "; ".join(problems))

    first, second = out_tmp / "regions", out_tmp / "disjoint"
    for c in cases:
        split = "Ts" if c["test"] else "Tr"
        write_nifti_gz(first / f"images{split}" / f"{c['case']}_0000.nii.gz", c["image"], c["affine"])
        write_nifti_gz(first / f"labels{split}" / f"{c['case']}.nii.gz", c["label"], c["affine"])
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        shutil.copytree(first / sub, second / sub)
        for p in (first / sub).iterdir():
            if not filecmp.cmp(p, second / sub / p.name, shallow=False):
                raise AssertionError(f"copy of {p} differs")

    n_train = sum(not c["test"] for c in cases)
    lobe_members = sorted({re.sub(r"_[LR]$", "", names[i]) for i in lobe_ids})
    area_members = [names[i] for i in area_ids]
    common = {
        "channel_names": {"0": "T1"},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "reference": "Tzourio-Mazoyer N. et al., NeuroImage 15(1):273-289, 2002 (AAL); "
                     "Holmes C.J. et al., J Comput Assist Tomogr 22(2), 1998 (Colin27)",
        "licence": "Debian mricron-data copyright file (BSD-3-clause for the package): see debian-copyright and NOTICE.md",
    }
    what = (f"Colin27 T1 with AAL labels at {s} mm; lobe = {LOBE_NAME} ({', '.join(lobe_members)}), "
            f"area = {AREA_NAME} ({', '.join(area_members)}). 8 non-overlapping blocks (hemisphere x medial/lateral "
            f"at {d} mm from the mid-line x inferior/superior at z = {SUPERIOR_CUT_Z_MM:+g} mm); held out: "
            f"{', '.join(TEST_CASES)}. Built by scripts/prepare_label_structures.py.")
    write_json(second / "dataset.json", {
        "channel_names": common["channel_names"], "labels": DISJOINT_LABELS, "numTraining": n_train, "file_ending": ".nii.gz",
        "name": f"Colin27AAL_nested_disjoint_{s}mm",
        "description": "Disjoint classes: 1 grey matter outside the lobe, 2 lobe outside the area, 3 area. " + what,
        "reference": common["reference"], "licence": common["licence"]})
    write_json(first / "dataset.json", {
        "channel_names": common["channel_names"], "labels": REGION_LABELS, "regions_class_order": [1, 2, 3],
        "numTraining": n_train, "file_ending": ".nii.gz", "name": f"Colin27AAL_nested_regions_{s}mm",
        "description": "Nested regions grey_matter [1,2,3] > lobe [2,3] > area [3] of the same label maps as the "
                       "disjoint dataset. " + what,
        "reference": common["reference"], "licence": common["licence"]})

    notice = (source / "NOTICE.md").read_text(encoding="utf-8").rstrip()
    notice_text = (
        "# Nested-region datasets derived from Colin27 and the AAL atlas\n\n"
        "Made by `scripts/prepare_label_structures.py regions` from `ch2.nii.gz`, `ch2bet.nii.gz`,\n"
        "`aal.nii.gz` and `aal.nii.txt` described below. Image: `ch2` inside `ch2bet > 0 OR aal > 0`.\n"
        f"Labels: 1 = AAL grey matter outside the {LOBE_NAME} lobe, 2 = {LOBE_NAME} lobe outside the {AREA_NAME},\n"
        f"3 = {AREA_NAME}. Lobe: {', '.join(lobe_members)} (left and right).\n"
        f"Area: {', '.join(area_members)}. Re-gridded to {s} mm (image: block mean; labels: block majority).\n"
        f"Cases: 8 non-overlapping blocks; held out: {', '.join(TEST_CASES)}.\n"
        "`regions/` and `disjoint/` hold the same image and label files with different `dataset.json`.\n\n"
        "One brain with its own atlas: a test of label handling, not evidence of generalisation.\n\n"
        + AAL_COLIN_LICENCE_AND_CITATIONS +
        "## Source notice (copied verbatim)\n\n" + notice + "\n")
    summary = {
        "source": str(source), "spacing_mm": s, "midline_x_index_1mm": mid, "lateral_cut_mm": d,
        "superior_cut_z_index_1mm": zc, "lobe": {"name": LOBE_NAME, "aal_ids": lobe_ids},
        "area": {"name": AREA_NAME, "aal_ids": area_ids}, "labels": DISJOINT_LABELS, "regions": REGION_LABELS,
        "held_out_voxels_shared_with_train": shared, "cases": summary_cases,
    }
    for folder in (first, second):
        (folder / "NOTICE.md").write_text(notice_text, encoding="utf-8")
        shutil.copyfile(source / "debian-copyright", folder / "debian-copyright")
        write_json(folder / "summary.json", summary)
    return summary


def print_regions(summary: dict, out: Path) -> None:
    print(f"wrote {out}/regions and {out}/disjoint  (same images/labels; spacing {summary['spacing_mm']} mm)")
    print(f"lobe  {summary['lobe']['name']}: AAL {summary['lobe']['aal_ids']}")
    print(f"area  {summary['area']['name']}: AAL {summary['area']['aal_ids']}")
    print(f"cuts  mid-line x index {summary['midline_x_index_1mm']}, medial/lateral at +-{summary['lateral_cut_mm']} mm, "
          f"inferior/superior at z index {summary['superior_cut_z_index_1mm']} (1 mm grid); held-out voxels shared "
          f"with training: {sum(summary['held_out_voxels_shared_with_train'].values())}")
    print(f"{'case':17s} {'split':5s} {'shape':>14s} {'bg':>7s} {'gm_oth':>7s} {'lobe_oth':>8s} {'area':>6s}")
    for c in summary["cases"]:
        n = c["label_counts"]
        print(f"{c['case']:17s} {c['split']:5s} {str(tuple(c['shape'])):>14s} {n[0]:7d} {n[1]:7d} {n[2]:8d} {n[3]:6d}")
    for name in ("regions", "disjoint"):
        print(f"{out / name}: {dir_bytes(out / name)} bytes")


# ================================================================= sparse
def read_int_labels(src: Path) -> tuple[dict, dict[str, int]]:
    meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise SystemExit(f"{src}/dataset.json has no labels")
    if IGNORE in labels:
        raise SystemExit(f"{src}/dataset.json already has an '{IGNORE}' label")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise SystemExit(f"{src}/dataset.json: labels must map name -> int (no regions), got {labels}")
    if sorted(labels.values()) != list(range(len(labels))):
        raise SystemExit(f"{src}/dataset.json: label values must be 0..C-1, got {sorted(labels.values())}")
    return meta, labels


def canonical_slab_mask(img: nib.spatialimages.SpatialImage, axis: int, every: int) -> tuple[np.ndarray, int, list[int]]:
    """Stored-array index mask (1D, along the stored axis that is canonical ``axis``) of the kept slices.

    Returns (keep along that stored axis, the stored axis, kept canonical indices)."""
    ornt = io_orientation(img.affine)  # row j: stored axis j -> (RAS axis, +1/-1)
    stored_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    n = img.shape[stored_axis]
    canonical = np.arange(n) if ornt[stored_axis, 1] > 0 else n - 1 - np.arange(n)
    keep = canonical % every == every // 2
    return keep, stored_axis, sorted(int(i) for i in canonical[keep])


def write_like(path: Path, data: np.ndarray, like: nib.spatialimages.SpatialImage) -> None:
    """Write ``data`` with the header and affine of ``like`` (deterministic gzip for .gz)."""
    header = like.header.copy()
    dtype = header.get_data_dtype()
    if not np.can_cast(np.min_scalar_type(int(data.max())), dtype):
        dtype = np.promote_types(dtype, np.min_scalar_type(int(data.max())))
    header.set_data_dtype(dtype)
    img = type(like)(data.astype(dtype), like.affine, header)
    raw = img.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0) if path.name.endswith(".gz") else raw)


def build_sparse(src: Path, out_tmp: Path, every: int, axis: int) -> dict:
    meta, labels = read_int_labels(src)
    ignore = len(labels)
    ending = meta.get("file_ending", ".nii.gz")
    files = sorted((src / "labelsTr").glob(f"*{ending}"))
    if not files:
        raise SystemExit(f"no {src}/labelsTr/*{ending}")
    for entry in sorted(src.iterdir()):
        if entry.is_dir() and (entry.name == "imagesTr" or entry.name.startswith(("imagesTs", "labelsTs"))):
            shutil.copytree(entry, out_tmp / entry.name)
        elif entry.is_file() and entry.name in COPY_FILES:
            shutil.copyfile(entry, out_tmp / entry.name)

    cases = []
    for path in files:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        if data.ndim != 3:
            raise SystemExit(f"{path}: expected a 3D label map, got shape {data.shape}")
        if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() >= ignore:
            raise SystemExit(f"{path}: label values must be integers 0..{ignore - 1}, found {np.unique(data)[:10]}")
        keep, stored_axis, kept = canonical_slab_mask(img, axis, every)
        shape = [1, 1, 1]
        shape[stored_axis] = keep.size
        mask = np.broadcast_to(keep.reshape(shape), data.shape)
        out = np.where(mask, data, ignore)
        write_like(out_tmp / "labelsTr" / path.name, out, img)
        labelled = out != ignore
        cases.append({"case": path.name[: -len(ending)], "codes": "".join(nib.aff2axcodes(img.affine)), "stored_axis": stored_axis,
                      "slices_kept": len(kept), "slices": int(keep.size), "kept_canonical_indices": kept,
                      "voxels_kept": int(labelled.sum()), "voxels": int(data.size),
                      "foreground_kept": int((labelled & (data > 0)).sum()), "foreground": int((data > 0).sum())})

    new = dict(meta)
    new["labels"] = {**labels, IGNORE: ignore}
    note = (f"Sparse training labels: only every {every}-th slice along canonical axis {axis} ({'xyz'[axis]}, RAS; "
            f"index % {every} == {every // 2}) is labelled, the rest is '{IGNORE}' = {ignore}; test labels dense. "
            f"Built from {src.name} by scripts/prepare_label_structures.py sparse.")
    new["description"] = (str(meta["description"]) + " | " + note) if meta.get("description") else note
    write_json(out_tmp / "dataset.json", new)
    summary = {"source": str(src), "every": every, "axis": axis, "offset": every // 2, "ignore": ignore, "cases": cases}
    write_json(out_tmp / "summary.json", summary)
    return summary


def print_sparse(summary: dict, out: Path) -> None:
    print(f"wrote {out}  (every {summary['every']}-th slice along RAS axis {summary['axis']}, offset {summary['offset']}; "
          f"ignore = {summary['ignore']})")
    print(f"{'case':16s} codes stored-axis  slices kept   voxels kept      foreground kept")
    for c in summary["cases"]:
        fg = c["foreground_kept"] / c["foreground"] if c["foreground"] else float("nan")
        print(f"{c['case']:16s} {c['codes']:5s} {c['stored_axis']:11d}  {c['slices_kept']:4d}/{c['slices']:<4d}  "
              f"{c['voxels_kept']:7d}/{c['voxels']:<7d}  {c['foreground_kept']:7d} ({fg:.3f})")


# ================================================================= main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("regions", help="nested regions (Colin27 + AAL): OUT/regions and OUT/disjoint")
    r.add_argument("out", type=Path, help="output folder (gets regions/ and disjoint/)")
    r.add_argument("--spacing", type=int, default=2, help="output voxel size in whole mm (default 2)")
    r.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"Colin27/AAL folder (default {DEFAULT_SOURCE})")
    r.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s = sub.add_parser("sparse", help="keep labels on every K-th slice of labelsTr, the rest 'ignore'")
    s.add_argument("src", type=Path, help="nnU-Net raw dataset with integer labels 0..C-1")
    s.add_argument("out", type=Path, help="output dataset folder")
    s.add_argument("--every", type=int, required=True, help="keep every K-th slice (K >= 1; 1 keeps all)")
    s.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="canonical RAS axis: 0 x, 1 y, 2 z (default, axial)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)

    if args.command == "regions":
        if args.spacing < 1:
            p.error("--spacing must be a whole number of mm >= 1")
        summary = replace_dir(lambda tmp: build_regions(args.source, tmp, args.spacing), args.out, args.overwrite)
        print_regions(summary, args.out.resolve())
    else:
        if args.every < 1:
            p.error("--every must be >= 1")
        if not (args.src / "dataset.json").is_file():
            p.error(f"{args.src} has no dataset.json")
        if args.src.resolve() == args.out.resolve():
            p.error("OUT must differ from SRC")
        summary = replace_dir(lambda tmp: build_sparse(args.src, tmp, args.every, args.axis), args.out, args.overwrite)
        print_sparse(summary, args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
