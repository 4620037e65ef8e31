"""The planning rules, each a small pure function of numbers (no files, no torch).

They follow nnU-Net v2's experiment planner (Isensee et al., Nature Methods 2021) where its
rules are stated, and say where they differ. Axes are the network's axes: for 3D NIfTI the
canonical RAS axes (x, y, z), for 2D PNG (rows, columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unetcli.data.spacing import is_thick_slice


MIN_FEATURE_EDGE = 4
"""The deepest feature map keeps at least this many voxels per pooled axis."""
PATCH_VOXELS = {2: 2048**2, 3: 256**3}
"""Starting patch volume before it is clipped to the median image and fitted to the budget."""
MAX_FEATURES = {2: 512, 3: 320}
BASE_FEATURES = 32
MIN_BATCH = 2
MAX_DATASET_COVERAGE = 0.05
"""A batch covers at most this share of the dataset's voxels (nnU-Net's overfitting guard)."""
LOWRES_COVERAGE = 0.25
"""3d_lowres is planned when the full-resolution patch covers less than this share of the median image."""
STORED_PER_ELEMENT = 3
"""Feature-map copies a training step keeps per output element (convolution, normalisation and
activation outputs for the backward pass), next to the gradient buffers."""


# --------------------------------------------------------------------------- spacing


def shape_at_spacing(shape: Sequence[float], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """The voxel count per axis of ``shape`` (at ``spacing``) resampled to ``target``."""
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)]


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """A U-Net's per-level kernels and strides for one patch, and what the patch must divide by."""

    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    patch: list[int]
    """The patch, padded up to a multiple of :attr:`multiple` on every axis."""

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def multiple(self) -> list[int]:
        return [math.prod(level[a] for level in self.strides) for a in range(len(self.patch))]


