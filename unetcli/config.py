"""Typed run configuration: dataclasses loaded from YAML, overridden by CLI flags, saved with runs.

A run's resolved configuration is written to ``RUN/config.yaml`` and stored inside every
checkpoint, so a run can be repeated or resumed from its folder alone. Unknown keys and values
of the wrong type are refused with the key's dotted name and, where one is close, a
did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unetcli.errors import ConfigError


@dataclass
class DataConfig:
    """How a dataset folder is read and turned into network input."""

    num_classes: int | None = None
    """Classes including background; ``None`` infers it from the masks (max label + 1)."""
    label_names: list[str] | None = None
    """Names of the classes in index order; default ``class_0..``; ``dataset.json`` wins when present."""
    val_fraction: float = 0.2
    """Share of cases held out for validation (seeded split, written to ``RUN/split.json``)."""
    split_seed: int | None = None
    """Seed of the train/validation split; ``None`` uses ``train.seed`` (``unet compare`` fixes it across seeds)."""
    normalization: Literal["zscore", "zscore_nonzero", "minmax", "none"] = "zscore"
    """Per image and channel: z-score over all pixels, over the foreground (``data.foreground_mask``), or min-max to [0, 1]."""
    foreground_mask: Literal["robust", "nonzero"] = "robust"
    """What ``zscore_nonzero`` counts as foreground: ``robust`` = above a low threshold on a smoothed copy (the
    same whether the background is exact zeros or noise); ``nonzero`` = every non-zero voxel (nnU-Net's rule,
    and what runs trained before this key existed use)."""
    map_binary_masks: bool = True
    """Treat masks whose values are exactly {0, 255} as binary {0, 1} (logged)."""
    target_spacing: list[float] | None = None
    """3D: voxel spacing (mm) the network works at; ``None`` = nnU-Net's rule (median spacing)."""
    crop_to_nonzero: bool = True
    """3D: crop each volume to the box of its non-zero voxels before training/prediction."""
    slice_axis: int | None = None
    """3D data with a 2D network ("2D-on-3D"): train on slices along this canonical axis (2 = axial)."""
    cache_dir: str | None = None
    """3D: where preprocessed volumes are cached (default ``$UNETCLI_CACHE`` or ``~/.cache/unetcli``)."""


@dataclass
class ModelConfig:
    """The network; see :class:`unetcli.models.unet.UNet` for each argument."""

    name: str = "unet"
    spatial_dims: int | None = None
    """2 or 3; ``None`` takes it from the data."""
    in_channels: int | None = None
    """``None`` takes it from the data."""
    out_channels: int | None = None
    """``None`` uses ``data.num_classes``."""
    features: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    """Channels per resolution level; depth (number of down-samplings) = ``len(features) - 1``."""
    skip: Literal["concat", "add", "none"] = "concat"
    padding: Literal["same", "valid"] = "same"
    upsample: Literal["transpose", "interp"] = "transpose"
    norm: Literal["batch", "instance", "none"] = "batch"
    dropout: float = 0.0
    convs_per_level: int = 2
    kernel_sizes: list[int | list[int]] | None = None
    """Per level, the convolution kernel per axis (odd), e.g. ``[[1,3,3],[3,3,3],[3,3,3],[3,3,3]]`` for
    thick-slice MRI; an int means every axis. ``None``: 3 on every axis."""
    strides: list[int | list[int]] | None = None
    """Per level, the pooling factor per axis; the first level's is all 1, e.g.
    ``[[1,1,1],[1,2,2],[2,2,2],[2,2,2]]``. ``None``: 2 on every axis."""
    encoder: Literal["plain", "residual"] = "plain"
    """``plain``: ``convs_per_level`` convolutions per level. ``residual``: nnU-Net's residual encoder
    (ResEnc U-Net): residual blocks per level, same sizes; needs ``padding: same``."""
    blocks_per_level: list[int] | None = None
    """Residual encoder only: residual blocks per level, e.g. ``[1, 3, 4, 6]``; ``None`` = ResEnc-M's
    ``[1, 3, 4, 6, 6, 6, ...]`` cut to the number of levels."""
    decoder_convs: int | None = None
    """Convolutions per decoder block; ``None`` = ``convs_per_level`` (plain encoder) or 1 (residual)."""


