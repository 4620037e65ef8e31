"""Overlapping regions (one sigmoid per region) and the ignore label (partial annotations)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import error_lines, invoke, make_blobs
from PIL import Image

from unetcli.data.labels import label_layout, parse_region_labels
from unetcli.data.sampling import PatchSampler
from unetcli.data.types import Case
from unetcli.inference.ensemble import EnsembleNetwork
from unetcli.inference.sliding_window import paint_regions, sliding_window_predict
from unetcli.training.losses import DiceCELoss, RegionDiceBCELoss, region_targets

TINY = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=25", "--batch-size", "4",
        "--lr", "0.01", "--set", "train.warmup_iterations=5", "--precision", "fp32", "--no-plan"]
BRATS_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss_fn", [DiceCELoss(ignore_index=3), DiceCELoss(ignore_index=3, batch_dice=True),
                                     RegionDiceBCELoss([[1, 2], [2]], ignore_index=3)])
def test_ignored_voxels_change_neither_loss_nor_gradient(loss_fn: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    channels = 3 if isinstance(loss_fn, DiceCELoss) else 2
    target = torch.randint(0, 3, (2, 6, 5), generator=gen)
    target[:, :2] = 3  # two unlabelled rows
    logits = torch.randn(2, channels, 6, 5, generator=gen, requires_grad=True)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.count_nonzero(logits.grad[:, :, :2]) == 0  # type: ignore[index]
    assert torch.count_nonzero(logits.grad[:, :, 2:]) > 0  # type: ignore[index]
    other = logits.detach().clone()
    other[:, :, :2] = torch.randn(2, channels, 2, 5, generator=gen) * 10  # anything at all where unlabelled
    assert torch.allclose(loss_fn(other, target), loss, atol=1e-6)


def test_ignore_equals_the_loss_of_the_labelled_voxels_alone() -> None:
    """With an ignore label, CE + Dice are those of the labelled voxels only (here: a labelled crop)."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (1, 4, 8), generator=gen)
    logits = torch.randn(1, 3, 4, 8, generator=gen)
    partial = target.clone()
    partial[:, :, 5:] = 3
    with_ignore = DiceCELoss(ignore_index=3)(logits, partial)
    cropped = DiceCELoss()(logits[..., :5], target[..., :5])
    assert torch.allclose(with_ignore, cropped, atol=1e-6)


def test_all_ignored_batch_has_zero_loss() -> None:
    target = torch.full((1, 4, 4), 2)
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = DiceCELoss(ignore_index=2, include_background=False)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.count_nonzero(logits.grad) == 0  # type: ignore[arg-type]


def test_region_loss_equals_a_hand_computed_value() -> None:
    # One sample, 4 voxels with labels 0, 1, 2, 2; regions {1, 2} and {2}.
    target = torch.tensor([[0, 1, 2, 2]])
    logits = torch.tensor([[[0.0, 2.0, -1.0, 1.0], [0.0, 0.0, 3.0, -2.0]]])
    y = [[0, 1, 1, 1], [0, 0, 1, 1]]
    p = torch.sigmoid(logits[0]).tolist()
    bce = -sum(yi * np.log(pi) + (1 - yi) * np.log(1 - pi) for yr, pr in zip(y, p) for yi, pi in zip(yr, pr)) / 8
    dice = [(2 * sum(a * b for a, b in zip(pr, yr)) + 1e-5) / (sum(pr) + sum(yr) + 1e-5) for pr, yr in zip(p, y)]
    expected = bce + 1 - (dice[0] + dice[1]) / 2
    got = RegionDiceBCELoss([[1, 2], [2]])(logits, target)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_label_map_to_regions_and_back_is_exact() -> None:
    """BraTS-style: whole = {1,2,3} contains core = {2,3} contains enhancing = {3}; painting the
    regions in order with regions_class_order [1, 2, 3] gives the label map back."""
    _, regions = parse_region_labels(BRATS_LABELS, [1, 2, 3])
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (7, 9, 5)))
    layout = label_layout([0, 1, 2, 3], ["background", "label_1", "label_2", "label_3"], regions, Path("d"))
    membership = torch.zeros(4, 3)
    for r, members in enumerate(layout.regions or []):
        membership[members, r] = 1
    masks = region_targets(labels[None], membership)[0]
    assert masks.shape == (3, 7, 9, 5)
    assert torch.equal(masks[1].bool(), (labels == 2) | (labels == 3))
    painted = paint_regions(masks)  # probabilities 0/1
    assert torch.equal(torch.as_tensor(layout.label_values)[painted.long()], labels)


