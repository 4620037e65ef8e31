#!/usr/bin/env python
"""Build the two small demo datasets shipped in ``unetcli/demo_data/``.

Run from anywhere (paths default relative to this file)::

    python scripts/prepare_demo_data.py [--source RAW_DATA_DIR] [--out unetcli/demo_data]

The output is deterministic: running the script twice gives byte-identical files
(PNG written by Pillow without timestamps, NIfTI gzipped with ``mtime=0``).

1. ``mni_tissue_2d/`` -- 2D PNG tissue segmentation.
   Source: MNI ICBM 2009a nonlinear symmetric T1 template (``mni152_2009a/t1.nii.gz``,
   197x233x189, 1 mm, RAS, uint8, skull-stripped) with its grey/white-matter probability
   maps. Labels = ``argmax(background = 255 - gm - wm, gm, wm)``: 0 background/CSF,
   1 grey matter, 2 white matter. Axial slices (array axis 2 = z) are cropped with one
   fixed box (224 rows x 192 columns, centred on the brain's bounding box in the whole
   volume) and rotated with ``np.rot90`` so anterior is up and the subject's left is on
   the image's left (neurological convention). Images keep the template's uint8 values.
   Split rule (slice index z):
     * ``test/``:  z = 90, 92, ..., 118 (a contiguous block, 15 slices);
     * ``train/``: z = 30, 32, ..., 160 excluding 84 <= z <= 124, i.e. a gap of at least
       six slices on each side of the test block so that no near-duplicate neighbour of
       a test slice is trained on.
   Slices with fewer than 2 % brain pixels (T1 > 0) in the crop are skipped.

2. ``colin27_lobes_3d/`` -- 3D NIfTI lobe segmentation in the nnU-Net v2 raw layout.
   Source: Colin27 skull-stripped T1 (``colin27_aal/ch2bet.nii.gz``, 181x217x181, 1 mm,
   RAS) and the AAL atlas drawn on it (``aal.nii.gz``, names in ``aal.nii.txt``). The
   116 AAL regions are grouped, left/right merged, into 8 classes by region name:
     1 frontal    Precentral, Frontal_*, Supp_Motor_Area, Olfactory, Rectus, and (by
                  convention here) Rolandic_Oper and Paracentral_Lobule
     2 parietal   Postcentral, Parietal_*, SupraMarginal, Angular, Precuneus
     3 temporal   Temporal_*, Heschl, Fusiform
     4 occipital  Calcarine, Cuneus, Lingual, Occipital_*
     5 limbic     Cingulum_*, Hippocampus, ParaHippocampal, Amygdala
     6 insula     Insula
     7 deep_grey  Caudate, Putamen, Pallidum, Thalamus
     8 cerebellum Cerebelum_*, Vermis_*
   Labels are restricted to the skull-stripped brain (``ch2bet > 0``) so that no label
   lies on zero-valued image voxels. Image and labels are reduced to 2 mm isotropic by
   2x2x2 blocks (image: block mean rounded to int16; labels: block majority, ties to the
   lower class index) on a grid whose left-right block boundary is the AAL mid-line (the
   x index that best separates ``*_L`` from ``*_R`` regions). The brain is cut at that
   mid-line into hemispheres and at the middle of its superior-inferior extent into
   inferior/superior halves; each of the 4 blocks is a case with its own affine (the
   crop offset folded into the origin), padded with zeros to a multiple of 8 voxels.
   Split rule: ``colin_lh_inf``, ``colin_lh_sup``, ``colin_rh_inf`` are training cases
   (``imagesTr``/``labelsTr``); ``colin_rh_sup`` is held out (``imagesTs``/``labelsTs``).

Both are single-subject (template / one person) demos of the tool, not evidence that a
model generalises to other brains. The script also prints a no-learning baseline for the
2D test split (multi-Otsu thresholding of the brain pixels into 3 intensity classes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from benchlib.volumes import AAL_COLIN_LICENCE_AND_CITATIONS, extract, read_aal_names
from PIL import Image
from skimage.filters import threshold_multiotsu

from unetcli.evaluation.metrics import dice  # NaN when both masks are empty: such slices are left out

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "unetcli" / "demo_data"

# ---------------------------------------------------------------- 2D (MNI tissue)
MNI_DIR = "mni152_2009a"
MNI_NAME = "mni_tissue_2d"
CROP_H, CROP_W = 224, 192  # rows (anterior-posterior) x columns (left-right)
TEST_Z = tuple(range(90, 119, 2))
TRAIN_Z = tuple(z for z in range(30, 161, 2) if not 84 <= z <= 124)
MIN_BRAIN_FRACTION = 0.02
MNI_LABELS = {"0": "background", "1": "grey_matter", "2": "white_matter"}

# ---------------------------------------------------------------- 3D (Colin27 lobes)
COLIN_DIR = "colin27_aal"
COLIN_NAME = "colin27_lobes_3d"
LOBES = (
    "background",
    "frontal",
    "parietal",
    "temporal",
    "occipital",
    "limbic",
    "insula",
    "deep_grey",
    "cerebellum",
)
# (regex on the AAL name without its _L/_R suffix, class index); first match wins.
AAL_GROUP_RULES: tuple[tuple[str, int], ...] = (
    (r"Precentral|Frontal_.*|Supp_Motor_Area|Olfactory|Rectus|Rolandic_Oper|Paracentral_Lobule", 1),
    (r"Postcentral|Parietal_.*|SupraMarginal|Angular|Precuneus", 2),
    (r"Temporal_.*|Heschl|Fusiform", 3),
    (r"Calcarine|Cuneus|Lingual|Occipital_.*", 4),
    (r"Cingulum_.*|Hippocampus|ParaHippocampal|Amygdala", 5),
    (r"Insula", 6),
    (r"Caudate|Putamen|Pallidum|Thalamus", 7),
    (r"Cerebelum_.*|Vermis_.*", 8),
)
TRAIN_CASES = ("colin_lh_inf", "colin_lh_sup", "colin_rh_inf")
TEST_CASES = ("colin_rh_sup",)
BLOCK = 2  # downsampling factor (1 mm -> 2 mm)
MULTIPLE = 8  # case shapes are padded to a multiple of this


# ================================================================= helpers

def load_array(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file as a numpy array (native dtype) together with its image."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a 2D uint8 array as an 8-bit grayscale PNG, maximum compression, no metadata."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a 2D uint8 array, got {array.dtype} {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array), mode="L").save(
        path, format="PNG", optimize=True, compress_level=9
    )


def write_nifti_gz(path: Path, data: np.ndarray, affine: np.ndarray, sform_code: int) -> None:
    """Write a NIfTI-1 ``.nii.gz`` deterministically (gzip header mtime = 0, no file name)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=sform_code)
    raw = img.to_bytes()  # uncompressed .nii (single file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ================================================================= 2D dataset