@dataclass
class TrainConfig:
    """The training loop, optimiser, schedule, loss and augmentation."""

    epochs: int | None = 30
    """Epochs to train; ``None`` (only with ``time_limit``): as many as the time allows."""
    iterations_per_epoch: int = 50
    """An epoch is a fixed number of iterations (as in nnU-Net), followed by validation."""
    time_limit: float | None = None
    """Training budget in seconds of wall time (data loading and validation included; ``--time 45m``).
    The learning-rate schedule runs over this time, so short and long budgets both finish their
    decay; the run stops when the next validation would overrun it. With ``epochs`` too, whichever
    ends first."""
    batch_size: int | None = None
    """Patches per step; ``None`` = 8 for 2D, 2 for 3D."""
    patch_size: list[int] | None = None
    """Training crop per spatial axis; ``None``: 2D the largest image, 3D the median case shape within
    a voxel budget, rounded up to what the network takes."""
    foreground_fraction: float = 0.33
    """Share of patches centred on a foreground voxel (nnU-Net's oversampling)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99
    """SGD only (Nesterov)."""
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_iterations: int = 50
    grad_clip: float | None = 12.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    dice_include_background: bool = False
    deep_supervision: bool = True
    """Deep supervision (nnU-Net's): the loss also on 1x1-convolution outputs of the decoder levels between
    full resolution and the lowest, weights 1/2^level normalised, labels down-sampled by nearest neighbour.
    Training only: prediction, validation and export use the full-resolution output. On by default:
    on the robustness benchmark it raised held-out Dice on changed scans from 0.871 to 0.896 at 2,000
    iterations (0.865 to 0.868 at 500) at the same seconds per iteration (docs/benchmarks.md)."""
    flips: bool = True
    rotate90: bool = True
    """Turns by multiples of 90 degrees, only in planes of equal voxel spacing and equal patch size."""
    augmentation: Literal["auto", "scanner", "nnunet", "basic"] = "auto"
    """Preset for the keys below left unset: ``scanner`` = nnU-Net's intensity changes (noise 0.1, blur
    0.2, brightness 0.15, contrast 0.15, low resolution 0.25 (in-plane only for thick slices), inverted gamma
    0.1, gamma 0.3) plus a smooth bias field (0.2), rotation/scaling 0.2 in-plane on thick slices and none
    on other data; ``nnunet`` = nnU-Net's own set (those intensity changes and rotation/scaling 0.2, no bias
    field); ``basic`` = flips, 90-degree turns and ``intensity_jitter`` 0.1 only; ``auto`` = ``scanner`` for 3D, ``basic`` for 2D. Why: held-out Dice
    on scans stored as other scanners store them and on the 3D demo (scripts/bench_robustness.py,
    README "Holding up on other scanners' scans")."""
    intensity_jitter: float | None = None
    """Random scale and shift of intensities, each drawn from U(-j, j)."""
    rotate_scale_prob: float | None = None
    """Probability of a random rotation and scaling (0.7..1.4) per patch, in mm about its centre, resampled
    from the case around it, with nnU-Net's angles: +-30 deg about each axis of isotropic 3D data; thick
    slices (spacing ratio > 3) in-plane only, +-180 deg; 2D +-180 deg (+-15 deg for patches > 1.5x as long as wide).
    The ``scanner`` preset sets 0.2 on thick slices (1 x 1 x 4 mm, 2,000 iterations: clean held-out 0.943 -> 0.948
    with seed 0, 0.957 with seed 1) and 0 elsewhere: on isotropic 2 mm data 0.2 scored 0.02-0.04 more on another person's brain but
    0.004 less on the mean of other-scanner scans (two seeds, docs/benchmarks.md)."""
    elastic_prob: float = 0.0
    """Probability of a smooth random (elastic) deformation per patch (in-plane only for thick slices)."""
    noise_prob: float | None = None
    blur_prob: float | None = None
    brightness_prob: float | None = None
    contrast_prob: float | None = None
    lowres_prob: float | None = None
    inverted_gamma_prob: float | None = None
    gamma_prob: float | None = None
    bias_field_prob: float | None = None
    """Per-patch probabilities of the intensity changes of :class:`unetcli.data.augment.IntensityAugmentation`."""
    num_workers: int | None = None
    """Processes building batches; ``None`` = 0 on machines with <= 2 cores, else min(4, cores // 2)."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 where the CPU/GPU runs it natively, fp16 on older GPUs, else fp32."""
    channels_last: bool | None = None
    """channels_last (2D) / channels_last_3d (3D) memory format for the network, in training and
    prediction; ``None`` = on for CUDA and for CPUs whose kernels use AVX-512 (1.2-1.4x faster
    there), off elsewhere (0.76x on AVX2 kernels: scripts/bench_train.py)."""
    num_threads: int | None = None
    """CPU threads for torch; ``None`` keeps torch's default."""
    checkpoint_interval: int = 0
    """Also save ``checkpoints/last.pt`` every this many iterations (0: only at the end of each epoch)."""
    init: str | None = None
    """Fine-tuning: start from this run folder's (``best.pt``) or checkpoint file's weights. Tensors of
    equal name and shape are loaded, the first convolution is adapted to another input channel count,
    the rest (e.g. the head for other classes) is re-initialised (:mod:`unetcli.training.init_weights`)."""
    freeze_encoder_epochs: int = 0
    """With ``init``: keep the encoder (stem + down blocks) fixed for this many epochs."""
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    """Experiment trackers to log to (``--log-to``): ``RUN/tensorboard/``, MLflow (``MLFLOW_TRACKING_URI`` or
    ``./mlruns``), W&B (``WANDB_MODE``); each needs its extra, e.g. ``pip install 'unetcli[mlflow]'`` (docs/tracking.md)."""
    track_interval: int = 10
    """Trackers get the loss, learning rate and images per second every this many iterations."""
    track_image_epochs: int = 5
    """Trackers get a validation overlay every this many epochs and after the last (0: never)."""

    @property
    def epoch_limit(self) -> int:
        """``epochs``, or a bound no time budget reaches when only the time limits the run."""
        return self.epochs if self.epochs is not None else UNLIMITED_EPOCHS


UNLIMITED_EPOCHS = 10**9
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, option: str = "--time") -> float:
    """Seconds in ``90s``, ``45m``, ``2h``, ``1h30m`` or ``1.5h`` (a unit is required)."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", text.strip().lower())
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smh])", "", text.strip().lower()).strip():
        raise ConfigError(f"{option} '{text}' is not a duration", hint=f"give a number with a unit: {option} 90s, 45m, 2h or 1h30m")
    seconds = sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)
    if not seconds > 0:
        raise ConfigError(f"{option} '{text}' must be longer than 0 seconds", hint=f"e.g. {option} 10m")
    return seconds


@dataclass
class InferConfig:
    """Sliding-window prediction (validation and ``unet predict``)."""

    overlap: float = 0.5
    window_batch_size: int | None = None
    """Windows per forward pass; ``None`` = 4 for 2D, 2 for 3D (on CPU, 3D windows of 64^3 run as
    fast two at a time as four, at 60 % of the peak memory: scripts/bench_infer.py)."""
    gaussian: bool = True
    mirror: bool = False
    """Test-time augmentation: average predictions over flips of every spatial axis. Off by default: on the
    robustness benchmark it gained 0.000-0.003 mean Dice for 7 times the prediction time (docs/benchmarks.md)."""

    def windows_per_batch(self, spatial_dims: int) -> int:
        return self.window_batch_size or (4 if spatial_dims == 2 else 2)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; it is still a float to a user.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"config key '{key}' has value {value!r}, expected {_type_name(tp)}",
        hint=f"set a valid value, e.g. --set {key}=...",
    )


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(options)}"


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'", hint=_did_you_mean(key, names))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{dotted}' must be a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any] | None) -> RunConfig:
    """Build a validated :class:`RunConfig`; missing keys keep their defaults."""
    cfg = _build(RunConfig, values or {}, "")
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: what`` on one line (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{where}: {' '.join(str(problem).split())}"


def config_file_values(path: Path) -> dict[str, Any]:
    """The raw mapping in a YAML config file (safe loader), unvalidated: :func:`load_config` checks it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})", hint="pass a YAML config file") from exc
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML{yaml_problem(exc)}") from exc
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train, infer)")
    if isinstance(values, dict) and "configurations" in values and "unetcli_plan" in values:
        raise ConfigError(f"{path} is a plan, not a config", hint=f"pass it with --plan {path} (and --config 2d|3d_fullres|3d_lowres)")
    return values or {}