def test_region_dataset_json_is_parsed_like_nnunet() -> None:
    names, regions = parse_region_labels({**BRATS_LABELS, "ignore": 4}, [1, 2, 3])
    assert names == ["background", "label_1", "label_2", "label_3", "ignore"]
    assert regions.names == ["whole", "core", "enhancing"]
    assert regions.values == [[1, 2, 3], [2, 3], [3]]
    layout = label_layout(list(range(5)), names, regions, Path("d"))
    assert (layout.num_outputs, layout.label_values, layout.ignore_index) == (3, [0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match="regions_class_order"):
        parse_region_labels(BRATS_LABELS, None)
    with pytest.raises(ValueError, match="must be higher than every region value"):
        parse_region_labels({**BRATS_LABELS, "ignore": 2}, [1, 2, 3])


# --------------------------------------------------------------------------- sampling and windows


def test_sampler_never_centres_a_foreground_patch_on_ignored_voxels() -> None:
    label = np.zeros((40, 40), np.int64)
    label[2:6, 2:6] = 1
    label[20:, :] = 2  # ignore (index 2 with classes background + 1)
    case = Case("c", np.zeros((1, 40, 40), np.float32), label)
    sampler = PatchSampler([case], (8, 8), 4, num_classes=2, foreground_fraction=1.0, flips=False, rotate90=False)
    assert [len(c) for c in sampler.foreground[0]] == [16]
    for i in range(10):
        _, labels = sampler.batch(i)
        assert (labels == 1).any(dim=(1, 2)).all()  # every patch centred on class 1, never on ignore


def test_sparse_labels_do_not_sit_at_fixed_patch_positions() -> None:
    """A patch spanning the whole slice axis would always put the one labelled slice at the same
    patch position (the network then learns to be right only there); with an ignore label crops
    hang over the edges, filled with ignore and intensity 0."""
    label = np.full((16, 16, 10), 2, np.int64)  # 2 = ignore
    label[:, :, 5] = 0
    label[4:9, 4:9, 5] = 1
    image = np.ones((1, 16, 16, 10), np.float32)
    sampler = PatchSampler([Case("c", image, label)], (16, 16, 10), 2, num_classes=2, flips=False, rotate90=False,
                           ignore_index=2)
    positions, outside = set(), 0
    for i in range(20):
        images, labels = sampler.batch(i)
        for img, lab in zip(images, labels):
            positions |= set(np.flatnonzero((lab != 2).any(dim=(0, 1)).numpy()).tolist())
            assert (lab[img[0] == 0] == 2).all()  # outside the image: intensity 0 and ignore
            outside += int((img[0] == 0).sum())
    assert len(positions) >= 4 and outside > 0
    dense = PatchSampler([Case("c", image, np.where(label == 2, 0, label))], (16, 16, 10), 2, num_classes=2, flips=False,
                         rotate90=False, ignore_index=2)
    assert {int(np.flatnonzero((lab == 1).any(dim=(0, 1)).numpy())[0]) for i in range(5) for lab in dense.batch(i)[1]
            if (lab == 1).any()} == {5}  # no unlabelled voxel (ignore only declared): crops stay inside, as before


def test_sigmoid_windows_and_ensemble_average_region_probabilities() -> None:
    """Overlapping windows average each region's sigmoid (they do not sum to 1), and an ensemble of
    region models averages sigmoids."""
    torch.manual_seed(0)
    nets = [torch.nn.Conv2d(1, 2, 1) for _ in range(2)]  # 1x1: every window sees what the whole image gives
    image = np.random.default_rng(0).normal(size=(1, 24, 20)).astype(np.float32)
    probs = sliding_window_predict(nets[0], image, [16, 16], 2, activation="sigmoid", gaussian=True)
    direct = torch.sigmoid(nets[0](torch.from_numpy(image)[None]))[0]
    assert probs.shape == (2, 24, 20)
    assert torch.allclose(probs, direct, atol=1e-5)
    labels = sliding_window_predict(nets[0], image, [16, 16], 2, activation="sigmoid", output="labels")
    assert torch.equal(labels, paint_regions(direct))
    ensemble = EnsembleNetwork(nets, activation="sigmoid")  # type: ignore[arg-type]
    x = torch.from_numpy(image)[None]
    mean = (torch.sigmoid(nets[0](x)) + torch.sigmoid(nets[1](x))) / 2
    assert torch.allclose(torch.sigmoid(ensemble(x)), mean, atol=1e-5)


# --------------------------------------------------------------------------- end to end


def _region_blobs(root: Path) -> Path:
    """Blobs with a disc (1) and a square (2) as nested regions: anything = {1, 2} contains square = {2}."""
    data = make_blobs(root, n=8)
    (data / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "anything": [1, 2], "square": [2]}, "regions_class_order": [1, 2]}))
    return data