def topology(spacing: Sequence[float], patch: Sequence[int], min_edge: int = MIN_FEATURE_EDGE) -> Topology:
    """Pool an axis while its feature map keeps >= 2 * ``min_edge`` voxels and its spacing is within
    2x of the finest; convolve it with kernel 1 until its spacing comes within 2x of the finest
    (then 3, and it stays 3). The bottleneck gets kernel 3 on every axis. A stage that would pool a
    single axis needs >= 3 * ``min_edge`` voxels on it (pooling one axis alone buys little)."""
    dims = len(spacing)
    current_spacing, size = [float(s) for s in spacing], [float(p) for p in patch]
    kernel, strides, kernels = [1] * dims, [[1] * dims], []
    while True:
        axes = [a for a in range(dims) if size[a] >= 2 * min_edge]
        if not axes:
            break
        finest = min(current_spacing[a] for a in axes)
        axes = [a for a in axes if current_spacing[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_edge:
            break
        finest_all = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[a] / finest_all < 2 else 1 for a, k in enumerate(kernel)]
        step = [2 if a in axes else 1 for a in range(dims)]
        for a in axes:
            current_spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(step)
        kernels.append(list(kernel))
    kernels.append([3] * dims)
    multiple = [math.prod(level[a] for level in strides) for a in range(dims)]
    padded = [math.ceil(p / m) * m for p, m in zip(patch, multiple)]
    return Topology(kernels, strides, padded)


def features_per_level(levels: int, spatial_dims: int, base: int = BASE_FEATURES) -> list[int]:
    """32, 64, 128, ... doubling per level, capped at 320 (3D) or 512 (2D) as in nnU-Net."""
    return [min(base * 2**i, MAX_FEATURES[spatial_dims]) for i in range(levels)]


def initial_patch(spacing: Sequence[float], median_shape: Sequence[int]) -> list[int]:
    """A patch shaped like 1/spacing (the same extent in mm per axis) with 256^3 (3D) or 2048^2 (2D)
    voxels, clipped to the median image shape."""
    inverse = 1.0 / np.asarray(spacing, float)
    scale = (PATCH_VOXELS[len(spacing)] / np.prod(inverse)) ** (1.0 / len(spacing))
    return [int(min(round(v * scale), m)) for v, m in zip(inverse, median_shape)]


# --------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Network:
    """What the cost model needs to know about a U-Net."""

    features: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    in_channels: int
    num_classes: int
    encoder_convs: list[int]
    """Convolutions per encoder level (plain: convs_per_level; residual: 2 per block)."""
    decoder_convs: int


def _level_voxels(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    voxels, size = [], [float(p) for p in patch]
    for level in strides:
        size = [math.ceil(s / f) for s, f in zip(size, level)]
        voxels.append(int(math.prod(size)))
    return voxels


def _convs(net: Network, patch: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Every convolution as (kernel volume, in channels, out channels, output voxels)."""
    voxels, f = _level_voxels(patch, net.strides), net.features
    convs = []
    for i, n in enumerate(net.encoder_convs):
        k = math.prod(net.kernel_sizes[i])
        cin = net.in_channels if i == 0 else f[i - 1]
        convs += [(k, cin if j == 0 else f[i], f[i], voxels[i]) for j in range(n)]
    for i in reversed(range(len(f) - 1)):
        k = math.prod(net.kernel_sizes[i])
        convs.append((math.prod(net.strides[i + 1]), f[i + 1], f[i], voxels[i]))  # transposed convolution
        convs += [(k, 2 * f[i] if j == 0 else f[i], f[i], voxels[i]) for j in range(net.decoder_convs)]
    convs.append((1, f[0], net.num_classes, voxels[0]))
    return convs


def parameter_count(net: Network) -> int:
    return sum(k * cin * cout for k, cin, cout, _ in _convs(net, [1] * len(net.strides[0])))


def training_flops(net: Network, patch: Sequence[int], batch: int) -> float:
    """Multiply-adds x 2 of one training step: forward + backward (about twice the forward)."""
    forward = sum(2.0 * k * cin * cout * vox for k, cin, cout, vox in _convs(net, patch))
    return 3.0 * forward * batch


def training_memory_bytes(net: Network, patch: Sequence[int], batch: int, bytes_per_element: int) -> float:
    """Estimated peak memory of a training step: the feature maps kept for the backward pass
    (every convolution's output, the skip concatenations) at the compute precision, plus weights,
    gradients and two optimiser moments in fp32. An estimate for planning, not a measurement."""
    elements = sum(cout * vox for _, _, cout, vox in _convs(net, patch))
    elements += sum(2 * f * v for f, v in zip(net.features[:-1], _level_voxels(patch, net.strides)))
    activations = STORED_PER_ELEMENT * elements * batch * bytes_per_element
    return float(activations + 16 * parameter_count(net))


# --------------------------------------------------------------------------- patch and batch


def shrink_axis(patch: Sequence[int], median_shape: Sequence[int]) -> int:
    """The axis whose patch is largest relative to the median image: the one to shrink next."""
    return int(np.argmax([p / m for p, m in zip(patch, median_shape)]))


def batch_size(fits: int, patch: Sequence[int], dataset_voxels: float) -> int:
    """What the budget fits (``fits``), at most 5 % of the dataset's voxels per batch, at least 2."""
    coverage_cap = round(dataset_voxels * MAX_DATASET_COVERAGE / math.prod(patch))
    return max(min(fits, coverage_cap), MIN_BATCH)


# --------------------------------------------------------------------------- normalisation


def normalization(modality: str, cropped_fraction: float) -> str:
    """CT: ``ct`` (clip to the foreground's 0.5/99.5 percentiles, z-score with dataset statistics).
    Otherwise a z-score per image, over the non-zero mask when cropping to the non-zero box kept
    less than 3/4 of the voxels (a large zero background would dominate the statistics)."""
    if modality == "ct":
        return "ct"
    return "zscore_nonzero" if cropped_fraction < 0.75 else "zscore"


def modality(channel_name: str) -> str:
    name = channel_name.strip().lower()
    if name == "ct":
        return "ct"
    if name in {"mri", "mr", "t1", "t2", "flair", "t1w", "t2w", "t1c", "t1gd", "t1ce", "pd", "dwi", "adc"}:
        return "mri"
    return "other"


# --------------------------------------------------------------------------- 3d_lowres


def lowres_spacing_step(spacing: Sequence[float], factor: float = 1.03) -> list[float]:
    """One step coarser: every axis finer than the coarsest grows by ``factor`` (capped at the
    coarsest); once all are equal, all grow. Thick-slice axes thus stay where they are while the
    in-plane axes catch up."""
    coarsest = max(spacing)
    if all(math.isclose(s, coarsest) for s in spacing):
        return [s * factor for s in spacing]
    return [min(s * factor, coarsest) if s < coarsest else s for s in spacing]


# --------------------------------------------------------------------------- short runs


SHORT_THICK_SLICE_RUN = 1000
"""Up to this many iterations a 3D run on thick slices trains the fixed built-in network instead of
the plan's. Measured on 1 x 1 x 4 mm brain MRI, scored on held-out scans and on scans changed as
other scanners change them (``scripts/bench_plan.py``, docs/benchmarks.md; means of two seeds): the
fixed network leads by 0.018 clean / 0.021 changed at 500 iterations and by 0.004 / 0.009 at 1,000;
the plan leads by 0.007 / 0.009 at 2,000. The plan's network (nnU-Net's, sized for 250,000
iterations: kernel 1 across slices at first, five levels, instance norm) keeps improving with
iterations; the fixed one (3 x 3 x 3 kernels, four levels, batch norm, 0.7x the time per step)
learns faster at first. At 2 x 2 x 8 mm, where the plan's network is the fixed one's size, the two
are level at 500 iterations (0.931 vs 0.929 clean, one seed), so the rule costs little there."""


def prefers_fixed_network(spatial_dims: int, spacing: Sequence[float], iterations: float | None) -> bool:
    """Whether a run of ``iterations`` (None: unknown, e.g. a time budget on a GPU) trains better
    with the fixed network than with the plan's: 3D thick-slice data and a short budget."""
    return (spatial_dims == 3 and is_thick_slice(spacing)
            and iterations is not None and iterations <= SHORT_THICK_SLICE_RUN)