def centred_crop(lo: int, hi: int, size: int, length: int) -> tuple[int, int]:
    """Start/stop of a window of ``size`` centred on [lo, hi] and kept inside [0, length)."""
    if size > length:
        raise ValueError(f"crop size {size} exceeds axis length {length}")
    start = (lo + hi + 1) // 2 - size // 2
    start = min(max(start, 0), length - size)
    return start, start + size


def multi_otsu_baseline(image: np.ndarray) -> np.ndarray:
    """3-class multi-Otsu on brain pixels (image > 0): dark->0, middle->1 (GM), bright->2 (WM)."""
    pred = np.zeros(image.shape, dtype=np.uint8)
    brain = image > 0
    values = image[brain]
    thresholds = threshold_multiotsu(values, classes=3)
    pred[brain] = np.digitize(values, bins=thresholds).astype(np.uint8)
    return pred


def build_mni_2d(source: Path, out: Path) -> None:
    src = source / MNI_DIR
    t1, _ = load_array(src / "t1.nii.gz")
    gm, _ = load_array(src / "gm_probability.nii.gz")
    wm, _ = load_array(src / "wm_probability.nii.gz")
    gm_i = gm.astype(np.int16)
    wm_i = wm.astype(np.int16)
    labels = np.argmax(np.stack([255 - gm_i - wm_i, gm_i, wm_i]), axis=0).astype(np.uint8)
    t1 = t1.astype(np.uint8)

    coords = np.argwhere(t1 > 0)
    (xlo, ylo, _), (xhi, yhi, _) = coords.min(axis=0), coords.max(axis=0)
    # After rot90 the rows run along y (anterior up) and the columns along x.
    x0, x1 = centred_crop(int(xlo), int(xhi), CROP_W, t1.shape[0])
    y0, y1 = centred_crop(int(ylo), int(yhi), CROP_H, t1.shape[1])

    def view(volume: np.ndarray, z: int) -> np.ndarray:
        # (x, y) slice -> rot90 (counter-clockwise): row 0 = most anterior, column 0 = left.
        return np.ascontiguousarray(np.rot90(volume[x0:x1, y0:y1, z]))

    dest = out / MNI_NAME
    if dest.exists():
        shutil.rmtree(dest)
    counts: dict[str, int] = {}
    skipped: list[int] = []
    test_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for split, zs in (("train", TRAIN_Z), ("test", TEST_Z)):
        counts[split] = 0
        for z in zs:
            image, mask = view(t1, z), view(labels, z)
            if (image > 0).mean() < MIN_BRAIN_FRACTION:
                skipped.append(z)
                continue
            stem = f"mni_z{z:03d}.png"
            write_png(dest / split / "images" / stem, image)
            write_png(dest / split / "masks" / stem, mask)
            counts[split] += 1
            if split == "test":
                test_pairs.append((image, mask))

    write_json(dest / "labels.json", MNI_LABELS)
    notice = (source / MNI_DIR / "NOTICE.md").read_text(encoding="utf-8").rstrip()
    (dest / "NOTICE.md").write_text(
        "# Demo data `mni_tissue_2d`: derived from the MNI ICBM 2009a template\n\n"
        "Made by `scripts/prepare_demo_data.py` from `t1.nii.gz`, `gm_probability.nii.gz` and\n"
        "`wm_probability.nii.gz` described below. Labels = argmax(background = 255 - GM - WM,\n"
        "GM, WM): 0 background/CSF, 1 grey matter, 2 white matter. Axial slices (array z index\n"
        f"in the file name), cropped to {CROP_H}x{CROP_W} (rows x columns) with one fixed box,\n"
        "rotated so anterior is up and the subject's left is on the image's left; the images\n"
        "keep the template's uint8 intensities. test: z = 90..118 every 2nd slice; train:\n"
        "z = 30..160 every 2nd slice excluding 84..124 (a gap around the test block).\n\n"
        "This is a single-subject (population template) demo of the tool: scores on it say\n"
        "nothing about how a model generalises to other brains or scanners.\n\n"
        "## Source notice (copied verbatim)\n\n" + notice + "\n",
        encoding="utf-8",
    )

    total = dir_bytes(dest)
    print(f"[2D] {dest}")
    print(
        f"     slices: train={counts['train']} test={counts['test']}"
        f" (skipped, < 2 % brain: z {skipped or 'none'})"
    )
    print(f"     crop x[{x0}:{x1}] y[{y0}:{y1}] -> PNG {CROP_H}x{CROP_W}; total {total} bytes")

    # No-learning baseline on the held-out slices.
    per_slice: dict[int, list[float]] = {1: [], 2: []}
    inter: dict[int, int] = {1: 0, 2: 0}
    sizes: dict[int, int] = {1: 0, 2: 0}
    for image, mask in test_pairs:
        pred = multi_otsu_baseline(image)
        for c in (1, 2):
            per_slice[c].append(dice(pred == c, mask == c))
            inter[c] += int(np.logical_and(pred == c, mask == c).sum())
            sizes[c] += int((pred == c).sum()) + int((mask == c).sum())
    mean_slice = {c: float(np.nanmean(per_slice[c])) for c in (1, 2)}
    pooled = {c: 2.0 * inter[c] / sizes[c] for c in (1, 2)}
    print("     baseline multi-Otsu (3 classes on image > 0), test split:")
    print(
        f"       mean over slices: GM {mean_slice[1]:.4f}  WM {mean_slice[2]:.4f}"
        f"  mean {(mean_slice[1] + mean_slice[2]) / 2:.4f}"
    )
    print(
        f"       pooled pixels:    GM {pooled[1]:.4f}  WM {pooled[2]:.4f}"
        f"  mean {(pooled[1] + pooled[2]) / 2:.4f}"
    )