def test_region_model_trains_predicts_and_is_scored_per_region(tmp_path: Path) -> None:
    data = _region_blobs(tmp_path / "d")
    run = tmp_path / "run"
    result = invoke("train", data, "--out", run, "--epochs", "6", *TINY)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"val_dice_anything", "val_dice_square"} <= set(records[0])
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"]
    assert max(r["val_dice_mean"] for r in records) > records[0]["val_dice_mean"] + 0.2

    preds = tmp_path / "preds"
    result = invoke("predict", run, data / "images", preds, "--probabilities")
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(preds / "case00.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2}
    saved = np.load(preds / "case00_probabilities.npz")
    assert saved["probabilities"].shape == (2, 32, 32)
    assert list(saved["label_names"]) == ["anything", "square"]
    # Where the square's probability is > 0.5 the mask says 2 (the later region wins).
    assert (mask[saved["probabilities"][1] > 0.5] == 2).all()

    out = tmp_path / "eval"
    result = invoke("eval", preds, data / "masks", "--out", out)  # regions from dataset.json by default
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["class"] for r in rows} == {"anything", "square"}
    assert {r["label"] for r in rows} == {"1+2", "2"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["foreground_mean"]["dice"] > 0.5


def test_png_ignore_label_trains_and_is_not_scored(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "d", n=8)
    for path in (data / "masks").glob("*.png"):  # the lower half of every mask unlabelled
        mask = np.asarray(Image.open(path)).copy()
        mask[16:] = 3
        Image.fromarray(mask).save(path)
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "disc": 1, "square": 2, "ignore": 3}}))
    run = tmp_path / "run"
    result = invoke("train", data, "--out", run, "--epochs", "4", *TINY)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_dice_ignore" not in records[0] and "val_dice_square" in records[0]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    preds = tmp_path / "preds"
    assert invoke("predict", run, data / "images", preds).exit_code == 0
    assert set(np.unique(np.asarray(Image.open(preds / "case00.png")))) <= {0, 1, 2}  # dense, never "ignore"
    out = tmp_path / "eval"
    result = invoke("eval", preds, data / "masks", "--out", out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["class"] for r in rows} == {"disc", "square"}  # "ignore" is not a class to score


@pytest.mark.parametrize(("labels", "message"), [
    ({"background": 0, "a": [1, 2], "b": [2]}, "regions_class_order"),
    ({"background": 0, "a": 1, "ignore": 2, "b": 3}, "must have the highest label value"),
])
def test_bad_label_structures_are_clear_errors(tmp_path: Path, labels: dict, message: str) -> None:
    data = make_blobs(tmp_path / "d", n=3)
    (data / "dataset.json").write_text(json.dumps({"labels": labels}))
    result = invoke("train", data, "--out", tmp_path / "run", "--epochs", "1", *TINY)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert any(message in line for line in error_lines(result.output)), result.output
    assert not (tmp_path / "run").exists()


def test_3d_regions_with_ignore_through_cross_validation_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NIfTI regions plus an ignore label: `unet cv` scores out-of-fold predictions per region, the
    folds' ensemble (sigmoids averaged) writes painted label values on the input grid, and an export
    of the ensemble predicts the same."""
    import nibabel as nib
    from helpers import make_nnunet

    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    data = make_nnunet(tmp_path / "vol", n=4, flip_first=True)
    for path in (data / "labelsTr").glob("*.nii.gz"):
        img = nib.load(path)
        label = np.asarray(img.dataobj).copy()
        label[..., ::3] = 3  # every third slice of the stored array unlabelled
        nib.save(nib.Nifti1Image(label, img.affine), path)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "regions_class_order": [1, 2],
                                                   "labels": {"background": 0, "anything": [1, 2], "box": 2, "ignore": 3}}))
    out = tmp_path / "cv"
    tiny = ["--set", "model.features=[4,8]", "--set", "train.iterations_per_epoch=4", "--precision", "fp32", "--no-plan"]
    result = invoke("-q", "cv", data, "--folds", "2", "--out", out, "--epochs", "1", *tiny)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["classes"]) == {"anything", "box"}  # regions, never "ignore"

    scan = data / "imagesTr" / "case0_0000.nii.gz"  # stored LPS
    exported = tmp_path / "ensemble.pt"
    assert invoke("export", out, "--out", exported).exit_code == 0
    masks = []
    for name, model in (("cv", out), ("file", exported)):
        pred = invoke("predict", model, scan, tmp_path / name)
        assert pred.exit_code == 0, pred.output
        img = nib.load(tmp_path / name / "case0.nii.gz")
        assert img.shape == nib.load(scan).shape and np.allclose(img.affine, nib.load(scan).affine)
        masks.append(np.asarray(img.dataobj))
    assert set(np.unique(masks[0])) <= {0, 1, 2}
    assert (masks[0] == masks[1]).mean() > 0.999
