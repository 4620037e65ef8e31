#!/usr/bin/env python
"""Build a robustness benchmark dataset: clean training octants, held-out scans stored as other scanners would store them.

Usage::

    python scripts/prepare_robustness_data.py OUT [--spacing 2,2,2] [--source DIR] [--colin DIR] [--overwrite]

Why
---
A model is used on scans that differ from its training scans: another orientation and voxel
spacing, a smooth multiplicative bias field (coil sensitivity), noise, another contrast or
intensity scale, another person. Validation Dice on held-out blocks of the training scans
measures none of this. This dataset keeps the training data clean and moves every difference
into the held-out scans, one at a time and at two severities, so a benchmark
(``scripts/bench_robustness.py``) can report held-out Dice per perturbation for unetcli and for
nnU-Net v2 trained on the same cases.

What it builds
--------------
1. The base dataset of ``scripts/prepare_thick_slice_data.py`` (the MNI ICBM 2009a template's
   8 overlapping octants, GM/WM/background labels, re-gridded to ``--spacing``; 6 training
   octants, the anterior-superior mirror pair ``LAS``/``RAS`` held out) in nnU-Net's raw layout.
2. ``imagesTs_robust/`` + ``labelsTs_robust/``: every held-out octant once per perturbation,
   named ``<set>__<case>``. All sets start from the same two held-out octants:

   ============== ==========================================================================
   set            what differs from the training scans
   ============== ==========================================================================
   clean          nothing (the base dataset's test scans)
   scale          intensities x 3.7 + 250 (another scanner's units)
   bias_mild      smooth multiplicative field, 1/1.2 .. 1.2 over the block
   bias_strong    smooth multiplicative field, 1/1.5 .. 1.5 over the block
   bias_severe    smooth multiplicative field, 1/2 .. 2 over the block (surface coils, 7 T)
   noise_mild     Rician noise, sigma = 3 % of the brain's 99th intensity percentile
   noise_strong   Rician noise, sigma = 8 %
   gamma_low      contrast: (I / max) ** 0.7 (grey/white contrast compressed)
   gamma_high     contrast: (I / max) ** 1.5 (expanded)
   regrid         resampled from the 1 mm template to 1.4 x 1.7 x 1.2 mm, rotated 10 degrees,
                  stored in another axis order and direction (PIR-like); labels nearest
   scanner        regrid + bias_strong + noise_mild + scale together
   scanner_severe regrid + bias_severe + noise_strong + scale together
   background_    the brain untouched, Rician noise (sigma = 3 % of the 99th percentile)
   noise          outside it in place of exact zeros: another skull-stripping tool
   ============== ==========================================================================

   and ``colin27__colin27``: another person (Colin27, ``ch2bet``, 1 mm, re-gridded to
   ``--spacing`` the same way as the training cases). Its reference is grey matter only, from
   the AAL atlas drawn on that brain (regions 1-90: the cerebrum's cortex and deep grey
   nuclei) as label 1; label 255 marks voxels not scored (the cerebellum, AAL 91-116, dilated
   by 4 mm, whose grey/white matter AAL does not separate). White matter has no reference there.
   ``colin27_unstripped__colin27`` is the same brain with its skull and scalp (``ch2``) and
   the same reference: the training scans are skull-stripped, users' scans often are not.
   ``background_noise`` and ``colin27_unstripped`` test the normalisation's foreground mask;
   the benchmarks report them next to ``clean`` and ``colin27``, outside the mean of the
   other-scanner sets.
3. ``robustness_sets.json``: per set, its cases, the classes to score, the ignore value and
   what was done, so the benchmark scores every set the same way.

Perturbations are deterministic (seeded per set and case); the bias field is a random
polynomial of degree 3 in *world* coordinates (the same physical field whatever the grid),
scaled so that its log spans +-log(strength) over the block's brain voxels.

Sources: ``shared/data/mni152_2009a`` (ICBM 2009a licence; Fonov et al. 2009, 2011) and
``shared/data/colin27_aal`` (Holmes et al. 1998; AAL: Tzourio-Mazoyer et al. 2002); see the
NOTICE.md files there. This is a benchmark on one template and one other subject, not a
population study.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import benchlib.thick_slices as thick
import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "mni152_2009a"
DEFAULT_COLIN = REPO.parent / "shared" / "data" / "colin27_aal"
IGNORE = 255
INTENSITY_SETS = {
    "clean": {},
    "scale": {"scale": (3.7, 250.0)},
    "bias_mild": {"bias": 1.2},
    "bias_strong": {"bias": 1.5},
    "bias_severe": {"bias": 2.0},
    "noise_mild": {"noise": 0.03},
    "noise_strong": {"noise": 0.08},
    "gamma_low": {"gamma": 0.7},
    "gamma_high": {"gamma": 1.5},
    "background_noise": {"background_noise": 0.03},
}
REGRID_SETS = {
    "regrid": {},
    "scanner": {"bias": 1.5, "noise": 0.03, "scale": (3.7, 250.0)},
    "scanner_severe": {"bias": 2.0, "noise": 0.08, "scale": (3.7, 250.0)},
}
REGRID_SPACING = (1.4, 1.7, 1.2)
REGRID_ROTATION_DEG = 10.0


# ================================================================= perturbations (pure numpy)
def world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """(3, *shape) world positions (mm) of every voxel centre."""
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3, *shape))


def bias_field(shape: tuple[int, ...], affine: np.ndarray, brain: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """A smooth multiplicative field whose log spans +-log(strength) over ``brain`` (degree-3 polynomial in world mm)."""
    rng = np.random.default_rng(seed)
    xyz = world_coordinates(shape, affine)
    centre = np.array([xyz[a][brain].mean() for a in range(3)]).reshape(3, 1, 1, 1)
    half = np.array([np.ptp(xyz[a][brain]) / 2 for a in range(3)]).reshape(3, 1, 1, 1)
    u = (xyz - centre) / np.maximum(half, 1e-6)
    poly = np.zeros(shape)
    for i in range(4):
        for j in range(4 - i):
            for k in range(4 - i - j):
                if i + j + k:
                    poly += rng.normal() * u[0] ** i * u[1] ** j * u[2] ** k
    span = np.abs(poly[brain]).max()
    return np.exp(np.log(strength) * poly / max(span, 1e-9)).astype(np.float32)


def rician_noise(image: np.ndarray, brain: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of sigma = fraction * (99th brain percentile)."""
    rng = np.random.default_rng(seed)
    sigma = fraction * float(np.percentile(image[brain], 99))
    real = image + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def perturb(image: np.ndarray, affine: np.ndarray, spec: dict, seed: int) -> np.ndarray:
    """Apply a set's intensity changes in a fixed order: contrast, bias field, noise, scale."""
    out = image.astype(np.float32)
    brain = out > 0
    if "gamma" in spec:
        top = float(out.max())
        out = (top * (out / top) ** spec["gamma"]).astype(np.float32)
    if "bias" in spec:
        out = out * bias_field(out.shape, affine, brain, spec["bias"], seed)
    if "noise" in spec:
        out = rician_noise(out, brain, spec["noise"], seed + 1)
    if "background_noise" in spec:
        # Noise outside the brain only, the brain untouched: a scan stripped by a tool that leaves
        # the background as measured instead of exact zeros. Tests the normalisation's mask alone.
        # Where the image is 0, Rician noise is Rayleigh noise of the same sigma.
        out = np.where(brain, out, rician_noise(out, brain, spec["background_noise"], seed + 2)).astype(np.float32)
    if "scale" in spec:
        a, b = spec["scale"]
        out = (a * out + b).astype(np.float32)
    return out


