"""Fine-tuning: start a run from a trained model's weights (``train.init`` / ``--init``) and keep
its encoder fixed for the first epochs (``train.freeze_encoder_epochs`` / ``--freeze-encoder``).

The transfer rule, per tensor of the new network (``state_dict`` names):

* **loaded**: the pretrained model has a tensor of the same name and shape;
* **adapted**: the first convolution, when only its number of input channels differs. Each new
  input channel gets the pretrained filters summed over the old input channels and divided by
  the new channel count (their mean, repeated for every new channel and scaled by old / new), so
  an input whose channels all equal ``x`` gives the pretrained network's first-layer response to
  an input whose channels all equal ``x``;
* **re-initialised**: everything else keeps the fresh random initialisation of the new network,
  typically the head when the number of classes differs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unetcli.config import ModelConfig
from unetcli.errors import CheckpointError, ConfigError
from unetcli.inference.exported import is_exported_model
from unetcli.checkpoint import load_checkpoint, resolve_checkpoint

log = logging.getLogger("unetcli")

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Name prefixes that DistributedDataParallel and torch.compile add to a wrapped network's tensors."""
_SHAPE_KEYS = ("spatial_dims", "in_channels", "out_channels")
"""Model settings a fine-tuning run may change; any other difference changes which tensors fit."""


@dataclass
class WeightTransfer:
    """What :func:`transfer_weights` did, by tensor name."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    """Pretrained tensors the new network has no place for."""


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-convolution weight (out, old_in, *kernel) for ``in_channels`` inputs: the filters
    summed over the old inputs, divided by ``in_channels``, for every new input channel."""
    per_channel = weight.sum(dim=1, keepdim=True) / in_channels
    return per_channel.expand(-1, in_channels, *weight.shape[2:]).clone()


def first_conv_weight(model: nn.Module) -> str | None:
    """Name of the weight of the first convolution the input goes through (registration order)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return f"{name}.weight" if name else "weight"
    return None


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for name, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        stripped[name] = tensor
    return stripped


def _adaptable(source: torch.Tensor, target: torch.Tensor) -> bool:
    return source.ndim == target.ndim and source.shape[0] == target.shape[0] and source.shape[2:] == target.shape[2:]


def transfer_weights(model: nn.Module, pretrained: Mapping[str, torch.Tensor]) -> WeightTransfer:
    """Copy the tensors of ``pretrained`` that fit into ``model`` (in place) by the module's rule."""
    pretrained = _strip_wrappers(pretrained)
    own = model.state_dict()
    first = first_conv_weight(model)
    result, new_state = WeightTransfer(), {}
    for name, target in own.items():
        source = pretrained.get(name)
        if source is not None and source.shape == target.shape:
            new_state[name] = source
            result.loaded.append(name)
        elif source is not None and name == first and _adaptable(source, target):
            new_state[name] = adapt_input_channels(source.float(), target.shape[1])
            result.adapted.append(name)
        else:
            result.reinitialised.append(name)
    model.load_state_dict(new_state, strict=False)
    result.unused = [name for name in pretrained if name not in own]
    return result


def load_pretrained(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of a run folder (``best.pt``, else ``last.pt``) or a checkpoint file."""
    source = Path(source)
    if is_exported_model(source):
        raise CheckpointError(f"{source}: --init needs a run folder or checkpoint, not an exported model",
                              hint="exported files hold inference-only (BatchNorm-folded) weights; pass the run folder they came from")
    path = resolve_checkpoint(source, "best")
    return path, load_checkpoint(path)


def architecture_differences(pretrained: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Any]:
    """The pretrained model's value of every model setting (other than dims, channels and classes)
    that differs in ``model_cfg``: such settings keep tensors from fitting."""
    ours = {k: v for k, v in vars(model_cfg).items() if k not in _SHAPE_KEYS}
    return {k: pretrained[k] for k, v in ours.items() if k in pretrained and pretrained[k] != v}


def _check_dimensions(path: Path, state: dict[str, Any], model_cfg: ModelConfig) -> None:
    theirs = (state["config"].get("model") or {}).get("spatial_dims") or state["metadata"].get("spatial_dims")
    if theirs != model_cfg.spatial_dims:
        raise CheckpointError(
            f"{path}: --init holds a {theirs}D network's weights, but this run trains a {model_cfg.spatial_dims}D network",
            hint=f"pass --init a run trained as a {model_cfg.spatial_dims}D network (a 2D-on-3D run is 2D), or train from scratch")


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def initialise_from(model: nn.Module, source: str | Path, model_cfg: ModelConfig) -> WeightTransfer:
    """Load what fits of ``source``'s weights into ``model`` (a freshly built network for
    ``model_cfg``) and log what was loaded, adapted and re-initialised."""
    path, state = load_pretrained(source)
    _check_dimensions(path, state, model_cfg)
    differences = architecture_differences(state["config"].get("model") or {}, model_cfg)
    described = "; ".join(f"model.{k}: {v} there, {getattr(model_cfg, k)} here" for k, v in differences.items())
    result = transfer_weights(model, state["model"])
    own = model.state_dict()
    if not any(own[name].ndim > 1 for name in result.loaded + result.adapted):  # a bias or BatchNorm counter alone does not count
        sets = " ".join(f"--set 'model.{k}={json.dumps(v)}'" for k, v in differences.items())
        raise CheckpointError(f"{path}: none of its weights fits this network" + (f" ({described})" if described else ""),
                              hint=f"build the pretrained run's network: {sets}" if sets else "pass --init a run of the same network")
    log.info("initialised from %s: loaded %d of %d tensors; adapted: %s; re-initialised: %s; not used: %s", path,
             len(result.loaded), len(result.loaded) + len(result.adapted) + len(result.reinitialised),
             _listing(result.adapted), _listing(result.reinitialised), _listing(result.unused))
    if differences:
        log.warning("the network differs from the pretrained one (%s): only tensors of equal shape were loaded", described)
    return result


def encoder_modules(model: nn.Module) -> list[nn.Module]:
    """The encoder of a U-Net: its stem and its down blocks."""
    stem, downs = getattr(model, "stem", None), getattr(model, "downs", None)
    if stem is None or downs is None:
        raise ConfigError(f"train.freeze_encoder_epochs: {type(model).__name__} has no encoder (stem + downs) to freeze",
                          hint="set train.freeze_encoder_epochs=0 for this network")
    return [stem, *downs]


def set_encoder_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (``False``) or release (``True``) the encoder. While frozen its parameters get no
    gradients, so the optimiser neither updates nor decays them, and its BatchNorm layers keep the
    loaded statistics (eval mode). Call it at the start of every epoch: validation puts the whole
    network back in training mode."""
    for module in encoder_modules(model):
        module.train(model.training and trainable)
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)