def load_config(path: Path | None) -> RunConfig:
    """Read a YAML config (safe loader). ``None`` gives the defaults."""
    if path is None:
        return config_from_dict({})
    values = config_file_values(path)
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", exc.hint) from exc


def parse_set_option(item: str) -> tuple[str, Any]:
    """Parse one ``section.key=value`` flag; the value is read as YAML (``[16, 32]``, ``true``, ``1e-3``)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' is not of the form section.key=value", hint="e.g. --set train.lr=1e-3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with dotted keys replaced; ``None`` values leave the key as it is."""
    values = config_to_dict(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = dotted.split(".")
        node = values
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                options = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"unknown config section '{'.'.join(parts[: depth + 1])}'", _did_you_mean(part, options))
            node = node[part]
        if len(parts) < 2 or parts[-1] not in node:
            raise ConfigError(f"unknown config key '{dotted}'", _did_you_mean(parts[-1], list(node)))
        node[parts[-1]] = value
    return config_from_dict(values)


def _check_finite(section: Any, prefix: str) -> None:
    """NaN or infinity in any float option (``--lr nan``) is refused by name, never passed to torch."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"config key '{prefix}.{f.name}' must be a finite number, got {value}",
                              hint=f"set a real number, e.g. --set {prefix}.{f.name}=...")


def _check_budget(t: TrainConfig) -> None:
    if t.epochs is None and t.time_limit is None:
        raise ConfigError("config key 'train.epochs' is empty and no time budget is set: the run would never end",
                          hint="set train.epochs (e.g. --epochs 30) or a time budget (--time 45m / train.time_limit in seconds)")
    if t.time_limit is not None and not t.time_limit > 0:
        raise ConfigError(f"config key 'train.time_limit' must be a positive number of seconds, got {t.time_limit}",
                          hint="e.g. --time 45m or --set train.time_limit=2700")
    if t.track_image_epochs < 0:
        raise ConfigError(f"config key 'train.track_image_epochs' must be 0 or more, got {t.track_image_epochs}")


def validate_config(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    for name in ("data", "model", "train", "infer"):
        _check_finite(getattr(cfg, name), name)
    t, m, d = cfg.train, cfg.model, cfg.data
    _check_budget(t)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device.strip().lower()):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda, cuda:N or mps, got '{t.device}'",
                          hint="e.g. --device cuda:1")
    positive = {
        "train.epochs": t.epoch_limit,
        "train.iterations_per_epoch": t.iterations_per_epoch,
        "train.track_interval": t.track_interval,
        "model.convs_per_level": m.convs_per_level,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {value}")
    for key, value in {"train.batch_size": t.batch_size, "infer.window_batch_size": cfg.infer.window_batch_size}.items():
        if value is not None and value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {value}")
    for key in ["foreground_fraction"] + [f.name for f in dataclasses.fields(t) if f.name.endswith("_prob")]:
        if getattr(t, key) is not None and not 0.0 <= getattr(t, key) <= 1.0:
            raise ConfigError(f"config key 'train.{key}' must be in [0, 1], got {getattr(t, key)}")
    if t.freeze_encoder_epochs < 0:
        raise ConfigError(f"config key 'train.freeze_encoder_epochs' must be 0 or more, got {t.freeze_encoder_epochs}")
    if t.freeze_encoder_epochs and not t.init:
        raise ConfigError("train.freeze_encoder_epochs needs train.init: a randomly initialised encoder would stay random",
                          hint="pass --init RUN with --freeze-encoder, or leave --freeze-encoder out")
    if t.checkpoint_interval < 0:
        raise ConfigError(f"config key 'train.checkpoint_interval' must be 0 or more, got {t.checkpoint_interval}")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be positive, got {t.lr}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in [0, 1), got {d.val_fraction}")
    if not 0.0 <= cfg.infer.overlap < 1.0:
        raise ConfigError(f"config key 'infer.overlap' must be in [0, 1), got {cfg.infer.overlap}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {m.dropout}")
    if m.spatial_dims not in (None, 2, 3):
        raise ConfigError(f"config key 'model.spatial_dims' must be 2 or 3, got {m.spatial_dims}")
    if len(m.features) < 2 or any(f < 1 for f in m.features):
        raise ConfigError(
            f"config key 'model.features' must list at least 2 positive channel counts, got {m.features}",
            hint="e.g. --set model.features=[32,64,128,256]",
        )
    if m.blocks_per_level is not None and (not m.blocks_per_level or any(b < 1 for b in m.blocks_per_level)):
        raise ConfigError(f"config key 'model.blocks_per_level' must list block counts of at least 1, got {m.blocks_per_level}",
                          hint="e.g. --set model.blocks_per_level=[1,3,4,6] (one per level of model.features)")
    if m.encoder == "residual" and m.blocks_per_level is not None and len(m.blocks_per_level) != len(m.features):
        raise ConfigError(f"config key 'model.blocks_per_level' lists {len(m.blocks_per_level)} levels but model.features has "
                          f"{len(m.features)}", hint="give one residual block count per level of model.features")
    if m.encoder == "residual" and m.padding != "same":
        raise ConfigError("model.encoder=residual needs model.padding=same", hint="set model.padding=same, or model.encoder=plain")
    if m.decoder_convs is not None and m.decoder_convs < 1:
        raise ConfigError(f"config key 'model.decoder_convs' must be at least 1, got {m.decoder_convs}")
    if d.num_classes is not None and d.num_classes < 2:
        raise ConfigError(f"config key 'data.num_classes' must be at least 2, got {d.num_classes}")
    if t.patch_size is not None and any(p < 1 for p in t.patch_size):
        raise ConfigError(f"config key 'train.patch_size' must be positive, got {t.patch_size}")


def dump_config(cfg: RunConfig) -> str:
    return dump_yaml(config_to_dict(cfg))


class _PlainDumper(yaml.SafeDumper):
    """Writes every value in full: no ``&id001`` anchors and ``*id001`` aliases, which would make
    one hand edit (say of a shared ``target_spacing`` list) change several places at once."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(values: Any, flow_lists: bool = False) -> str:
    """YAML meant to be read and edited by people (configs, plans): keys in order, no aliases;
    ``flow_lists`` writes innermost lists on one line (``[2, 2, 8]``)."""
    return yaml.dump(values, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None if flow_lists else False,
                     width=120, allow_unicode=True)


