"""The thick-slice MNI octant dataset that ``scripts/prepare_thick_slice_data.py`` writes (see that
script for what it holds and why); shared with ``prepare_robustness_data.py`` and
``prepare_label_structures.py``."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "mni152_2009a"
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
N_CLASSES = 3
DEFAULT_TEST_BLOCKS = ("LAS", "RAS")
AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (low index, high index) in the RAS template


# ================================================================= helpers
def parse_spacing(text: str) -> tuple[int, int, int]:
    """Parse ``"1,1,4"`` into integer block factors of the 1 mm source grid."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--spacing needs three comma-separated values, got {text!r}")
    factors = []
    for p in parts:
        v = float(p)
        if v < 1 or abs(v - round(v)) > 1e-6:
            raise argparse.ArgumentTypeError(f"--spacing values must be whole millimetres >= 1 (source is 1 mm), got {text!r}")
        factors.append(int(round(v)))
    return tuple(factors)  # type: ignore[return-value]


def load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def write_nifti_gz(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI-1 ``.nii.gz`` deterministically (gzip header mtime = 0), sform = qform = affine."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)  # scanner
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels uint8, class probabilities float32 of shape (3, *vol)) at 1 mm."""
    gm_p = gm.astype(np.float32) / 255.0
    wm_p = wm.astype(np.float32) / 255.0
    bg_p = np.clip(1.0 - gm_p - wm_p, 0.0, 1.0)
    probs = np.stack([bg_p, gm_p, wm_p])
    labels = np.argmax(probs, axis=0).astype(np.uint8)  # ties -> lower label
    labels[t1 == 0] = 0  # restrict to the skull-stripped brain
    return labels, probs


def block_view(vol: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """View a (X, Y, Z) array whose shape is a multiple of ``f`` as (X/fx, Y/fy, Z/fz, fx*fy*fz)."""
    X, Y, Z = vol.shape
    v = vol.reshape(X // f[0], f[0], Y // f[1], f[1], Z // f[2], f[2])
    return v.transpose(0, 2, 4, 1, 3, 5).reshape(X // f[0], Y // f[1], Z // f[2], f[0] * f[1] * f[2])


def regrid_image(t1: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    return block_view(t1.astype(np.float32), f).mean(axis=-1, dtype=np.float64).astype(np.float32)


def regrid_labels(labels: np.ndarray, probs: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Block majority; ties -> larger mean probability of the tied classes -> lower label."""
    blocks = block_view(labels, f)
    counts = np.stack([(blocks == c).sum(axis=-1) for c in range(N_CLASSES)]).astype(np.float64)
    mean_p = np.stack([block_view(probs[c], f).mean(axis=-1, dtype=np.float64) for c in range(N_CLASSES)])
    # counts are integers and mean_p is in [0, 1], so mean_p only decides ties of counts.
    return np.argmax(counts + 0.5 * mean_p, axis=0).astype(np.uint8)


def regrid_affine(src_affine: np.ndarray, start: tuple[int, int, int], f: tuple[int, int, int]) -> np.ndarray:
    """Affine of a block that starts at 1 mm index ``start`` and averages ``f`` voxels per output voxel."""
    m = np.eye(4)
    for ax in range(3):
        m[ax, ax] = f[ax]
        m[ax, 3] = start[ax] + (f[ax] - 1) / 2.0
    return src_affine @ m


