"""`unet plan`: each planning rule against hand-computed values, the planner on real thick-slice MRI
(the shipped Colin27 blocks re-gridded to 2 x 2 x 8 mm), and plans applied by `unet train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import error_lines, invoke, invoke_quiet, save_nifti

import unetcli
from unetcli.config import config_from_dict
from unetcli.data import spacing
from unetcli.planning import rules
from unetcli.planning.apply import apply_plan
from unetcli.planning.budget import Budget
from unetcli.planning.fingerprint import CaseFingerprint, Fingerprint
from unetcli.planning.plan_file import SavedPlan
from unetcli.planning.planner import make_plan, plan_configuration
from unetcli.workflows.demo import demo_data_dir

GB = 1e9


# --------------------------------------------------------------------------- rules


def test_thick_axis_gets_kernel_1_and_is_pooled_only_once_its_spacing_is_within_2x() -> None:
    # 1 x 1 x 4 mm: x and y are pooled twice (spacing 1 -> 2 -> 4) before z joins; z's kernel is 1
    # until the in-plane spacing reaches 2 mm (4 / 2 = 2 is not < 2) and 4 mm.
    topo = rules.topology([1.0, 1.0, 4.0], [97, 115, 24])
    assert topo.strides == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
    assert topo.kernel_sizes == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert topo.multiple == [16, 16, 4]
    assert topo.patch == [112, 128, 24]  # padded up to the multiple


def test_isotropic_topology_pools_each_axis_while_it_keeps_8_voxels() -> None:
    topo = rules.topology([1.0, 1.0, 1.0], [128, 128, 128])
    # 128 -> 64 -> 32 -> 16 -> 8 -> 4: five poolings, six levels, kernel 3 everywhere (nnU-Net's plan for 128^3).
    assert topo.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert topo.kernel_sizes == [[3, 3, 3]] * 6
    assert topo.patch == [128, 128, 128]


def test_short_axis_stops_pooling_and_single_axis_needs_12_voxels() -> None:
    topo = rules.topology([1.0, 1.0], [40, 20])
    # 40,20 -> 20,10 -> 10,5 (20 >= 8, 10 >= 8) -> only x (10) is left, 10 < 12: stop.
    assert topo.strides == [[1, 1], [2, 2], [2, 2]]
    assert topo.patch == [40, 20]


def test_out_of_plane_axis_needs_both_thick_spacing_and_few_voxels() -> None:
    assert spacing.out_of_plane_axis([1, 1, 4], [100, 100, 25]) == 2
    assert spacing.out_of_plane_axis([1, 1, 4], [100, 100, 100]) is None  # long field of view along z
    assert spacing.out_of_plane_axis([1, 1, 2.5], [100, 100, 20]) is None  # only 2.5x thicker


def test_fullres_spacing_takes_the_10th_percentile_of_the_thick_axis_but_not_below_in_plane() -> None:
    spacings = [[0.8, 0.8, z] for z in (3.0, 4.0, 5.0, 5.0, 6.0)]
    shapes = [[256, 256, 30]] * 5
    assert spacing.fullres_spacing(spacings, shapes) == pytest.approx([0.8, 0.8, np.percentile([3, 4, 5, 5, 6], 10)])
    iso = [[1.0, 1.0, 1.0], [1.2, 1.2, 1.2], [0.9, 0.9, 0.9]]
    assert spacing.fullres_spacing(iso, [[100, 100, 100]] * 3) == pytest.approx([1.0, 1.0, 1.0])


def test_initial_patch_has_the_same_extent_in_mm_and_is_clipped_to_the_median_image() -> None:
    patch = rules.initial_patch([1.0, 1.0, 4.0], [500, 500, 500])
    assert patch[0] == patch[1] and patch[0] / patch[2] == pytest.approx(4, rel=0.02)
    assert math.prod(patch) == pytest.approx(256**3, rel=0.03)
    assert rules.initial_patch([1.0, 1.0, 4.0], [97, 115, 24]) == [97, 115, 24]


def test_batch_size_is_what_fits_but_at_most_5_percent_of_the_dataset_and_at_least_2() -> None:
    assert rules.batch_size(fits=50, patch=[10, 10], dataset_voxels=100 * 100 * 100) == 50  # cap 500
    assert rules.batch_size(fits=50, patch=[100, 100], dataset_voxels=100 * 100 * 100) == 5
    assert rules.batch_size(fits=1, patch=[100, 100], dataset_voxels=1e9) == 2


def test_normalisation_rules() -> None:
    assert rules.normalization("ct", 0.5) == "ct"
    assert rules.normalization("mri", 0.5) == "zscore_nonzero"  # skull-stripped: zero background dominates
    assert rules.normalization("mri", 0.9) == "zscore"
    assert [rules.modality(n) for n in ("CT", "T1", "FLAIR", "ultrasound")] == ["ct", "mri", "mri", "other"]


def test_features_double_per_level_up_to_the_cap() -> None:
    assert rules.features_per_level(7, 3) == [32, 64, 128, 256, 320, 320, 320]
    assert rules.features_per_level(7, 2) == [32, 64, 128, 256, 512, 512, 512]


def test_lowres_step_coarsens_the_fine_axes_first() -> None:
    assert rules.lowres_spacing_step([1.0, 1.0, 4.0]) == pytest.approx([1.03, 1.03, 4.0])
    assert rules.lowres_spacing_step([2.0, 2.0, 2.0]) == pytest.approx([2.06, 2.06, 2.06])


def test_memory_estimate_grows_linearly_with_the_batch_and_the_patch_shrinks_to_fit_a_budget() -> None:
    net = rules.Network([32, 64, 128], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], 1, 2, [2, 2, 2], 2)
    one, two, three = (rules.training_memory_bytes(net, [64, 64, 64], b, 2) for b in (1, 2, 3))
    assert two - one == pytest.approx(three - two)
    # The stem's two 32-channel convolutions alone hold 2 x 32 x 64^3 elements x 3 copies x 2 bytes per sample.
    assert two - one > 2 * 32 * 64**3 * 3 * 2
    big = plan_configuration("3d_fullres", [1.0] * 3, [160] * 3, 160**3 * 100, 1, 2, Budget(2, memory_bytes=40 * GB), "plain")
    small = plan_configuration("3d_fullres", [1.0] * 3, [160] * 3, 160**3 * 100, 1, 2, Budget(2, memory_bytes=2 * GB), "plain")
    assert math.prod(small.patch) < math.prod(big.patch)
    assert small.memory_gb <= 2 and big.memory_gb <= 40
    assert all(p % m == 0 for p, m in zip(small.patch, [math.prod(s[a] for s in small.strides) for a in range(3)]))
    assert small.batch_size >= 2


def _fingerprint(spacing: list[float], shape: list[int], n: int = 6, modality: str = "mri", cropped: float = 1.0) -> Fingerprint:
    cropped_shape = [round(s * cropped ** (1 / 3)) for s in shape]
    cases = [CaseFingerprint(f"c{i}", spacing, shape, cropped_shape) for i in range(n)]
    return Fingerprint(3, "nifti", ["CT" if modality == "ct" else "T1"], [modality], cases,
                       [{"mean": 0.0, "std": 1.0, "p00_5": -1.0, "p99_5": 1.0}], {"0": 0.9, "1": 0.1})


def test_plan_of_a_thick_slice_dataset() -> None:
    plan = make_plan(_fingerprint([0.5, 0.5, 4.0], [320, 320, 30]), Budget(2, memory_bytes=8 * GB), num_classes=2)
    assert set(plan.configurations) >= {"2d", "3d_fullres"} and plan.default == "3d_fullres"
    full = plan.configurations["3d_fullres"]
    assert full.spacing == [0.5, 0.5, 4.0]
    assert full.kernel_sizes[0] == [3, 3, 1] and full.strides[1] == [2, 2, 1]
    z_pooled = [i for i, s in enumerate(full.strides) if s[2] == 2]
    assert z_pooled and all(k[2] == 3 for k in full.kernel_sizes[z_pooled[0]:])  # kernel 3 once z is pooled
    assert plan.configurations["2d"].slice_axis == 2  # 2D slices across the thick axis
    cfg = config_from_dict(full.to_config())
    assert cfg.model.kernel_sizes == full.kernel_sizes and cfg.train.patch_size == full.patch


def test_ct_and_cropped_mri_normalisation_reach_the_config() -> None:
    ct = make_plan(_fingerprint([1.0] * 3, [100] * 3, modality="ct"), Budget(2, memory_bytes=8 * GB), 2)
    assert ct.configurations["3d_fullres"].normalization == ["ct"]
    mri = make_plan(_fingerprint([1.0] * 3, [100] * 3, cropped=0.5), Budget(2, memory_bytes=8 * GB), 2)
    assert mri.configurations["3d_fullres"].to_config()["data"]["normalization"] == "zscore_nonzero"


def test_lowres_configuration_only_when_the_fullres_patch_covers_under_a_quarter() -> None:
    large = make_plan(_fingerprint([1.0] * 3, [400, 400, 400]), Budget(2, memory_bytes=4 * GB), 2)
    low = large.configurations["3d_lowres"]
    assert min(low.spacing) > 1.0
    assert math.prod(low.patch) / math.prod(low.median_shape) >= rules.LOWRES_COVERAGE
    small = make_plan(_fingerprint([1.0] * 3, [64, 64, 64]), Budget(2, memory_bytes=8 * GB), 2)
    assert "3d_lowres" not in small.configurations


def test_residual_preset_plans_residual_blocks() -> None:
    plan = make_plan(_fingerprint([1.0] * 3, [96, 96, 96]), Budget(2, memory_bytes=8 * GB), 2, preset="resenc-m")
    full = plan.configurations["3d_fullres"]
    assert full.encoder == "residual" and full.blocks_per_level == [1, 3, 4, 6, 6, 6][: len(full.features)]
    plain = make_plan(_fingerprint([1.0] * 3, [96, 96, 96]), Budget(2, memory_bytes=8 * GB), 2).configurations["3d_fullres"]
    assert full.parameters > plain.parameters


def test_user_keys_win_over_the_plan_and_topology_is_one_unit() -> None:
    saved = SavedPlan("3d_fullres", {"3d_fullres": {
        "model": {"features": [32, 64, 128], "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3]],
                  "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]]},
        "train": {"patch_size": [64, 64, 16], "batch_size": 4}}}, "test plan")
    base = config_from_dict({"train": {"batch_size": 2}})
    cfg, name = apply_plan(base, saved, None, {"train.batch_size"})
    assert name == "3d_fullres" and cfg.train.batch_size == 2 and cfg.train.patch_size == [64, 64, 16]
    assert cfg.model.kernel_sizes == [[3, 3, 1], [3, 3, 3], [3, 3, 3]]
    own = config_from_dict({"model": {"features": [8, 16]}})
    cfg, _ = apply_plan(own, saved, None, {"model.features"})
    assert cfg.model.features == [8, 16] and cfg.model.kernel_sizes is None and cfg.model.strides is None
    assert cfg.train.patch_size is None  # the plan's patch was made for the plan's pooling
    assert cfg.train.batch_size is None  # and its batch for the plan's network: the default applies


# --------------------------------------------------------------------------- real data, CLI


def _thick_colin(root: Path, factor: int = 4) -> Path:
    """The shipped Colin27 lobe blocks (2 mm) with every `factor` axial slices averaged: 2 x 2 x 8 mm."""
    src = demo_data_dir("3d")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for path in sorted((src / sub).glob("*.nii.gz")):
            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
            z = data.shape[2] // factor * factor
            if sub == "imagesTr":
                thick = data[:, :, :z].reshape(*data.shape[:2], -1, factor).mean(-1).astype(np.float32)
            else:
                thick = data[:, :, factor // 2:z:factor].astype(np.uint8)
            affine = img.affine @ np.diag([1.0, 1.0, factor, 1.0])
            save_nifti(thick, affine, root / sub / path.name)
    (root / "dataset.json").write_text((src / "dataset.json").read_text())
    return root


@pytest.fixture(scope="module")
def thick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _thick_colin(tmp_path_factory.mktemp("thick") / "colin_thick")


def test_unet_plan_on_thick_slice_mri_writes_a_plan_train_can_use(thick: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plans.yaml"
    result = invoke("plan", thick, "--out", out, "--memory", "4")
    assert result.exit_code == 0, result.output
    assert "3d_fullres" in result.output and "patch size" in result.output and "4 GB (--memory)" in result.output
    plan = yaml.safe_load(out.read_text())
    full = plan["configurations"]["3d_fullres"]["config"]
    assert full["data"]["target_spacing"] == pytest.approx([2.0, 2.0, 8.0])
    assert full["model"]["kernel_sizes"][0] == [3, 3, 1] and full["model"]["strides"][1] == [2, 2, 1]
    assert plan["configurations"]["2d"]["config"]["data"]["slice_axis"] == 2
    # Hand-edit the plan: a smaller network; train with it for a few steps.
    full["model"].update(features=[8, 16, 32], kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3]],
                         strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]])
    full["train"].update(patch_size=[32, 48, 8], batch_size=2)
    out.write_text(yaml.safe_dump(plan))
    run = tmp_path / "run"
    result = invoke_quiet("train", thick, "--plan", out, "--out", run, "--epochs", "1",
                          "--set", "train.iterations_per_epoch=2", "--set", "data.val_fraction=0")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["kernel_sizes"] == [[3, 3, 1], [3, 3, 3], [3, 3, 3]]
    assert saved["train"]["patch_size"] == [32, 48, 8] and saved["data"]["target_spacing"] == pytest.approx([2, 2, 8])
    assert yaml.safe_load((run / "plans.yaml").read_text())["used"] == "3d_fullres"
    pred = invoke_quiet("predict", run, thick / "imagesTr", tmp_path / "pred")
    assert pred.exit_code == 0, pred.output
    written = nib.load(str(next((tmp_path / "pred").glob("*.nii.gz"))))
    assert written.shape == nib.load(str(next((thick / "labelsTr").glob("*.nii.gz")))).shape


def test_train_plans_automatically_and_says_so(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("train", data, "--out", run, "--epochs", "1", "--set", "train.iterations_per_epoch=2",
                    "--set", "model.features=[8,16]")
    assert result.exit_code == 0, result.output
    assert "plan: configuration 2d" in result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["features"] == [8, 16] and saved["model"]["norm"] == "instance"
    assert saved["train"]["batch_size"] >= 2 and saved["train"]["patch_size"] == [32, 32]
    plain = tmp_path / "plain"
    result = invoke("train", data, "--out", plain, "--epochs", "1", "--set", "train.iterations_per_epoch=2", "--no-plan")
    assert result.exit_code == 0 and "plan:" not in result.output and not (plain / "plans.yaml").exists()
    assert yaml.safe_load((plain / "config.yaml").read_text())["model"]["norm"] == "batch"


def _thick_plan(seconds_per_step: float | None = 7.0, spatial_dims: int = 3, spacing: list[float] | None = None):
    from unetcli.planning.planner import ConfigurationPlan

    return ConfigurationPlan("3d_fullres" if spatial_dims == 3 else "2d", spatial_dims, spacing or [1.0, 1.0, 4.0],
                             [180, 210, 45], [96, 112, 24], 2, [32, 64, 128, 256], [[3, 3, 1]] * 4, [[1, 1, 1]] + [[2, 2, 1]] * 3,
                             ["zscore"], "plain", None, 4.0, seconds_per_step, 5_000_000)


def test_short_thick_slice_runs_train_the_fixed_network_and_longer_ones_the_plan() -> None:
    from unetcli.config import TrainConfig
    from unetcli.planning.apply import expected_iterations, short_run_reason

    def fixed(config, **train) -> bool:
        return short_run_reason(config, TrainConfig(**train)) is not None

    thick = _thick_plan()
    assert fixed(thick, epochs=20, iterations_per_epoch=50)  # 1,000 iterations: the fixed network
    assert not fixed(thick, epochs=21, iterations_per_epoch=50)  # 1,050: the plan
    assert not fixed(thick)  # the default 30 x 50 = 1,500: the plan
    assert not fixed(_thick_plan(spacing=[1.0, 1.0, 2.5]), epochs=2)  # not thick (2.5x)
    assert not fixed(_thick_plan(spatial_dims=2), epochs=2)  # 2D slices
    # A time budget counts at the plan's estimated seconds per step: 1 h at 7 s is ~514 steps, 3 h ~1,543.
    assert expected_iterations(TrainConfig(epochs=None, time_limit=3600), 7.0) == pytest.approx(514.3, abs=0.1)
    assert fixed(thick, epochs=None, time_limit=3600) and not fixed(thick, epochs=None, time_limit=3 * 3600)
    assert fixed(thick, epochs=10, time_limit=3 * 3600)  # 500 epochs' iterations end it first
    assert not fixed(_thick_plan(seconds_per_step=None), epochs=None, time_limit=600)  # a GPU: no estimate, the plan
    # torchrun's processes each read their CPU's speed: a time budget alone keeps the plan there, so they agree
    assert short_run_reason(thick, TrainConfig(epochs=None, time_limit=3600), use_estimate=False) is None
    assert short_run_reason(thick, TrainConfig(epochs=10, time_limit=3600), use_estimate=False) is not None
    reason = short_run_reason(thick, TrainConfig(epochs=None, time_limit=3600))
    assert reason is not None and "about 514 iterations in --time 60m" in reason and "1 x 1 x 4 mm" in reason
    # A target spacing the user gave is the grid the run trains on.
    assert short_run_reason(thick, TrainConfig(epochs=2), spacing=[2.0, 2.0, 2.0]) is None


def test_train_on_thick_slices_says_when_a_short_run_leaves_the_plan_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unetcli.config import ConfigSources
    from unetcli.workflows.train import PlanChoice, planned_config

    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    thick = Path(unetcli.__file__).parent / "demo_data" / "mni_thick_3d"
    short = ("--epochs", "1", "--set", "train.iterations_per_epoch=2", "--set", "data.val_fraction=0")
    run = tmp_path / "short"
    result = invoke("train", thick, "--out", run, *short)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "plan: not used: thick slices (2 x 2 x 8 mm) and 2 iterations" in said and "--config 3d_fullres" in said
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["norm"] == "batch" and saved["model"]["kernel_sizes"] is None  # the fixed network
    assert not (run / "plans.yaml").exists()
    named = tmp_path / "named"
    result = invoke("train", thick, "--out", named, "--config", "3d_fullres", *short)
    assert result.exit_code == 0 and "plan: configuration 3d_fullres" in result.output
    assert yaml.safe_load((named / "config.yaml").read_text())["model"]["kernel_sizes"][0] == [3, 3, 1]
    # The default budget (30 epochs of 50 iterations) is long enough for the plan.
    cfg, files, _ = planned_config(thick, ConfigSources(None, [], {}), PlanChoice())
    assert "plans.yaml" in files and cfg.model.kernel_sizes[0] == [3, 3, 1] and cfg.train.patch_size == [40, 48, 10]
    # Your own network keys: the rule has nothing to choose, the rest of the plan applies.
    own = ConfigSources(None, ["model.features=[8,16,32,64]"], {"train.epochs": 1})
    assert "plans.yaml" in planned_config(thick, own, PlanChoice())[1]
    # A minute on a CPU this slow fits a few steps: the fixed network; under torchrun the estimate is not used.
    from unetcli.planning import budget

    monkeypatch.setattr(budget, "_measure_rate", lambda bf16=False: 1e9)
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "slow"))
    minute = ConfigSources(None, [], {"train.time_limit": 60.0})
    assert planned_config(thick, minute, PlanChoice())[1] == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert "plans.yaml" in planned_config(thick, minute, PlanChoice())[1]


def test_plan_errors_are_clear(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  lr: 0.01\n")
    result = invoke("plan", data, "--out", config)
    assert result.exit_code != 0 and "already exists" in error_lines(result.output)[0]
    result = invoke("plan", data, "--out", config, "--overwrite")
    assert "is not a plan" in error_lines(result.output)[0] and config.read_text() == "train:\n  lr: 0.01\n"
    result = invoke("train", data, "--plan", config, "--out", tmp_path / "r")
    assert "is not a plan" in error_lines(result.output)[0]
    plan = tmp_path / "plans.yaml"
    assert invoke("plan", data, "--out", plan, "--memory", "1").exit_code == 0
    result = invoke("train", data, "--plan", plan, "--config", "3d_lowres", "--out", tmp_path / "r")
    assert "no configuration '3d_lowres'" in error_lines(result.output)[0]
    result = invoke("train", data, "--config", plan, "--out", tmp_path / "r")
    assert "is a plan, not a config" in error_lines(result.output)[0]
    for option, value in (("--memory", "-2"), ("--memory", "nan"), ("--step-seconds", "inf")):
        result = invoke("plan", data, option, value)
        assert result.exit_code == 2 and f"{option} must be a positive" in error_lines(result.output)[0]
    assert not (tmp_path / "r").exists()
    assert json.loads(json.dumps(yaml.safe_load(plan.read_text())))["default"] == "2d"


def test_null_config_keys_leave_the_plan_in_charge(tmp_path: Path) -> None:
    from unetcli.config import flat_keys

    assert flat_keys({"train": {"patch_size": None, "lr": 0.01}, "model": {"features": [8, 16]}}) == {
        "train.lr", "model.features"}
    shipped = Path(__file__).resolve().parents[1] / "configs" / "nifti3d.yaml"
    values = yaml.safe_load(shipped.read_text())
    explicit = flat_keys(values)
    # The shipped 3D config leaves the planned keys to the plan.
    assert not explicit & {"model.features", "model.kernel_sizes", "model.strides", "train.patch_size",
                           "train.batch_size", "data.normalization", "model.encoder"}


def test_shipped_thick_slice_data_gets_nnunets_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net v2.8's planner on the same files (scripts/nnunet_reference.py) gives, in its z, y, x order:
    patch [10, 48, 40], batch 2, features 32-256, kernels [[1,3,3]] * 2 + [[3,3,3]] * 2,
    strides [[1,1,1], [1,2,2], [1,2,2], [2,2,2]]; 2d patch [48, 40], batch 3."""
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plans.yaml"
    thick = Path(unetcli.__file__).parent / "demo_data" / "mni_thick_3d"
    result = invoke("plan", thick, "--memory", "8", "--out", out)
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(out.read_text())["configurations"]
    full = plan["3d_fullres"]["config"]
    assert full["train"] == {"patch_size": [40, 48, 10], "batch_size": 2}
    assert full["model"]["features"] == [32, 64, 128, 256]
    assert full["model"]["kernel_sizes"] == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    assert full["model"]["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert plan["2d"]["config"]["train"] == {"patch_size": [40, 48], "batch_size": 3}


def test_a_cpu_plans_the_same_whatever_its_speed_or_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --memory a CPU plans for nnU-Net's 8 GB reference: a speed probe taken on a busy machine (here
    100x slower) changes only the estimated seconds per step, never the patch or the batch."""
    from unetcli.planning import budget

    thick = Path(unetcli.__file__).parent / "demo_data" / "mni_thick_3d"
    plans, said = {}, {}
    for name, rate in (("idle", 2e11), ("busy", 2e9)):
        monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / name))
        monkeypatch.setattr(budget, "_measure_rate", lambda bf16=False, rate=rate: rate)
        out = tmp_path / f"{name}.yaml"
        result = invoke("plan", thick, "--out", out, "--time", "30m", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert "8 GB (nnU-Net's reference GPU" in result.output and "iterations in 30 min" in result.output
        plans[name] = yaml.safe_load(out.read_text())["configurations"]
        said[name] = " ".join(result.output.split())
    configs = {name: {c: v["config"] for c, v in plan.items()} for name, plan in plans.items()}
    assert configs["idle"] == configs["busy"]  # only the estimates beside them (seconds per step) differ
    # ... and with them what `unet train --time 30m` would train: 100x slower fits too few iterations for the plan
    assert "would not use the plan: thick slices (2 x 2 x 8 mm)" in said["busy"] and "--config 3d_fullres keeps it" in said["busy"]
    assert "would not use the plan" not in said["idle"]
    assert plans["idle"]["3d_fullres"]["config"]["train"] == {"patch_size": [40, 48, 10], "batch_size": 2}  # nnU-Net's


def test_the_cpu_speed_is_read_at_the_training_precision_and_cached_per_precision(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 training runs about twice the fp32 throughput on a BF16 CPU: an fp32 reading made the plan's
    seconds per step (and the iterations a --time budget fits) twice too pessimistic there."""
    from unetcli.planning import budget

    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path))
    (tmp_path / "cpu_rate.json").write_text('{"key": "an older format", "flops_per_second": 1.0}')
    calls: list[bool] = []
    monkeypatch.setattr(budget, "_measure_rate", lambda bf16=False: calls.append(bf16) or (2e11 if bf16 else 1e11))
    assert budget.cpu_convolution_rate() == 1e11 and budget.cpu_convolution_rate(bf16=True) == 2e11
    assert budget.cpu_convolution_rate() == 1e11 and budget.cpu_convolution_rate(bf16=True) == 2e11 and calls == [False, True]
    assert budget.cpu_convolution_rate(remeasure=True, bf16=True) == 2e11 and calls == [False, True, True]
    fast = budget.default_budget(torch.device("cpu"), None, None, 2)
    slow = budget.default_budget(torch.device("cpu"), None, None, 4)
    assert fast.flops_per_second == 2e11 and slow.flops_per_second == 1e11