# ================================================================= re-gridding
def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def regrid_target(box_affine: np.ndarray, box_shape: tuple[int, ...], spacing: tuple[float, float, float],
                  degrees: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A rotated grid of ``spacing`` covering the box, stored in another axis order/direction (voxel axes PIR-like)."""
    corners = np.array([[i, j, k, 1] for i in (0, box_shape[0] - 1) for j in (0, box_shape[1] - 1) for k in (0, box_shape[2] - 1)]).T
    world = (box_affine @ corners)[:3]
    centre = world.mean(1)
    # Voxel axis 0 runs posterior (-y), axis 1 inferior (-z), axis 2 right (+x): another storage order.
    axes = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float).T  # columns = world direction of each voxel axis
    direction = rotation(2, degrees) @ axes
    extent = np.abs(np.linalg.inv(direction) @ (world - centre[:, None])).max(1) * 2
    shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(extent, spacing))
    aff = np.eye(4)
    aff[:3, :3] = direction * np.asarray(spacing)[None, :]
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return aff, shape  # type: ignore[return-value]


def resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, ...], order: int,
             fill: float) -> np.ndarray:
    """Sample ``volume`` at the voxel centres of the target grid (``order`` 0 = nearest, 1 = linear)."""
    xyz = world_coordinates(dst_shape, dst_affine).reshape(3, -1)
    inv = np.linalg.inv(src_affine)
    ijk = inv[:3, :3] @ xyz + inv[:3, 3:4]
    out = ndimage.map_coordinates(volume, ijk, order=order, mode="constant", cval=fill, prefilter=False)
    return out.reshape(dst_shape)


def regrid_case(t1_box: np.ndarray, labels_box: np.ndarray, box_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-grid a 1 mm block to :data:`REGRID_SPACING`, rotated and stored in another orientation."""
    dst_affine, dst_shape = regrid_target(box_affine, t1_box.shape, REGRID_SPACING, REGRID_ROTATION_DEG)
    # Anti-alias before sampling coarser than 1 mm (sigma ~ half the new spacing, in 1 mm voxels).
    smooth = ndimage.gaussian_filter(t1_box.astype(np.float32), sigma=[max(0.0, (s - 1) / 2) for s in sorted(REGRID_SPACING)])
    image = resample(smooth, box_affine, dst_affine, dst_shape, order=1, fill=0.0).astype(np.float32)
    labels = resample(labels_box, box_affine, dst_affine, dst_shape, order=0, fill=0).astype(np.uint8)
    return image, labels, dst_affine


# ================================================================= Colin27
def colin27_case(colin: Path, factors: tuple[int, int, int], t1_file: str = "ch2bet.nii.gz"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colin27 at the training spacing: image (block mean), GM reference (AAL 1-90 majority), 255 = not scored.
    ``t1_file``: the skull-stripped T1 (``ch2bet``) or the whole head (``ch2``), on the same grid."""
    t1, img = thick.load(colin / t1_file)
    aal, _ = thick.load(colin / "aal.nii.gz")
    t1 = t1.astype(np.float32)
    aal = aal.astype(np.int32)
    gm = (aal >= 1) & (aal <= 90)
    cerebellum = ndimage.binary_dilation(aal >= 91, iterations=4)
    pad = [(0, (-n) % f) for n, f in zip(t1.shape, factors)]
    t1, gm, cerebellum = np.pad(t1, pad), np.pad(gm, pad), np.pad(cerebellum, pad)
    image = thick.regrid_image(t1, factors).astype(np.float32)
    gm_frac = thick.block_view(gm.astype(np.float32), factors).mean(-1)
    skip = thick.block_view(cerebellum.astype(np.float32), factors).mean(-1) > 0
    label = (gm_frac > 0.5).astype(np.uint8)
    label[skip] = IGNORE
    return image, label, thick.regrid_affine(img.affine, (0, 0, 0), factors)


# ================================================================= build
def build(out: Path, source: Path, colin: Path, factors: tuple[int, int, int]) -> dict:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    summary = thick.build(source, tmp, factors, 10, ("LAS", "RAS"), None)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if (source / "NOTICE.md").is_file():
        shutil.copy(source / "NOTICE.md", tmp / "NOTICE.md")

    t1_1mm, t1_img = thick.load(source / "t1.nii.gz")
    gm, _ = thick.load(source / "gm_probability.nii.gz")
    wm, _ = thick.load(source / "wm_probability.nii.gz")
    labels_1mm, _ = thick.tissue_labels(t1_1mm, gm, wm)
    t1_1mm = t1_1mm.astype(np.float32)

    sets: dict = {}
    tests = [c for c in summary["cases"] if c["split"] == "test"]
    for n_case, case in enumerate(tests):
        name = case["case"]
        img = nib.load(str(tmp / "imagesTs" / f"{name}_0000.nii.gz"))
        image, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
        label = np.asarray(nib.load(str(tmp / "labelsTs" / f"{name}.nii.gz")).dataobj).astype(np.uint8)
        (x0, x1), (y0, y1), (z0, z1) = case["box_1mm"]
        t1_box = np.zeros((x1 - x0, y1 - y0, z1 - z0), np.float32)
        lab_box = np.zeros(t1_box.shape, np.uint8)
        src = t1_1mm[x0:x1, y0:y1, z0:z1]
        t1_box[: src.shape[0], : src.shape[1], : src.shape[2]] = src
        lab_box[: src.shape[0], : src.shape[1], : src.shape[2]] = labels_1mm[x0:x1, y0:y1, z0:z1]
        box_affine = t1_img.affine.copy()
        box_affine[:3, 3] = t1_img.affine[:3, :3] @ np.array([x0, y0, z0]) + t1_img.affine[:3, 3]
        regridded = regrid_case(t1_box, lab_box, box_affine)
        for set_name, spec in [*INTENSITY_SETS.items(), *REGRID_SETS.items()]:
            base_image, base_label, base_affine = (image, label, affine) if set_name in INTENSITY_SETS else regridded
            # Seeded by the set's name, so adding a set leaves every other set's files unchanged.
            out_image = perturb(base_image, base_affine, spec, seed=zlib.crc32(set_name.encode()) + 100 * n_case)
            case_name = f"{set_name}__{name}"
            thick.write_nifti_gz(tmp / "imagesTs_robust" / f"{case_name}_0000.nii.gz", out_image, base_affine)
            thick.write_nifti_gz(tmp / "labelsTs_robust" / f"{case_name}.nii.gz", base_label, base_affine)
            entry = sets.setdefault(set_name, {"cases": [], "classes": {"grey_matter": 1, "white_matter": 2}, "ignore": None,
                                               "perturbation": {**spec, **({"regrid_spacing_mm": list(REGRID_SPACING),
                                                                            "rotation_deg": REGRID_ROTATION_DEG,
                                                                            "axis_codes": "".join(nib.aff2axcodes(base_affine))}
                                                                           if set_name in REGRID_SETS else {})}})
            entry["cases"].append(case_name)

    if colin.is_dir():
        # The training scans are skull-stripped; Colin27 comes stripped (ch2bet) and as the whole head (ch2).
        for set_name, t1_file in (("colin27", "ch2bet.nii.gz"), ("colin27_unstripped", "ch2.nii.gz")):
            if not (colin / t1_file).is_file():
                continue
            image, label, affine = colin27_case(colin, factors, t1_file)
            thick.write_nifti_gz(tmp / "imagesTs_robust" / f"{set_name}__colin27_0000.nii.gz", image, affine)
            thick.write_nifti_gz(tmp / "labelsTs_robust" / f"{set_name}__colin27.nii.gz", label, affine)
            sets[set_name] = {"cases": [f"{set_name}__colin27"], "classes": {"grey_matter": 1}, "ignore": IGNORE,
                              "perturbation": {"subject": f"Colin27 ({t1_file.split('.')[0]})",
                                               "reference": "AAL 1-90 as grey matter",
                                               "not_scored": "cerebellum (AAL 91-116) dilated 4 mm"}}
        shutil.copy(colin / "NOTICE.md", tmp / "NOTICE_colin27.md")
    (tmp / "robustness_sets.json").write_text(json.dumps(sets, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return sets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--spacing", type=thick.parse_spacing, default=(2, 2, 2), help="training spacing in whole mm (default 2,2,2)")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="MNI ICBM 2009a folder (t1, gm/wm probability)")
    p.add_argument("--colin", type=Path, default=DEFAULT_COLIN, help="Colin27 + AAL folder (skipped when absent)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it")
    sets = build(args.out, args.source, args.colin, args.spacing)
    for name, entry in sets.items():
        print(f"{name:14s} {len(entry['cases'])} case(s)  {entry['perturbation']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
