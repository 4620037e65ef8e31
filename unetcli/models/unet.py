"""One U-Net for 2D and 3D with configurable skips, padding, upsampling, normalisation, per-axis
kernel sizes and strides, and a plain or residual (nnU-Net ResEnc-style) encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from unetcli.errors import ModelError
from unetcli.models.blocks import ConvBlock, Down, Norm, ResidualDown, SkipMode, Up, conv_nd, residual_blocks
from unetcli.models.network import SegmentationNetwork, Size, per_axis


def resolve_topology(spatial_dims: int, levels: int, kernel_sizes: Sequence[int | Sequence[int]] | None = None,
                     strides: Sequence[int | Sequence[int]] | None = None) -> tuple[list[Size], list[Size]]:
    """Per-level, per-axis kernel sizes and strides; ``None`` gives 3 and 2 on every axis.

    Level 0 is the full-resolution stem, so its stride must be 1; level ``i > 0`` pools by
    ``strides[i]``. An int stands for the same value on every axis.
    """
    kernels_in = kernel_sizes if kernel_sizes is not None else [3] * levels
    strides_in = strides if strides is not None else [1] + [2] * (levels - 1)
    for name, given in (("kernel_sizes", kernels_in), ("strides", strides_in)):
        if len(given) != levels:
            raise ModelError(f"model.{name} lists {len(given)} levels but model.features has {levels}",
                             hint=f"give one entry per level, e.g. model.{name}=[[...], ...] with {levels} entries")
    try:
        kernels = [per_axis(k, spatial_dims) for k in kernels_in]
        steps = [per_axis(s, spatial_dims) for s in strides_in]
    except (ValueError, TypeError) as exc:
        raise ModelError(f"model.kernel_sizes / model.strides: {exc}",
                         hint=f"give {spatial_dims} numbers per level, e.g. {[3] * spatial_dims}") from exc
    if any(k < 1 or k % 2 == 0 for level in kernels for k in level):
        raise ModelError(f"model.kernel_sizes must be odd and positive, got {[list(k) for k in kernels]}",
                         hint="use 1 or 3 (or 5, ...) per axis; an even kernel has no centre")
    if any(s < 1 for level in steps for s in level):
        raise ModelError(f"model.strides must be at least 1, got {[list(s) for s in steps]}")
    if any(s != 1 for s in steps[0]):
        raise ModelError(f"model.strides[0] must be all 1 (the first level keeps the input resolution), got {list(steps[0])}",
                         hint=f"e.g. model.strides=[{[1] * spatial_dims}, {[2] * spatial_dims}, ...]")
    return kernels, steps


Encoder = Literal["plain", "residual"]
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6)
"""Residual blocks per encoder level of nnU-Net's ResEnc-M/L/XL presets; deeper levels get 6 as well."""


def resolve_blocks(levels: int, blocks_per_level: Sequence[int] | None) -> list[int]:
    """Residual blocks per encoder level; ``None`` gives :data:`RESENC_M_BLOCKS`, truncated (or extended by 6)."""
    if blocks_per_level is None:
        return [RESENC_M_BLOCKS[min(i, len(RESENC_M_BLOCKS) - 1)] for i in range(levels)]
    blocks = [int(b) for b in blocks_per_level]
    if len(blocks) != levels:
        raise ModelError(f"model.blocks_per_level lists {len(blocks)} levels but model.features has {levels}",
                         hint=f"give one block count per level, e.g. {resolve_blocks(levels, None)}")
    if any(b < 1 for b in blocks):
        raise ModelError(f"model.blocks_per_level must be at least 1 on every level, got {blocks}")
    return blocks