# ================================================================= 3D dataset



def aal_lookup(names: dict[int, str]) -> np.ndarray:
    """Lookup table AAL index -> lobe class (0 for index 0). Fails on any unmapped region."""
    lut = np.zeros(256, dtype=np.uint8)
    for index, name in names.items():
        base = re.sub(r"_[LR]$", "", name)
        for pattern, cls in AAL_GROUP_RULES:
            if re.fullmatch(pattern, base):
                lut[index] = cls
                break
        else:
            raise ValueError(f"AAL region {index} {name!r} matches no lobe rule")
    return lut


def find_midline(aal: np.ndarray, names: dict[int, str]) -> int:
    """x index m such that ``*_L`` regions lie at x < m and ``*_R`` at x >= m, best fit."""
    left_ids = [i for i, n in names.items() if n.endswith("_L")]
    right_ids = [i for i, n in names.items() if n.endswith("_R")]
    left = np.isin(aal, left_ids).sum(axis=(1, 2))
    right = np.isin(aal, right_ids).sum(axis=(1, 2))
    # errors(m) = left voxels at x >= m + right voxels at x < m
    errors = [int(left[m:].sum() + right[:m].sum()) for m in range(aal.shape[0] + 1)]
    return int(np.argmin(errors))


def blocks_view(volume: np.ndarray) -> np.ndarray:
    """Reshape (X, Y, Z), each divisible by BLOCK, to (X/B, B, Y/B, B, Z/B, B)."""
    nx, ny, nz = (n // BLOCK for n in volume.shape)
    return volume.reshape(nx, BLOCK, ny, BLOCK, nz, BLOCK)


def block_reduce_mean(volume: np.ndarray) -> np.ndarray:
    return blocks_view(volume.astype(np.float64)).mean(axis=(1, 3, 5))


def block_reduce_majority(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.stack([blocks_view(labels == c).sum(axis=(1, 3, 5)) for c in range(n_classes)])
    return np.argmax(counts, axis=0).astype(np.uint8)  # ties -> lowest class index





def round_up(n: int, multiple: int) -> int:
    return multiple * int(np.ceil(n / multiple))


def build_colin_3d(source: Path, out: Path) -> None:
    src = source / COLIN_DIR
    t1, t1_img = load_array(src / "ch2bet.nii.gz")
    aal, aal_img = load_array(src / "aal.nii.gz")
    if not np.allclose(t1_img.affine, aal_img.affine) or t1.shape != aal.shape:
        raise ValueError("ch2bet and aal grids differ")
    affine = t1_img.affine
    unit_ras = np.allclose(affine[:3, :3], np.eye(3))
    if nib.aff2axcodes(affine) != ("R", "A", "S") or not unit_ras:
        raise ValueError("expected a 1 mm RAS grid")
    sform_code = int(t1_img.header["sform_code"]) or 1

    names = read_aal_names(src / "aal.nii.txt")
    lut = aal_lookup(names)
    brain = t1 > 0
    lobes = np.where(brain, lut[aal], 0).astype(np.uint8)
    midline = find_midline(aal, names)

    # Bounding box of brain or labels (1 mm), then a 2 mm grid anchored on the mid-line in x
    # and on the middle of the superior-inferior extent in z.
    coords = np.argwhere(brain | (lobes > 0))
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    z_mid = int(lo[2] + hi[2] + 1) // 2
    half_x = round_up(int(np.ceil(max(midline - lo[0], hi[0] + 1 - midline) / BLOCK)), MULTIPLE)
    half_z = round_up(int(np.ceil(max(z_mid - lo[2], hi[2] + 1 - z_mid) / BLOCK)), MULTIPLE)
    ny = round_up(int(np.ceil((hi[1] + 1 - lo[1]) / BLOCK)), MULTIPLE)
    y_start = (int(lo[1]) + int(hi[1]) + 1) // 2 - ny * BLOCK // 2

    x_start, z_start = midline - half_x * BLOCK, z_mid - half_z * BLOCK
    starts = (x_start, y_start, z_start)
    stops = (midline + half_x * BLOCK, y_start + ny * BLOCK, z_mid + half_z * BLOCK)
    image2 = np.rint(block_reduce_mean(extract(t1, starts, stops))).astype(np.int16)
    labels2 = block_reduce_majority(extract(lobes, starts, stops), len(LOBES))

    # 2 mm voxel (i, j, k) covers 1 mm voxels start + 2i .. start + 2i + 1: centre start + 2i + 0.5.
    scale = np.diag([BLOCK, BLOCK, BLOCK, 1.0])
    scale[:3, 3] = np.asarray(starts, dtype=float) + (BLOCK - 1) / 2.0
    affine2 = affine @ scale

    dest = out / COLIN_NAME
    if dest.exists():
        shutil.rmtree(dest)
    print(f"[3D] {dest}")
    print(
        f"     mid-line x index {midline} (1 mm), S/I split z index {z_mid}; "
        f"2 mm grid {image2.shape}, labels masked to ch2bet > 0"
    )
    # Hemispheres: left = low x (RAS). Inferior = low z.
    blocks = {
        "colin_lh_inf": (slice(0, half_x), slice(0, half_z)),
        "colin_lh_sup": (slice(0, half_x), slice(half_z, 2 * half_z)),
        "colin_rh_inf": (slice(half_x, 2 * half_x), slice(0, half_z)),
        "colin_rh_sup": (slice(half_x, 2 * half_x), slice(half_z, 2 * half_z)),
    }
    for case, (sx, sz) in blocks.items():
        held_out = case in TEST_CASES
        img_dir, lab_dir = ("imagesTs", "labelsTs") if held_out else ("imagesTr", "labelsTr")
        shift = np.eye(4)
        shift[:3, 3] = (sx.start, 0, sz.start)
        case_affine = affine2 @ shift
        img = np.ascontiguousarray(image2[sx, :, sz])
        lab = np.ascontiguousarray(labels2[sx, :, sz])
        write_nifti_gz(dest / img_dir / f"{case}_0000.nii.gz", img, case_affine, sform_code)
        write_nifti_gz(dest / lab_dir / f"{case}.nii.gz", lab, case_affine, sform_code)
        present = [LOBES[c] for c in np.unique(lab) if c]
        origin = ", ".join(f"{v:.1f}" for v in case_affine[:3, 3])
        print(
            f"     {case:13s} {'test ' if held_out else 'train'} shape {img.shape} "
            f"origin ({origin}) mm; classes: {', '.join(present)}"
        )

    write_json(
        dest / "dataset.json",
        {
            "channel_names": {"0": "T1"},
            "labels": {name: i for i, name in enumerate(LOBES)},
            "numTraining": len(TRAIN_CASES),
            "file_ending": ".nii.gz",
            "name": "Colin27AALLobes",
            "description": (
                "Colin27 skull-stripped T1 (ch2bet) with AAL regions grouped into 8 lobe classes "
                "(left/right merged), at 2 mm; one brain cut into 4 blocks (hemisphere x "
                "inferior/superior). Train: colin_lh_inf, colin_lh_sup, colin_rh_inf; held out: "
                "colin_rh_sup. Single-subject demo, not a generalisation claim. Built by "
                "scripts/prepare_demo_data.py."
            ),
            "reference": (
                "Tzourio-Mazoyer N. et al., NeuroImage 15(1):273-289, 2002 (AAL); "
                "Holmes C.J. et al., J Comput Assist Tomogr 22(2), 1998 (Colin27)"
            ),
            "licence": (
                "Debian mricron-data copyright file (BSD-3-clause for the package): "
                "see debian-copyright and NOTICE.md"
            ),
        },
    )
    shutil.copyfile(src / "debian-copyright", dest / "debian-copyright")
    notice = (src / "NOTICE.md").read_text(encoding="utf-8").rstrip()
    members = {
        i: sorted({re.sub(r"_[LR]$", "", n) for k, n in names.items() if lut[k] == i})
        for i in range(1, len(LOBES))
    }
    grouping = "\n".join(f"- {i} {LOBES[i]}: {', '.join(m)}" for i, m in members.items())
    (dest / "NOTICE.md").write_text(
        "# Demo data `colin27_lobes_3d`: derived from Colin27 and the AAL atlas\n\n"
        "Made by `scripts/prepare_demo_data.py` from `ch2bet.nii.gz` and `aal.nii.gz` described\n"
        "below. The 116 AAL regions are grouped into 8 classes with left and right merged\n"
        "(0 = background, which includes white matter and CSF inside the brain):\n\n"
        f"{grouping}\n\n"
        "Labels are kept only inside the skull-stripped brain (`ch2bet > 0`). Image and labels\n"
        "are reduced to 2 mm isotropic over 2x2x2 blocks (image: mean, rounded to int16;\n"
        "labels: majority vote). The brain is cut at the AAL mid-line into hemispheres and at\n"
        "the middle of its superior-inferior extent into halves, giving 4 cases with their own\n"
        "affines (RAS, 2 mm). Training: colin_lh_inf, colin_lh_sup, colin_rh_inf; held out:\n"
        "colin_rh_sup.\n\n"
        "This is a single-subject demo of the tool (one brain, its own atlas): scores on it say\n"
        "nothing about how a model generalises to other brains or scanners.\n\n"
        + AAL_COLIN_LICENCE_AND_CITATIONS +
        "## Source notice (copied verbatim)\n\n" + notice + "\n",
        encoding="utf-8",
    )
    print(f"     total {dir_bytes(dest)} bytes")


# ================================================================= main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="source folder (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    build_mni_2d(args.source, args.out)
    build_colin_3d(args.source, args.out)


if __name__ == "__main__":
    main()