def flat_keys(values: dict[str, Any] | None, prefix: str = "") -> set[str]:
    """Dotted keys of a nested mapping: ``{"train": {"lr": 1}}`` -> ``{"train.lr"}``. A key set to
    null is left out: null means "the default", which the plan may fill."""
    keys: set[str] = set()
    for key, value in (values or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{dotted}.")
        elif value is not None:
            keys.add(dotted)
    return keys


@dataclass
class ConfigSources:
    """Where a run's configuration comes from, weakest first: ``defaults`` (a command's own, e.g. the
    demo's; dropped when a config file is given) < the ``config`` YAML file < ``sets`` (``--set
    key=value``) < ``flags`` (explicit options; ``None`` = not given)."""

    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] | None = None

    def resolve(self) -> RunConfig:
        cfg = load_config(self.config)
        if self.defaults and self.config is None:
            cfg = apply_overrides(cfg, self.defaults)
        overrides = dict(parse_set_option(item) for item in self.sets)
        overrides.update({k: v for k, v in self.flags.items() if v is not None})  # explicit flags win over --set
        cfg = apply_overrides(cfg, overrides)
        explicit = self.explicit_keys()
        if "train.time_limit" in explicit and "train.epochs" not in explicit:
            cfg.train.epochs = None  # your time budget alone: as many epochs as fit (not a command's default epochs)
        return cfg

    def explicit_keys(self) -> set[str]:
        """The config keys the user gave (config file, --set, flags): a plan never replaces them."""
        keys = flat_keys(config_file_values(self.config)) if self.config is not None else set()
        keys |= {parse_set_option(item)[0] for item in self.sets}
        return keys | {k for k, v in self.flags.items() if v is not None}