class UNet(SegmentationNetwork):
    """U-Net (Ronneberger et al., 2015) for ``spatial_dims`` 2 or 3.

    Args:
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).
        in_channels: input channels (modalities / colour channels).
        out_channels: classes including background; the network returns logits.
        features: channels per resolution level, e.g. ``(32, 64, 128, 256)``: 4 levels,
            3 down-samplings.
        skip: how encoder features reach the decoder: ``concat`` (original), ``add``
            (1x1 projection where channel counts differ) or ``none``.
        padding: ``same`` keeps sizes (input axes must be multiples of :attr:`size_multiple`);
            ``valid`` is the paper's unpadded convolutions with centre-cropped ("copy and
            crop") skips: the output is smaller than the input by :attr:`margin` per side.
        upsample: ``transpose`` (learned) or ``interp`` (interpolation, no parameters).
        norm: ``batch``, ``instance`` or ``none``.
        dropout: dropout probability after each convolution block (0 disables it).
        convs_per_level: convolutions per block of the plain encoder (and, by default, of the decoder).
        kernel_sizes: per level, the convolution kernel per axis (odd), e.g.
            ``[[1, 3, 3], [3, 3, 3], ...]`` for thick-slice MRI; ``None`` = 3 everywhere. The
            decoder block of a level uses that level's kernel.
        strides: per level, the pooling factor per axis; ``strides[0]`` must be all 1, e.g.
            ``[[1, 1, 1], [1, 2, 2], [2, 2, 2], ...]``; ``None`` = 2 on every axis.
        encoder: ``plain`` (a :class:`ConvBlock` per level) or ``residual``, nnU-Net's residual
            encoder (ResEnc U-Net, Isensee et al., 2024): the stem is conv -> norm -> LeakyReLU then
            ``blocks_per_level[0]`` :class:`ResidualBlock` s; each deeper level max-pools as the plain
            encoder does (same sizes) then runs ``blocks_per_level[i]`` residual blocks. Needs ``same`` padding.
        blocks_per_level: residual encoder only: residual blocks per level; ``None`` = ResEnc-M's
            ``(1, 3, 4, 6, 6, 6, ...)`` truncated to the number of levels. Ignored by the plain encoder.
        decoder_convs: convolutions per decoder block; ``None`` = ``convs_per_level`` with the plain
            encoder, 1 with the residual one (as in nnU-Net's ResEnc presets).
        deep_supervision: training-only 1x1 heads on the decoder levels between the full-resolution one
            and the lowest (whose nnU-Net loss weight is 0): in training mode the network then returns
            ``[full, level 1, level 2, ...]`` logits (level ``i`` pooled by :meth:`level_strides` ``[i]``);
            in eval mode, and always without them, only the full-resolution logits. A network built
            without heads loads a state dict that has them (prediction and export ignore them).

    Shape:
        (N, in_channels, *S) -> (N, out_channels, *S) with ``same`` padding;
        (N, in_channels, *S) -> (N, out_channels, *[s - 2 * m for s, m in zip(S, margin)]) with ``valid``.
        With ``deep_supervision`` in training mode: a list of such logits, full resolution first.

    Example:
        >>> net = UNet(2, 1, 3, features=(16, 32, 64))
        >>> net(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
        >>> thick = UNet(3, 1, 2, features=(8, 16, 32), kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        ...              strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]])
        >>> thick.size_multiple
        (2, 4, 4)
        >>> resenc = UNet(2, 1, 3, features=(16, 32, 64), encoder="residual", blocks_per_level=(1, 2, 2))
        >>> resenc(torch.zeros(1, 1, 64, 64)).shape
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
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        encoder: Encoder = "plain",
        blocks_per_level: Sequence[int] | None = None,
        decoder_convs: int | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(features) < 2:
            raise ModelError(f"features must list at least 2 levels, got {list(features)}")
        if encoder not in ("plain", "residual"):
            raise ModelError(f"model.encoder must be 'plain' or 'residual', got {encoder!r}")
        if encoder == "residual" and padding != "same":
            raise ModelError("model.encoder=residual needs model.padding=same (a residual block adds its input to its "
                             "output, so both must keep the same size)",
                             hint="set model.padding=same, or model.encoder=plain for valid padding")
        if decoder_convs is not None and decoder_convs < 1:
            raise ModelError(f"model.decoder_convs must be at least 1, got {decoder_convs}")
        self.spatial_dims = spatial_dims
        self.padding = padding
        self.encoder = encoder
        self.convs_per_level = convs_per_level
        self.decoder_convs = decoder_convs if decoder_convs is not None else (convs_per_level if encoder == "plain" else 1)
        self.depth = len(features) - 1
        self.kernel_sizes, self.strides = resolve_topology(spatial_dims, len(features), kernel_sizes, strides)
        self.blocks_per_level = resolve_blocks(len(features), blocks_per_level) if encoder == "residual" else None
        if self.blocks_per_level is None:
            self._plain_encoder(in_channels, features, dict(convs=convs_per_level, norm=norm, padding=padding, dropout=dropout))
        else:
            self._residual_encoder(in_channels, features, self.blocks_per_level, norm, dropout)
        k, st = self.kernel_sizes, self.strides
        decoder = dict(convs=self.decoder_convs, norm=norm, padding=padding, dropout=dropout)
        self.ups = nn.ModuleList(
            Up(spatial_dims, features[i + 1], features[i], features[i], skip=skip, upsample=upsample,
               stride=st[i + 1], kernel_size=k[i], **decoder)
            for i in reversed(range(self.depth))
        )
        self.head = conv_nd(spatial_dims)(features[0], out_channels, kernel_size=1)
        self.deep_supervision = deep_supervision
        # Heads for decoder levels 1 .. depth-2 only: nnU-Net gives the lowest decoder level weight 0.
        self.ds_heads = nn.ModuleList(
            conv_nd(spatial_dims)(features[level], out_channels, kernel_size=1) for level in range(1, self.depth - 1)
        ) if deep_supervision else None
        self._register_load_state_dict_pre_hook(self._drop_unused_heads)

    def _drop_unused_heads(self, state: dict, prefix: str, *args: object) -> None:
        """Deep-supervision heads only help training: a network built without them (prediction,
        export) loads a checkpoint that has them by leaving them out."""
        if self.ds_heads is None:
            for key in [k for k in state if k.startswith(prefix + "ds_heads.")]:
                del state[key]

    def level_strides(self) -> list[Size]:
        """Per output of a deep-supervised forward pass, how much it is pooled per axis relative
        to the full-resolution output (level 0: all 1)."""
        out, total = [], [1] * self.spatial_dims
        for level in range(1 + (len(self.ds_heads) if self.ds_heads is not None else 0)):
            if level:
                total = [t * s for t, s in zip(total, self.strides[level])]
            out.append(tuple(total))
        return out

    def _plain_encoder(self, in_channels: int, features: Sequence[int], block: dict) -> None:
        k, st, dims = self.kernel_sizes, self.strides, self.spatial_dims
        self.stem: nn.Module = ConvBlock(dims, in_channels, features[0], kernel_size=k[0], **block)
        self.downs = nn.ModuleList(
            Down(dims, features[i], features[i + 1], stride=st[i + 1], kernel_size=k[i + 1], **block) for i in range(self.depth)
        )

    def _residual_encoder(self, in_channels: int, features: Sequence[int], blocks: list[int], norm: Norm, dropout: float) -> None:
        k, st, dims = self.kernel_sizes, self.strides, self.spatial_dims
        self.stem = nn.Sequential(
            ConvBlock(dims, in_channels, features[0], convs=1, norm=norm, kernel_size=k[0]),
            *residual_blocks(dims, features[0], features[0], blocks[0], norm=norm, kernel_size=k[0], dropout=dropout),
        )
        self.downs = nn.ModuleList(
            ResidualDown(dims, features[i], features[i + 1], stride=st[i + 1], blocks=blocks[i + 1], norm=norm,
                         kernel_size=k[i + 1], dropout=dropout)
            for i in range(self.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input_shape(tuple(x.shape[2:]))
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        supervised = self.training and self.ds_heads is not None
        deep = []
        for up in self.ups:
            x = up(x, skips.pop())
            level = len(skips)  # the resolution level this decoder block has reached
            if supervised and 1 <= level <= len(self.ds_heads):  # type: ignore[arg-type]
                deep.append(self.ds_heads[level - 1](x))  # type: ignore[index]
        out = self.head(x)
        return [out, *reversed(deep)] if supervised else out

    # ------------------------------------------------------------------ size contract (per axis)

    @property
    def size_multiple(self) -> Size:
        """Each axis of a ``same``-padded input must be a multiple of the product of its strides."""
        multiple = [1] * self.spatial_dims
        for level in self.strides:
            multiple = [m * s for m, s in zip(multiple, level)]
        return tuple(multiple)

    def _valid_output_size(self, size: int, axis: int) -> int | None:
        """Output length of one axis with valid padding, or None if the axis cannot be taken.

        Each convolution loses ``k - 1`` voxels; each pooling needs a length divisible by its stride.
        (Only the plain encoder takes valid padding: ``convs_per_level`` convolutions per encoder
        block, ``decoder_convs`` per decoder block.)
        """
        def shrink(level: int, convs: int) -> int:
            return convs * (self.kernel_sizes[level][axis] - 1)

        s = size - shrink(0, self.convs_per_level)
        for level in range(1, self.depth + 1):
            step = self.strides[level][axis]
            if s <= 0 or s % step:
                return None
            s = s // step - shrink(level, self.convs_per_level)
        for level in reversed(range(self.depth)):
            if s <= 0:
                return None
            s = s * self.strides[level + 1][axis] - shrink(level, self.decoder_convs)
        return s if s > 0 else None

    def output_shape(self, input_shape: Sequence[int]) -> Size:
        self.check_input_shape(tuple(input_shape))
        if self.padding == "same":
            return tuple(input_shape)
        return tuple(self._valid_output_size(s, a) for a, s in enumerate(input_shape))  # type: ignore[misc]

    @property
    def margin(self) -> Size:
        if self.padding == "same":
            return (0,) * self.spatial_dims
        sizes = self.valid_input_size(1)
        return tuple((s - self._valid_output_size(s, a)) // 2 for a, s in enumerate(sizes))  # type: ignore[operator]

    def valid_input_size(self, min_size: int | Sequence[int]) -> Size:
        wanted = per_axis(min_size, self.spatial_dims)
        if self.padding == "same":
            return tuple(-(-max(w, 1) // m) * m for w, m in zip(wanted, self.size_multiple))
        sizes = []
        for axis, w in enumerate(wanted):
            size = max(w, 1)
            while self._valid_output_size(size, axis) is None:
                size += 1
            sizes.append(size)
        return tuple(sizes)

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != self.spatial_dims:
            raise ModelError(
                f"the {self.spatial_dims}D network got an input with {len(shape)} spatial axes {shape}",
                hint=f"give {self.spatial_dims}D inputs to this model",
            )
        fixed = self.valid_input_size(shape)
        if tuple(shape) == fixed:
            return
        multiple = _describe(self.size_multiple)
        if self.padding == "same":
            raise ModelError(
                f"input size {shape} is not a multiple of {multiple} on every axis "
                f"(the network pools each axis {self.depth} times)",
                hint=f"pad or crop to a multiple of {multiple}, e.g. {fixed}",
            )
        raise ModelError(
            f"input size {shape} cannot go through this valid-padding U-Net: every level needs "
            f"a size its pooling divides after its convolutions",
            hint=f"use sizes of the form {_describe(self.valid_input_size(1))} + {multiple}*k, e.g. {fixed}",
        )


def _describe(size: Size) -> str:
    """``16`` when every axis agrees, else ``(4, 16, 16)``."""
    return str(size[0]) if len(set(size)) == 1 else str(tuple(size))
