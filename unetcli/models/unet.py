"""One U-Net for 2D and 3D with configurable skips, padding, upsampling and normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from unetcli.errors import ModelError
from unetcli.models.blocks import ConvBlock, Down, Norm, SkipMode, Up, conv_nd


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) for ``spatial_dims`` 2 or 3.

    Args:
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).
        in_channels: input channels (modalities / colour channels).
        out_channels: classes including background; the network returns logits.
        features: channels per resolution level, e.g. ``(32, 64, 128, 256)``: 4 levels,
            3 down-samplings by 2.
        skip: how encoder features reach the decoder: ``concat`` (original), ``add``
            (1x1 projection where channel counts differ) or ``none``.
        padding: ``same`` keeps sizes (input axes must be multiples of ``2**depth``);
            ``valid`` is the paper's unpadded convolutions with centre-cropped ("copy and
            crop") skips: the output is smaller than the input by :attr:`margin` per side.
        upsample: ``transpose`` (learned) or ``interp`` (interpolation, no parameters).
        norm: ``batch``, ``instance`` or ``none``.
        dropout: dropout probability after each convolution block (0 disables it).
        convs_per_level: 3^d convolutions per block.

    Shape:
        (N, in_channels, *S) -> (N, out_channels, *S) with ``same`` padding;
        (N, in_channels, *S) -> (N, out_channels, *[s - 2 * margin for s in S]) with ``valid``.

    Example:
        >>> net = UNet(2, 1, 3, features=(16, 32, 64))
        >>> net(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (32, 64, 128, 256),
        skip: SkipMode = "concat",
        padding: Literal["same", "valid"] = "same",
        upsample: Literal["transpose", "interp"] = "transpose",
        norm: Norm = "batch",
        dropout: float = 0.0,
        convs_per_level: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(features) < 2:
            raise ModelError(f"features must list at least 2 levels, got {list(features)}")
        self.spatial_dims = spatial_dims
        self.padding = padding
        self.convs_per_level = convs_per_level
        self.depth = len(features) - 1
        block = dict(convs=convs_per_level, norm=norm, padding=padding, dropout=dropout)
        self.stem = ConvBlock(spatial_dims, in_channels, features[0], **block)
        self.downs = nn.ModuleList(
            Down(spatial_dims, features[i], features[i + 1], **block) for i in range(self.depth)
        )
        self.ups = nn.ModuleList(
            Up(spatial_dims, features[i + 1], features[i], features[i], skip=skip, upsample=upsample, **block)
            for i in reversed(range(self.depth))
        )
        self.head = conv_nd(spatial_dims)(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(tuple(x.shape[2:]))
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)

    # ------------------------------------------------------------------ size contract

    @property
    def size_multiple(self) -> int:
        """Each spatial axis of a ``same``-padded input must be a multiple of this."""
        return 2**self.depth

    def _valid_output_size(self, size: int) -> int | None:
        """Output length of one axis with valid padding, or None if the axis cannot be taken."""
        shrink = 2 * self.convs_per_level
        s = size - shrink
        for _ in range(self.depth):
            if s <= 0 or s % 2:
                return None
            s = s // 2 - shrink
        for _ in range(self.depth):
            if s <= 0:
                return None
            s = s * 2 - shrink
        return s if s > 0 else None

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape (raises :class:`ModelError` if invalid)."""
        self.check_input_shape(tuple(input_shape))
        if self.padding == "same":
            return tuple(input_shape)
        return tuple(self._valid_output_size(s) for s in input_shape)  # type: ignore[misc]

    @property
    def margin(self) -> int:
        """Voxels lost per side and axis with valid padding (0 with same padding)."""
        if self.padding == "same":
            return 0
        size = self.valid_input_size(1)
        return (size - self._valid_output_size(size)) // 2  # type: ignore[operator]

    def valid_input_size(self, min_size: int) -> int:
        """The smallest axis length >= ``min_size`` that the network takes."""
        if self.padding == "same":
            return int(math.ceil(min_size / self.size_multiple) * self.size_multiple)
        size = max(min_size, 1)
        while self._valid_output_size(size) is None:
            size += 1
        return size

    def input_size_for_output(self, out_size: int) -> int:
        """Smallest valid input length whose output covers ``out_size`` voxels."""
        return self.valid_input_size(out_size + 2 * self.margin)

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != self.spatial_dims:
            raise ModelError(
                f"the {self.spatial_dims}D network got an input with {len(shape)} spatial axes {shape}",
                hint=f"give {self.spatial_dims}D inputs to this model",
            )
        if self.padding == "same":
            bad = [s for s in shape if s % self.size_multiple]
            if bad:
                fixed = tuple(self.valid_input_size(s) for s in shape)
                raise ModelError(
                    f"input size {shape} is not a multiple of {self.size_multiple} on every axis "
                    f"(the network halves each axis {self.depth} times)",
                    hint=f"pad or crop to a multiple of {self.size_multiple}, e.g. {fixed}",
                )
        else:
            bad = [s for s in shape if self._valid_output_size(s) is None]
            if bad:
                fixed = tuple(self.valid_input_size(s) for s in shape)
                raise ModelError(
                    f"input size {shape} cannot go through this valid-padding U-Net: every level needs "
                    f"an even size after its convolutions",
                    hint=f"use sizes of the form {self.valid_input_size(1)} + {self.size_multiple}*k, e.g. {fixed}",
                )
