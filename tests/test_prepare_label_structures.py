"""scripts/prepare_label_structures.py: sparse labels on canonical (RAS) slices; nested regions from Colin27/AAL."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_label_structures.py"
SHAPE = (8, 8, 10)


def load_script():
    """The script as a module. It imports ``benchlib`` from scripts/, which is on ``sys.path`` when
    the script runs as ``python scripts/prepare_label_structures.py``: here it is put there for
    the import only."""
    scripts = str(SCRIPT.parent)
    added = scripts not in sys.path
    if added:
        sys.path.insert(0, scripts)
    try:
        spec = importlib.util.spec_from_file_location("prepare_label_structures", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(scripts)
    return module


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def make_dataset(root: Path) -> dict[str, np.ndarray]:
    """Three cases with labels 0..2 stored as RAS, LPS (x and y flipped) and SLA (axes permuted, x flipped)."""
    rng = np.random.default_rng(0)
    affines = {
        "ras": np.diag([1.0, 1.0, 1.0, 1.0]),
        "lps": np.array([[-1, 0, 0, 7], [0, -1, 0, 7], [0, 0, 1, 0], [0, 0, 0, 1]], float),
        # stored axis 0 -> +z (S), axis 1 -> -x (L), axis 2 -> +y (A)
        "sla": np.array([[0, -1, 0, 7], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float),
    }
    shapes = {"ras": SHAPE, "lps": SHAPE, "sla": (10, 8, 8)}
    labels = {}
    for name, affine in affines.items():
        lab = rng.integers(0, 3, shapes[name]).astype(np.uint8)
        save(rng.random(shapes[name]).astype(np.float32), affine, root / "imagesTr" / f"{name}_0000.nii.gz")
        save(lab, affine, root / "labelsTr" / f"{name}.nii.gz")
        labels[name] = lab
    save(np.ones(SHAPE, np.float32), affines["lps"], root / "imagesTs" / "test_0000.nii.gz")
    save(np.ones(SHAPE, np.uint8), affines["lps"], root / "labelsTs" / "test.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2},
                                                   "numTraining": 3, "file_ending": ".nii.gz"}))
    return labels


def test_sparse_keeps_canonical_slices(tmp_path: Path) -> None:
    mod = load_script()
    src = tmp_path / "src"
    labels = make_dataset(src)
    # (every, canonical axis) -> stored index kept along the stored axis of each case:
    # kept canonical indices are i % K == K // 2; LPS flips x and y, SLA stores z first and flips x.
    cases = {
        (3, 0): {"ras": (0, [1, 4, 7]), "lps": (0, [0, 3, 6]), "sla": (1, [0, 3, 6])},
        (4, 2): {"ras": (2, [2, 6]), "lps": (2, [2, 6]), "sla": (0, [2, 6])},
        (3, 1): {"ras": (1, [1, 4, 7]), "lps": (1, [0, 3, 6]), "sla": (2, [1, 4, 7])},
    }
    for (every, axis), expected in cases.items():
        out = tmp_path / f"out_{every}_{axis}"
        assert mod.main(["sparse", str(src), str(out), "--every", str(every), "--axis", str(axis)]) == 0
        meta = json.loads((out / "dataset.json").read_text())
        assert list(meta["labels"].items()) == [("background", 0), ("a", 1), ("b", 2), ("ignore", 3)]
        for name, (stored_axis, kept) in expected.items():
            img = nib.load(str(out / "labelsTr" / f"{name}.nii.gz"))
            ref = nib.load(str(src / "labelsTr" / f"{name}.nii.gz"))
            got = np.asarray(img.dataobj)
            assert np.array_equal(img.affine, ref.affine) and got.dtype == np.uint8
            keep = np.isin(np.arange(got.shape[stored_axis]), kept)
            assert np.array_equal(np.compress(keep, got, stored_axis), np.compress(keep, labels[name], stored_axis))
            assert (np.compress(~keep, got, stored_axis) == 3).all()
            # the same rule seen through nibabel's canonical view: labelled slices are i % K == K // 2
            canon = np.asarray(nib.as_closest_canonical(img).dataobj)
            labelled = np.flatnonzero((np.moveaxis(canon, axis, 0) != 3).any(axis=(1, 2)))
            assert labelled.tolist() == [i for i in range(canon.shape[axis]) if i % every == every // 2]
        for sub, name in (("imagesTr", "lps_0000.nii.gz"), ("imagesTs", "test_0000.nii.gz"), ("labelsTs", "test.nii.gz")):
            assert filecmp.cmp(src / sub / name, out / sub / name, shallow=False)


def test_sparse_every_one_is_identity(tmp_path: Path) -> None:
    mod = load_script()
    labels = make_dataset(tmp_path / "src")
    assert mod.main(["sparse", str(tmp_path / "src"), str(tmp_path / "out"), "--every", "1"]) == 0
    for name, lab in labels.items():
        assert np.array_equal(np.asarray(nib.load(str(tmp_path / "out" / "labelsTr" / f"{name}.nii.gz")).dataobj), lab)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"]["ignore"] == 3


@pytest.mark.skipif(not (load_script().DEFAULT_SOURCE / "aal.nii.gz").is_file(), reason="Colin27/AAL source data not available")
def test_regions_nested_labels_in_every_case(tmp_path: Path) -> None:
    mod = load_script()
    assert mod.main(["regions", str(tmp_path / "out")]) == 0
    regions, disjoint = tmp_path / "out" / "regions", tmp_path / "out" / "disjoint"
    meta = json.loads((regions / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "grey_matter": [1, 2, 3], "lobe": [2, 3], "area": [3]}
    assert meta["regions_class_order"] == [1, 2, 3] and meta["numTraining"] == 6
    assert json.loads((disjoint / "dataset.json").read_text())["labels"] == {"background": 0, "gm_other": 1, "lobe_other": 2, "area": 3}
    files = sorted(p.relative_to(regions) for p in regions.rglob("*.nii.gz"))
    assert len(files) == 16 and all(filecmp.cmp(regions / p, disjoint / p, shallow=False) for p in files)
    assert sorted(p.name for p in (regions / "labelsTs").iterdir()) == ["colin_L_med_sup.nii.gz", "colin_R_med_sup.nii.gz"]
    for p in files:
        if p.parts[0].startswith("labels"):
            lab = np.asarray(nib.load(str(regions / p)).dataobj)
            counts = np.bincount(lab.ravel(), minlength=4)
            assert counts.size == 4 and counts[1:].min() >= 900, (p, counts)
