"""U-Net building blocks, each written once for 2D and 3D (``spatial_dims``).

Kernel sizes and strides are per axis (``(1, 3, 3)``, ``(1, 2, 2)``), so one block serves
isotropic data and thick-slice MRI, where the slice axis must not be pooled as early as the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "instance", "none"]
SkipMode = Literal["concat", "add", "none"]


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


class InstanceNorm(nn.Module):
    """Instance normalisation with a per-channel affine (``nn.InstanceNorm{2,3}d(affine=True)``'s
    parameters and results), 2D or 3D. Shape: (N, C, *S) -> (N, C, *S).

    For 3D inputs on the CPU each sample goes through ``batch_norm`` as a batch of one, which is
    instance norm by definition: PyTorch's own instance norm copies a channels-last input into
    another layout and back, and made the bf16 training step of a planned 3D U-Net 1.33x slower
    (``scripts/bench_norm.py``). In 2D (batches of 8 and more) that loop was slower than PyTorch's
    (0.86x), so 2D, GPUs and traced or scripted graphs (export) use ``F.instance_norm``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5 and x.device.type == "cpu" and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return torch.cat([F.batch_norm(x[i:i + 1], None, None, self.weight, self.bias, True, 0.0, self.eps)
                              for i in range(x.shape[0])])
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def norm_layer(norm: Norm, spatial_dims: int, channels: int) -> nn.Module:
    if norm == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if norm == "instance":
        return InstanceNorm(channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """``convs`` x (convolution -> norm -> LeakyReLU), optionally followed by dropout.

    ``kernel_size`` is per axis (odd sizes). ``padding="same"`` pads ``k // 2`` per axis and keeps
    the spatial size; ``"valid"`` (the original U-Net) pads nothing, so each convolution shrinks
    an axis by ``k - 1``. Shape: (N, in_channels, *S) -> (N, out_channels, *S').
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        convs: int = 2,
        norm: Norm = "batch",
        padding: Literal["same", "valid"] = "same",
        dropout: float = 0.0,
        kernel_size: Sequence[int] | None = None,
    ) -> None:
        kernel = tuple(kernel_size) if kernel_size is not None else (3,) * spatial_dims
        pad = tuple(k // 2 for k in kernel) if padding == "same" else 0
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [
                conv_nd(spatial_dims)(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size=kernel,
                    padding=pad,
                    bias=norm == "none",  # a norm layer's shift makes the conv bias redundant
                ),
                norm_layer(norm, spatial_dims, out_channels),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class Down(nn.Sequential):
    """Max-pooling by ``stride`` (per axis; 1 leaves an axis alone) then a :class:`ConvBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: Sequence[int] | None = None,
                 **block_kwargs) -> None:
        stride = tuple(stride) if stride is not None else (2,) * spatial_dims
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims](stride)
        super().__init__(pool, ConvBlock(spatial_dims, in_channels, out_channels, **block_kwargs))


class ResidualBlock(nn.Module):
    """A residual basic block (He et al., 2016), as in nnU-Net's residual encoders:
    ``act(branch(x) + shortcut(x))`` with ``branch`` = conv -> norm -> LeakyReLU -> conv -> norm.

    The shortcut is the identity when the channel counts agree, else a 1x1 convolution and norm
    (a projection). ``kernel_size`` is per axis (odd); padding is always ``same``.
    Shape: (N, in_channels, *S) -> (N, out_channels, *S).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: Norm = "batch",
                 kernel_size: Sequence[int] | None = None) -> None:
        super().__init__()
        kernel = tuple(kernel_size) if kernel_size is not None else (3,) * spatial_dims
        conv, pad, bias = conv_nd(spatial_dims), tuple(k // 2 for k in kernel), norm == "none"
        self.branch = nn.Sequential(
            conv(in_channels, out_channels, kernel_size=kernel, padding=pad, bias=bias),
            norm_layer(norm, spatial_dims, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            conv(out_channels, out_channels, kernel_size=kernel, padding=pad, bias=bias),
            norm_layer(norm, spatial_dims, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, kernel_size=1, bias=bias),
                                          norm_layer(norm, spatial_dims, out_channels))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.shortcut(x))


def residual_blocks(spatial_dims: int, in_channels: int, out_channels: int, blocks: int, norm: Norm = "batch",
                    kernel_size: Sequence[int] | None = None, dropout: float = 0.0) -> list[nn.Module]:
    """``blocks`` :class:`ResidualBlock` s (the first one changes the channel count), then dropout if > 0."""
    layers: list[nn.Module] = [
        ResidualBlock(spatial_dims, in_channels if i == 0 else out_channels, out_channels, norm=norm, kernel_size=kernel_size)
        for i in range(blocks)
    ]
    return layers + ([nn.Dropout(dropout)] if dropout > 0 else [])


class ResidualDown(nn.Sequential):
    """A residual encoder stage: max-pooling by ``stride`` (per axis, as :class:`Down`, so sizes are
    unchanged) then ``blocks`` :class:`ResidualBlock` s, optionally followed by dropout.
    Shape: (N, in_channels, *S) -> (N, out_channels, *[s // t for s, t in zip(S, stride)])."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: Sequence[int] | None = None,
                 blocks: int = 1, norm: Norm = "batch", kernel_size: Sequence[int] | None = None, dropout: float = 0.0) -> None:
        stride = tuple(stride) if stride is not None else (2,) * spatial_dims
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims](stride)
        super().__init__(pool, *residual_blocks(spatial_dims, in_channels, out_channels, blocks, norm, kernel_size, dropout))


def upsampler(spatial_dims: int, in_channels: int, out_channels: int, mode: Literal["transpose", "interp"],
              stride: Sequence[int] | None = None) -> nn.Module:
    """Multiplies each spatial axis by ``stride`` (per axis, default 2), undoing a :class:`Down`.
    ``transpose``: learned transposed convolution (kernel = stride) to ``out_channels``.
    ``interp``: parameter-free (bi/tri)linear interpolation that keeps ``in_channels`` (the
    decoder's merge then sees more channels, as in milesial's bilinear U-Net)."""
    stride = tuple(stride) if stride is not None else (2,) * spatial_dims
    if mode == "transpose":
        cls = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
        return cls(in_channels, out_channels, kernel_size=stride, stride=stride)
    scale = tuple(float(s) for s in stride)
    return nn.Upsample(scale_factor=scale, mode="bilinear" if spatial_dims == 2 else "trilinear", align_corners=False)


def center_crop(x: torch.Tensor, spatial_shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Crop the trailing spatial axes of ``x`` to ``spatial_shape`` around the centre ("copy and crop")."""
    slices = [slice(None), slice(None)]
    for size, target in zip(x.shape[2:], spatial_shape):
        start = (size - target) // 2
        slices.append(slice(start, start + target))
    return x[tuple(slices)]


class Up(nn.Module):
    """Upsample the deeper features by ``stride``, merge the encoder's skip features, then a :class:`ConvBlock`.

    ``skip``: ``concat`` joins channels (original U-Net); ``add`` sums them, projecting the skip
    with a 1x1 convolution when the channel counts differ; ``none`` ignores the skip. With
    valid padding the skip is centre-cropped to the upsampled size first.
    """

    def __init__(
        self,
        spatial_dims: int,
        deep_channels: int,
        skip_channels: int,
        out_channels: int,
        skip: SkipMode = "concat",
        upsample: Literal["transpose", "interp"] = "transpose",
        stride: Sequence[int] | None = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        up_channels = skip_channels if upsample == "transpose" else deep_channels
        self.up = upsampler(spatial_dims, deep_channels, up_channels, upsample, stride)
        self.skip = skip
        self.project: nn.Module = nn.Identity()
        if skip == "add" and skip_channels != up_channels:
            self.project = conv_nd(spatial_dims)(skip_channels, up_channels, kernel_size=1)
        merged = up_channels + skip_channels if skip == "concat" else up_channels
        self.conv = ConvBlock(spatial_dims, merged, out_channels, **block_kwargs)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(deep)
        if self.skip != "none":
            if skip.shape[2:] != x.shape[2:]:
                skip = center_crop(skip, x.shape[2:])
            x = torch.cat([x, skip], dim=1) if self.skip == "concat" else x + self.project(skip)
        return self.conv(x)
