"""Tests for unetcli.config: defaults, YAML loading, validation messages, overrides, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unetcli.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_set_option,
)
from unetcli.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig()
    assert cfg.train.epochs == 30 and cfg.model.features == [32, 64, 128, 256]
    assert cfg.model.skip == "concat" and cfg.data.normalization == "zscore"


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == RunConfig()


def test_yaml_values_are_applied(tmp_path):
    path = write_yaml(tmp_path, "train:\n  epochs: 3\n  lr: 0.01\nmodel:\n  features: [8, 16]\n  skip: add\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.model.features == [8, 16] and cfg.model.skip == "add"
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched keys keep defaults


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write_yaml(tmp_path, "train: {epocs: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "train.epocs" in text
    assert "did you mean 'epochs'" in text
    assert str(path) in text


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(write_yaml(tmp_path, "trian: {epochs: 3}\n"))


def test_wrong_type_names_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs") as info:
        load_config(write_yaml(tmp_path, 'train: {epochs: "ten"}\n'))
    assert "'ten'" in str(info.value)


@pytest.mark.parametrize(
    "values,key",
    [
        ({"train": {"epochs": True}}, "train.epochs"),  # bools are not ints
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"model": {"skip": "concatenate"}}, "model.skip"),
        ({"model": {"features": [8, "x"]}}, "model.features[1]"),
        ({"train": "fast"}, "train"),
    ],
)
def test_wrong_types_are_refused(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(values)


@pytest.mark.parametrize(
    "values,key",
    [
        ({"train": {"epochs": -1}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
        ({"infer": {"overlap": -0.1}}, "infer.overlap"),
        ({"model": {"features": [16]}}, "model.features"),
        ({"model": {"spatial_dims": 4}}, "model.spatial_dims"),
        ({"data": {"num_classes": 1}}, "data.num_classes"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"grad_clip": float("inf")}}, "train.grad_clip"),
        ({"data": {"target_spacing": [1.0, float("nan"), 1.0]}}, "data.target_spacing"),
        ({"infer": {"overlap": "nan"}}, "infer.overlap"),
    ],
)
def test_out_of_range_values_are_refused(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(values)


def test_int_accepted_for_float_and_optional():
    cfg = config_from_dict({"train": {"lr": 1, "grad_clip": None}, "data": {"num_classes": 3}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip is None and cfg.data.num_classes == 3


def test_parse_set_option_reads_yaml_values():
    assert parse_set_option("model.features=[8,16]") == ("model.features", [8, 16])
    assert parse_set_option("train.flips=false") == ("train.flips", False)
    assert parse_set_option(" train.epochs = 7") == ("train.epochs", 7)
    assert parse_set_option("data.label_names=[bg, a=b]") == ("data.label_names", ["bg", "a=b"])
    assert parse_set_option("train.patch_size=") == ("train.patch_size", None)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set_option("train.epochs")


def test_apply_overrides_dotted_keys():
    base = RunConfig()
    cfg = apply_overrides(base, dict([parse_set_option("model.features=[8,16]"), ("train.epochs", 2)]))
    assert cfg.model.features == [8, 16]
    assert cfg.train.epochs == 2
    assert base.model.features == [32, 64, 128, 256] and base.train.epochs == 30  # input not mutated


def test_apply_overrides_none_leaves_key_alone():
    base = apply_overrides(RunConfig(), {"train.epochs": 5})
    cfg = apply_overrides(base, {"train.epochs": None, "model.features": None})
    assert cfg.train.epochs == 5 and cfg.model.features == base.model.features


def test_apply_overrides_unknown_section_and_key():
    with pytest.raises(ConfigError, match="unknown config section 'trian'") as info:
        apply_overrides(RunConfig(), {"trian.epochs": 3})
    assert "train" in info.value.hint
    with pytest.raises(ConfigError, match="unknown config key 'train.epocs'") as info:
        apply_overrides(RunConfig(), {"train.epocs": 3})
    assert "epochs" in info.value.hint
    with pytest.raises(ConfigError):
        apply_overrides(RunConfig(), {"epochs": 3})


def test_apply_overrides_validates_types_and_values():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        apply_overrides(RunConfig(), {"train.epochs": "ten"})
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        apply_overrides(RunConfig(), {"train.epochs": -3})


def test_scientific_notation_lr_from_set_flag():
    cfg = apply_overrides(RunConfig(), dict([parse_set_option("train.lr=1e-3")]))
    assert cfg.train.lr == pytest.approx(1e-3)


def test_scientific_notation_lr_in_yaml(tmp_path):
    assert load_config(write_yaml(tmp_path, "train: {lr: 1e-4}\n")).train.lr == pytest.approx(1e-4)


def test_dump_config_round_trips(tmp_path):
    cfg = apply_overrides(
        RunConfig(),
        {
            "model.features": [8, 16, 32],
            "model.padding": "valid",
            "train.patch_size": [64, 48],
            "train.grad_clip": None,
            "data.label_names": ["bg", "fg"],
            "data.num_classes": 2,
            "infer.mirror": True,
        },
    )
    text = dump_config(cfg)
    assert yaml.safe_load(text) == config_to_dict(cfg)
    path = write_yaml(tmp_path, text)
    again = load_config(path)
    assert again == cfg
    assert again.train.patch_size == [64, 48] and again.model.padding == "valid"


def test_non_mapping_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(write_yaml(tmp_path, "- 1\n- 2\n"))
    assert "cfg.yaml" in str(info.value)


def test_invalid_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(write_yaml(tmp_path, "train: {epochs: 3\nmodel: [\n"))
    assert "cfg.yaml" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_config(write_yaml(tmp_path, "model: 3\n"))


def test_shipped_png2d_config_loads():
    path = REPO_ROOT / "configs" / "png2d.yaml"
    if not path.exists():
        pytest.skip("configs/png2d.yaml not in the repository")
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.spatial_dims in (None, 2)


@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--lr", "inf"], ["--set", "train.weight_decay=.nan"]])
def test_non_finite_float_options_are_clear_errors(flag, tmp_path):
    from helpers import error_lines, invoke, make_blobs

    result = invoke("train", make_blobs(tmp_path / "d", n=2), "--out", tmp_path / "run", *flag)
    assert result.exit_code == 2 and "internal error" not in result.output
    assert "must be a finite number" in error_lines(result.output)[0]
    assert not (tmp_path / "run").exists()