def block_bounds(lo: int, hi: int, centre: int, half_overlap: int, f: int, n: int) -> list[tuple[int, int]]:
    """Two half-open 1 mm ranges [a, b) split at ``centre``, overlapping, snapped to multiples of ``f``.

    The first block ends at ``centre + half_overlap`` and the second starts at ``centre - half_overlap``
    (both inclusive), so the two are mirror images about the ``centre`` voxel before snapping and share
    ``2 * half_overlap + 1`` voxels.
    """
    out = []
    for a, b in ((lo, centre + half_overlap + 1), (centre - half_overlap, hi + 1)):
        a = max(0, (a // f) * f)
        b = -(-b // f) * f  # ceil to a multiple of f (may run past n: padded with zeros)
        out.append((a, b))
    return out


def reorient(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """Re-store ``img`` with axis codes ``codes`` (data permuted/flipped, affine updated)."""
    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(codes)))
    return img.as_reoriented(transform)


def verify_reorientation(orig: nib.Nifti1Image, reo: nib.Nifti1Image) -> dict:
    """Check that ``reo`` stores exactly the voxels of ``orig`` at the same world positions."""
    a, b = np.asarray(orig.dataobj), np.asarray(reo.dataobj)
    codes_o, codes_r = nib.aff2axcodes(orig.affine), nib.aff2axcodes(reo.affine)
    if codes_o == codes_r:
        raise AssertionError(f"reoriented codes {codes_r} equal the original {codes_o}")
    back = reorient(reo, "".join(codes_o))
    if not (np.array_equal(np.asarray(back.dataobj), a) and np.allclose(back.affine, orig.affine, atol=1e-6)):
        raise AssertionError("reorienting back does not reproduce the original voxels/affine")
    # Independent check: world position of every reoriented voxel -> original voxel index.
    ijk = np.indices(b.shape).reshape(3, -1)
    world = reo.affine[:3, :3] @ ijk + reo.affine[:3, 3:4]
    inv = np.linalg.inv(orig.affine)
    src = inv[:3, :3] @ world + inv[:3, 3:4]
    src_i = np.rint(src).astype(int)
    if np.abs(src - src_i).max() > 1e-4:
        raise AssertionError("reoriented voxel centres do not fall on original voxel centres")
    if not np.array_equal(a[tuple(src_i)], b.reshape(-1)):
        raise AssertionError("reoriented voxels differ from the original voxels at the same world position")
    return {"codes": "".join(codes_r), "zooms": [float(z) for z in reo.header.get_zooms()], "shape": list(b.shape)}


def label_fractions(lab: np.ndarray) -> list[float]:
    counts = np.bincount(lab.ravel(), minlength=N_CLASSES)
    return [round(float(c) / lab.size, 4) for c in counts]


# ================================================================= build
def build(
    source: Path, out_tmp: Path, factors: tuple[int, int, int], overlap_mm: int, test_blocks: tuple[str, ...], held_out_codes: str | None
) -> dict:
    t1, t1_img = load(source / "t1.nii.gz")
    gm, _ = load(source / "gm_probability.nii.gz")
    wm, _ = load(source / "wm_probability.nii.gz")
    affine = t1_img.affine
    if not np.allclose(t1_img.header.get_zooms()[:3], 1.0) or nib.aff2axcodes(affine) != ("R", "A", "S"):
        raise SystemExit("expected a 1 mm isotropic RAS template")
    labels, probs = tissue_labels(t1, gm, wm)

    brain = np.argwhere(t1 > 0)
    lo, hi = brain.min(0), brain.max(0)
    centre = [int(round((lo[ax] + hi[ax]) / 2)) for ax in range(3)]
    midline = int(round(np.linalg.inv(affine)[0] @ np.array([0.0, 0.0, 0.0, 1.0])))  # world x = 0
    if lo[0] < midline < hi[0]:
        centre[0] = midline
    half = overlap_mm // 2
    bounds = [block_bounds(int(lo[ax]), int(hi[ax]), centre[ax], half, factors[ax], t1.shape[ax]) for ax in range(3)]

    # zero-pad so that snapped block ends past the volume edge are valid (background)
    need = [max(b for _, b in bounds[ax]) for ax in range(3)]
    pad = [(0, max(0, need[ax] - t1.shape[ax])) for ax in range(3)]
    if any(p[1] for p in pad):
        t1 = np.pad(t1, pad)
        labels = np.pad(labels, pad)
        probs = np.stack([np.pad(probs[c], pad, constant_values=1.0 if c == 0 else 0.0) for c in range(N_CLASSES)])

    cases = []
    for ix in range(2):
        for iy in range(2):
            for iz in range(2):
                name = AXIS_LETTERS[0][ix] + AXIS_LETTERS[1][iy] + AXIS_LETTERS[2][iz]
                (x0, x1), (y0, y1), (z0, z1) = bounds[0][ix], bounds[1][iy], bounds[2][iz]
                sl = (slice(x0, x1), slice(y0, y1), slice(z0, z1))
                img = regrid_image(t1[sl], factors)
                lab = regrid_labels(labels[sl], probs[(slice(None),) + sl], factors)
                aff = regrid_affine(affine, (x0, y0, z0), factors)
                box = [[x0, x1], [y0, y1], [z0, z1]]
                cases.append({"octant": name, "case": f"mni_{name}", "image": img, "label": lab, "affine": aff, "box_1mm": box})

    unknown = set(test_blocks) - {c["octant"] for c in cases}
    if unknown:
        raise SystemExit(f"unknown --test-blocks {sorted(unknown)}; choose from {[c['octant'] for c in cases]}")

    # fraction of each test block's 1 mm voxels that also lie in some training block
    train_mask = np.zeros(t1.shape, bool)
    for c in cases:
        if c["octant"] not in test_blocks:
            (x0, x1), (y0, y1), (z0, z1) = c["box_1mm"]
            train_mask[x0:x1, y0:y1, z0:z1] = True

    summary: dict = {
        "source": str(source),
        "spacing_mm": list(factors),
        "overlap_mm": 2 * half,
        "overlap_voxels_1mm_before_snapping": 2 * half + 1,
        "cut_1mm_index": centre,
        "labels": LABELS,
        "held_out_orientation": held_out_codes,
        "cases": [],
    }
    n_train = 0
    for c in cases:
        is_test = c["octant"] in test_blocks
        split = "Ts" if is_test else "Tr"
        img_nii = nib.Nifti1Image(c["image"], c["affine"])
        lab_nii = nib.Nifti1Image(c["label"], c["affine"])
        write_nifti_gz(out_tmp / f"images{split}" / f"{c['case']}_0000.nii.gz", c["image"], c["affine"])
        write_nifti_gz(out_tmp / f"labels{split}" / f"{c['case']}.nii.gz", c["label"], c["affine"])
        n_train += not is_test
        entry = {
            "case": c["case"],
            "split": "test" if is_test else "train",
            "shape": list(c["image"].shape),
            "zooms": [float(z) for z in img_nii.header.get_zooms()],
            "codes": "".join(nib.aff2axcodes(c["affine"])),
            "box_1mm": c["box_1mm"],
            "label_fractions": label_fractions(c["label"]),
            "brain_fraction": round(float((c["image"] > 0).mean()), 4),
        }
        if is_test:
            (x0, x1), (y0, y1), (z0, z1) = c["box_1mm"]
            entry["shared_with_train_fraction"] = round(float(train_mask[x0:x1, y0:y1, z0:z1].mean()), 4)
            if held_out_codes:
                img_r = reorient(img_nii, held_out_codes)
                lab_r = reorient(lab_nii, held_out_codes)
                entry["reoriented"] = verify_reorientation(img_nii, img_r)
                verify_reorientation(lab_nii, lab_r)
                write_nifti_gz(out_tmp / "imagesTs_reoriented" / f"{c['case']}_0000.nii.gz", np.asarray(img_r.dataobj), img_r.affine)
                write_nifti_gz(out_tmp / "labelsTs_reoriented" / f"{c['case']}.nii.gz", np.asarray(lab_r.dataobj), lab_r.affine)
        summary["cases"].append(entry)

    dataset_json = {
        "channel_names": {"0": "T1"},
        "labels": LABELS,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": f"MNI152_2009a_tissue_{'x'.join(str(f) for f in factors)}mm",
        "description": (
            f"GM/WM/background from the MNI ICBM 2009a sym template, 8 overlapping octant blocks re-gridded to "
            f"{'x'.join(str(f) for f in factors)} mm; test = {','.join(test_blocks)}. See NOTICE.md of mni152_2009a."
        ),
        "reference": "Fonov et al., NeuroImage 54(1), 2011; Fonov et al., NeuroImage 47 S102, 2009",
        "licence": "ICBM 2009 template licence (Copyright (C) Louis Collins, MNI, McGill University); see NOTICE.md",
    }
    (out_tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
    notice = source / "NOTICE.md"
    if notice.is_file():
        shutil.copyfile(notice, out_tmp / "NOTICE.md")
    (out_tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def print_summary(summary: dict, out: Path) -> None:
    print(f"wrote {out}  (spacing {summary['spacing_mm']} mm, overlap {summary['overlap_mm']} mm, "
          f"held-out orientation {summary['held_out_orientation']})")
    print(f"{'case':10s} {'split':5s} {'shape':>14s} {'zooms':>14s} codes  bg/gm/wm fractions     notes")
    for c in summary["cases"]:
        notes = ""
        if "shared_with_train_fraction" in c:
            notes += f"shared-with-train {c['shared_with_train_fraction']:.3f}"
        if "reoriented" in c:
            r = c["reoriented"]
            notes += f"; reoriented {r['codes']} {tuple(r['shape'])} zooms {tuple(r['zooms'])} (verified)"
        fr = "/".join(f"{f:.3f}" for f in c["label_fractions"])
        print(f"{c['case']:10s} {c['split']:5s} {str(tuple(c['shape'])):>14s} {str(tuple(c['zooms'])):>14s} {c['codes']:5s}  {fr:22s} {notes}")


