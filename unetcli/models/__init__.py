"""Model factory: ``build_model(cfg)`` looks the network up by name in :data:`MODELS`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from unetcli.config import ModelConfig
from unetcli.errors import ConfigError
from unetcli.models.unet import UNet


def _build_unet(cfg: ModelConfig) -> nn.Module:
    return UNet(
        spatial_dims=cfg.spatial_dims,  # type: ignore[arg-type]
        in_channels=cfg.in_channels,  # type: ignore[arg-type]
        out_channels=cfg.out_channels,  # type: ignore[arg-type]
        features=cfg.features,
        skip=cfg.skip,
        padding=cfg.padding,
        upsample=cfg.upsample,
        norm=cfg.norm,
        dropout=cfg.dropout,
        convs_per_level=cfg.convs_per_level,
    )


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {"unet": _build_unet}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network named by ``cfg.name``; spatial dims and channel counts must be resolved."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.name}'", hint=f"choose one of: {', '.join(MODELS)}")
    missing = [k for k in ("spatial_dims", "in_channels", "out_channels") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"model config needs {', '.join('model.' + k for k in missing)} before building")
    return MODELS[cfg.name](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "UNet", "build_model", "count_parameters"]
