"""Tests for unetcli.data.png and unetcli.data.dataset: reading PNGs, finding, validating and splitting datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetcli.config import DataConfig
from unetcli.data.dataset import discover_dataset, load_dataset, split_cases
from unetcli.data.png import read_png_image, read_png_mask, write_png_mask
from unetcli.errors import DataError

RNG = np.random.default_rng(0)


def save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def gray(h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def make_images_masks(root: Path, masks: dict[str, np.ndarray], mask_dir: str = "masks") -> Path:
    for i, (name, mask) in enumerate(masks.items()):
        save(gray(*mask.shape, seed=i), root / "images" / f"{name}.png")
        save(mask.astype(np.uint8), root / mask_dir / f"{name}.png")
    return root


def label_map(values, h: int = 6, w: int = 5) -> np.ndarray:
    """A mask holding each of ``values`` at least once (rest 0)."""
    m = np.zeros((h, w), dtype=np.uint8)
    for i, v in enumerate(values):
        m.flat[i] = v
    return m


# --------------------------------------------------------------------------- images


def test_grayscale_8bit(tmp_path):
    arr = gray()
    out = read_png_image(save(arr, tmp_path / "g.png"))
    assert out.shape == (1, 6, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], arr)


def test_grayscale_16bit(tmp_path):
    arr = np.array([[0, 1, 300], [4095, 40000, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = read_png_image(path)
    assert out.shape == (1, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], arr.astype(np.float32))


def test_rgb(tmp_path):
    arr = RNG.integers(0, 256, (4, 7, 3)).astype(np.uint8)
    out = read_png_image(save(arr, tmp_path / "rgb.png"))
    assert out.shape == (3, 4, 7) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(out[c], arr[..., c])


def test_rgba_drops_alpha(tmp_path):
    arr = RNG.integers(0, 256, (4, 7, 4)).astype(np.uint8)
    arr[..., 3] = 255  # opaque: colours are stored as given
    arr[0, 0, 3] = 0
    out = read_png_image(save(arr, tmp_path / "rgba.png"))
    assert out.shape == (3, 4, 7)
    np.testing.assert_array_equal(np.moveaxis(out, 0, -1), arr[..., :3])


# --------------------------------------------------------------------------- masks


def test_palette_mask_keeps_indices(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    img = Image.frombytes("P", (3, 2), idx.tobytes())
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)  # 1 -> red, 2 -> green
    path = tmp_path / "pal.png"
    img.save(path)
    assert Image.open(path).mode == "P"
    out = read_png_mask(path)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, idx)  # indices, not colours (red would be 255 / 76)


def test_gray_mask(tmp_path):
    m = label_map([1, 2, 3])
    out = read_png_mask(save(m, tmp_path / "m.png"))
    assert out.shape == (6, 5) and out.dtype == np.int64
    np.testing.assert_array_equal(out, m)


def test_rgb_mask_with_equal_channels_is_accepted(tmp_path):
    m = label_map([1, 2, 3])
    out = read_png_mask(save(np.stack([m, m, m], axis=-1), tmp_path / "m.png"))
    np.testing.assert_array_equal(out, m)


def test_colour_rgb_mask_is_refused(tmp_path):
    m = label_map([1, 2])
    rgb = np.stack([m, m, m], axis=-1)
    rgb[0, 0] = (255, 0, 0)
    path = save(rgb, tmp_path / "colour_mask.png")
    with pytest.raises(DataError, match="colour") as info:
        read_png_mask(path)
    assert str(path) in info.value.message


def test_grayscale_alpha_mask(tmp_path):
    m = label_map([1, 2])
    la = np.stack([m, np.full_like(m, 255)], axis=-1)
    path = tmp_path / "la_mask.png"
    Image.fromarray(la, "LA").save(path)
    assert Image.open(path).mode == "LA"
    np.testing.assert_array_equal(read_png_mask(path), m)


def test_write_png_mask_round_trip(tmp_path):
    m = label_map([1, 2, 7]).astype(np.int64)
    write_png_mask(m, tmp_path / "out.png")
    np.testing.assert_array_equal(read_png_mask(tmp_path / "out.png"), m)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    big = m * 1000
    write_png_mask(big, tmp_path / "big.png")
    np.testing.assert_array_equal(read_png_mask(tmp_path / "big.png"), big)


# --------------------------------------------------------------------------- broken files


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    full = save(RNG.integers(0, 256, (64, 64)).astype(np.uint8), tmp_path / "full.png")
    data = full.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n", encoding="utf-8")
    return {"empty": empty, "truncated": truncated, "text": text}


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
@pytest.mark.parametrize("reader", [read_png_image, read_png_mask], ids=["image", "mask"])
def test_broken_file_is_data_error_naming_it(tmp_path, kind, reader):
    path = _broken_files(tmp_path)[kind]
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(path) in info.value.message


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_png_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------- discover_dataset


def test_discover_images_masks(tmp_path):
    make_images_masks(tmp_path, {"b": label_map([1]), "a": label_map([1])})
    files = discover_dataset(tmp_path)
    assert files.layout == "images_masks"
    assert [c.name for c in files.cases] == ["a", "b"]
    assert files.cases[0].images == [tmp_path / "images" / "a.png"]
    assert files.cases[0].label == tmp_path / "masks" / "a.png"


def test_discover_accepts_labels_folder(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1])}, mask_dir="labels")
    assert discover_dataset(tmp_path).cases[0].label == tmp_path / "labels" / "a.png"


def test_discover_nnunet_layout_with_dataset_json(tmp_path):
    for i, name in enumerate(["case1", "case2"]):
        save(gray(seed=i), tmp_path / "imagesTr" / f"{name}_0000.png")
        save(gray(seed=i + 10), tmp_path / "imagesTr" / f"{name}_0001.png")
        save(label_map([1, 2]), tmp_path / "labelsTr" / f"{name}.png")
    meta = {"labels": {"background": 0, "liver": 1, "tumour": 2}, "channel_names": {"0": "CT", "1": "PET"}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    files = discover_dataset(tmp_path)
    assert files.layout == "nnunet"
    assert files.label_names == ["background", "liver", "tumour"]
    assert files.channel_names == ["CT", "PET"]
    assert [c.name for c in files.cases] == ["case1", "case2"]
    assert [p.name for p in files.cases[1].images] == ["case2_0000.png", "case2_0001.png"]
    data = load_dataset(files, DataConfig())
    assert data.in_channels == 2 and data.num_classes == 3
    assert data.label_names == ["background", "liver", "tumour"]
    assert data.channel_names == ["CT", "PET"]
    assert data.cases[0].image.shape == (2, 6, 5)


def test_discover_nnunet_missing_channel(tmp_path):
    save(gray(), tmp_path / "imagesTr" / "a_0000.png")
    save(gray(), tmp_path / "imagesTr" / "a_0001.png")
    save(gray(), tmp_path / "imagesTr" / "b_0000.png")
    for n in "ab":
        save(label_map([1]), tmp_path / "labelsTr" / f"{n}.png")
    with pytest.raises(DataError, match="b_0001.png"):
        discover_dataset(tmp_path)


def test_unmatched_stems_are_all_listed(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1]), "b": label_map([1])})
    save(gray(), tmp_path / "images" / "only_image.png")
    save(label_map([1]), tmp_path / "masks" / "only_mask.png")
    with pytest.raises(DataError) as info:
        discover_dataset(tmp_path)
    lines = info.value.message.splitlines()
    assert len(lines) == 2
    assert any("only_image.png" in line and "no mask" in line for line in lines)
    assert any("only_mask.png" in line for line in lines)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no images/"):
        discover_dataset(tmp_path)


def test_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no .png or .nii.gz images"):
        discover_dataset(tmp_path)


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover_dataset(tmp_path / "does_not_exist")
    (tmp_path / "images").mkdir()
    save(gray(), tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match="masks/"):
        discover_dataset(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="labelsTr"):
        discover_dataset(tmp_path)


# --------------------------------------------------------------------------- load_dataset


def test_binary_0_255_masks_are_mapped(tmp_path):
    m = np.zeros((6, 5), dtype=np.uint8)
    m[2:4, 1:3] = 255
    make_images_masks(tmp_path, {"a": m, "b": np.flipud(m).copy()})
    data = load_dataset(discover_dataset(tmp_path), DataConfig())
    assert data.label_values == [0, 255]
    assert data.num_classes == 2 and data.in_channels == 1 and data.spatial_dims == 2
    assert data.label_names == ["class_0", "class_1"]
    for case in data.cases:
        assert set(np.unique(case.label).tolist()) == {0, 1}
        assert case.label.dtype == np.int64
    np.testing.assert_array_equal(data.cases[0].label, (m == 255).astype(np.int64))
    # z-score normalised per image
    assert abs(float(data.cases[0].image.mean())) < 1e-5
    assert float(data.cases[0].image.std()) == pytest.approx(1.0, abs=1e-4)


def test_binary_mapping_can_be_disabled(tmp_path):
    m = label_map([255])
    make_images_masks(tmp_path, {"a": m})
    with pytest.raises(DataError, match="255"):
        load_dataset(discover_dataset(tmp_path), DataConfig(map_binary_masks=False))


def test_multiclass_labels_kept(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1, 2]), "b": label_map([2, 3])})
    data = load_dataset(discover_dataset(tmp_path), DataConfig(label_names=["bg", "x", "y", "z"]))
    assert data.num_classes == 4 and data.label_values == [0, 1, 2, 3]
    assert data.label_names == ["bg", "x", "y", "z"]
    np.testing.assert_array_equal(data.cases[1].label, label_map([2, 3]))


def test_size_mismatch_names_mask(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1]), "b": label_map([1])})
    save(label_map([1], h=7, w=5), tmp_path / "masks" / "b.png")
    with pytest.raises(DataError) as info:
        load_dataset(discover_dataset(tmp_path), DataConfig())
    message = info.value.message
    assert str(tmp_path / "masks" / "b.png") in message
    assert "5x7" in message and "5x6" in message


def test_stray_label_value_names_mask_and_value(tmp_path):
    masks = {f"c{i}": label_map([1, 2]) for i in range(4)}
    masks["stray"] = label_map([1, 2, 7])
    make_images_masks(tmp_path, masks)
    with pytest.raises(DataError) as info:
        load_dataset(discover_dataset(tmp_path), DataConfig())
    lines = info.value.message.splitlines()
    assert len(lines) == 1
    assert str(tmp_path / "masks" / "stray.png") in lines[0]
    assert "[7]" in lines[0]


def test_label_beyond_declared_classes(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1]), "b": label_map([1, 2])})
    with pytest.raises(DataError) as info:
        load_dataset(discover_dataset(tmp_path), DataConfig(num_classes=2))
    message = info.value.message
    assert str(tmp_path / "masks" / "b.png") in message
    assert "[2]" in message and "0..1" in message
    assert str(tmp_path / "masks" / "a.png") not in message


def test_all_background_dataset(tmp_path):
    make_images_masks(tmp_path, {"a": np.zeros((6, 5), np.uint8), "b": np.zeros((6, 5), np.uint8)})
    with pytest.raises(DataError, match="all background"):
        load_dataset(discover_dataset(tmp_path), DataConfig())


def test_multiple_problems_are_all_listed(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1]), "b": label_map([1]), "c": label_map([1])})
    save(label_map([1], h=3, w=3), tmp_path / "masks" / "a.png")
    (tmp_path / "images" / "c.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_dataset(discover_dataset(tmp_path), DataConfig())
    lines = info.value.message.splitlines()
    assert len(lines) == 2
    assert str(tmp_path / "masks" / "a.png") in lines[0]
    assert str(tmp_path / "images" / "c.png") in lines[1]


def test_label_names_declare_the_class_count(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1, 2])})
    with pytest.raises(DataError, match=r"\[2\] outside the declared classes 0\.\.1"):
        load_dataset(discover_dataset(tmp_path), DataConfig(label_names=["bg", "fg"]))


def test_label_name_count_mismatch(tmp_path):
    make_images_masks(tmp_path, {"a": label_map([1, 2])})
    with pytest.raises(DataError, match="2 class names given for 3 classes"):
        load_dataset(discover_dataset(tmp_path), DataConfig(num_classes=3, label_names=["bg", "fg"]))


# --------------------------------------------------------------------------- split_cases


def test_split_is_deterministic_disjoint_and_complete():
    names = [f"case{i:02d}" for i in range(11)]
    train, val = split_cases(names, 0.3, seed=5)
    assert split_cases(names, 0.3, seed=5) == (train, val)
    assert not set(train) & set(val)
    assert sorted(train + val) == names
    assert len(val) == 3  # round(0.3 * 11)
    others = {tuple(split_cases(names, 0.3, seed=s)[1]) for s in range(6)}
    assert len(others) > 1  # the seed matters


def test_split_keeps_at_least_one_case_on_each_side():
    train, val = split_cases(["a", "b"], 0.9, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = split_cases(["a", "b", "c"], 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2


def test_single_case_validates_on_itself():
    assert split_cases(["only"], 0.2, seed=0) == (["only"], ["only"])


@pytest.mark.parametrize(("meta", "labels", "channels"), [
    ({"channel_names": "CT", "labels": ["background", "disc", "square"]}, ["background", "disc", "square"], ["CT"]),
    ({"channel_names": ["CT"], "labels": {"0": "background", "1": "disc", "2": "square"}}, ["background", "disc", "square"], ["CT"]),
    ({"modality": {"0": "CT"}, "labels": {}}, None, ["CT"]),
])
def test_unambiguous_dataset_json_forms_are_read(tmp_path: Path, meta: dict, labels: list | None, channels: list) -> None:
    """A single channel name as a string and label names as a list in label order are what they say;
    silently ignoring them would lose a CT dataset's CT normalisation and the class names."""
    from unetcli.data.dataset import _read_dataset_json

    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert _read_dataset_json(tmp_path)[:2] == (labels, channels)