def test_plans_yaml_has_no_aliases_so_one_edit_changes_one_place(tmp_path: Path) -> None:
    thick = Path(unetcli.__file__).parent / "demo_data" / "mni_thick_3d"
    out = tmp_path / "plans.yaml"
    result = invoke("plan", thick, "--memory", "8", "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "&id" not in text and "*id" not in text
    edited = yaml.safe_load(text)
    edited["configurations"]["3d_fullres"]["config"]["data"]["target_spacing"] = [3.0, 3.0, 8.0]
    assert edited["configurations"]["2d"]["config"]["data"]["target_spacing"] == [2.0, 2.0, 8.0]


@pytest.mark.parametrize("encoder, tolerance", [("plain", 0.0), ("residual", 0.1)])
def test_the_cost_model_describes_the_network_the_model_factory_builds(encoder: str, tolerance: float) -> None:
    """rules.Network re-describes the U-Net for the memory and time estimates: pinned against the real
    network (convolution weights and every convolution's output size for one patch); the residual
    encoder's 1x1 shortcut projections are the part the estimate leaves out."""
    import torch

    from unetcli.models.unet import UNet
    from unetcli.planning.planner import _network

    topo = rules.topology([2.0, 2.0, 8.0], [40, 48, 10])
    net, blocks = _network(topo, 3, 1, 3, encoder)
    model = UNet(3, 1, 3, features=net.features, kernel_sizes=topo.kernel_sizes, strides=topo.strides, encoder=encoder,
                 blocks_per_level=blocks, norm="instance").eval()
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel())) for m in convs]
    with torch.no_grad():
        model(torch.zeros(1, 1, *topo.patch))
    for hook in hooks:
        hook.remove()
    weights = sum(m.weight.numel() for m in convs)
    estimated_outputs = sum(cout * voxels for _, _, cout, voxels in rules._convs(net, topo.patch))
    assert abs(rules.parameter_count(net) - weights) <= tolerance * weights
    assert abs(estimated_outputs - sum(outputs)) <= tolerance * sum(outputs)
