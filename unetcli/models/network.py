"""The contract every network that :func:`unetcli.models.build_model` returns keeps.

The trainer, the patch sampler, the sliding window and ``predict`` only need to know which input
sizes a network takes and how much smaller its output is; both are per spatial axis, because a
thick-slice network pools its slice axis fewer times than the others. This is a base class
rather than a ``typing.Protocol`` because callers also use ``nn.Module``'s own methods (``to``,
``state_dict``, ``train``), which a Protocol cannot inherit.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

from torch import nn

Size = tuple[int, ...]


def per_axis(value: int | Sequence[int], spatial_dims: int) -> Size:
    """``value`` for every axis (an int is repeated; a sequence must have one entry per axis)."""
    if isinstance(value, int):
        return (value,) * spatial_dims
    values = tuple(int(v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} sizes (one per spatial axis), got {list(values)}")
    return values


class SegmentationNetwork(nn.Module, metaclass=ABCMeta):
    """A network mapping (N, C, *S) to logits (N, K, *S'), with per-axis size rules.

    Every size below is a tuple with one entry per spatial axis.
    """

    spatial_dims: int

    @property
    @abstractmethod
    def size_multiple(self) -> Size:
        """Each axis of a ``same``-padded input must be a multiple of this (the product of the strides)."""

    @property
    @abstractmethod
    def margin(self) -> Size:
        """Voxels the output loses per side on each axis (0 with same padding)."""

    @abstractmethod
    def output_shape(self, input_shape: Sequence[int]) -> Size:
        """Spatial output shape for a spatial input shape (raises :class:`~unetcli.errors.ModelError` if invalid)."""

    @abstractmethod
    def valid_input_size(self, min_size: int | Sequence[int]) -> Size:
        """The smallest input size >= ``min_size`` on each axis that the network takes."""

    def input_size_for_output(self, out_size: int | Sequence[int]) -> Size:
        """The smallest valid input whose output covers ``out_size`` voxels on each axis."""
        wanted = per_axis(out_size, self.spatial_dims)
        return self.valid_input_size([o + 2 * m for o, m in zip(wanted, self.margin)])
