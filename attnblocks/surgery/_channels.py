"""Read a module's output channel count from its configuration, without running it.

Only modules whose output layout is certain to be ``(N, C, *spatial)`` tell their
channels here: convolutions, batch/instance/group norms, channels-first layer norms,
and ``nn.Sequential`` containers whose last informative layer is one of these. For
anything else (an activation, a residual block, a plain ``nn.LayerNorm`` whose
output is channels-last) the answer is ``None`` and the caller needs an
``example_input`` to see the real output shape. Blocks that attnblocks appended
to a Sequential earlier keep its channels and are looked through.

:func:`infer_spatial_ranks` reads, the same way, how many spatial dimensions a
module's output has when its type fixes it (``Conv1d``: 1, ``BatchNorm3d``: 3), so
a block defined for 2D maps only is refused after a 1D or 3D layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from torch import nn

from attnblocks._torch_compat import RMS_NORMS
from attnblocks.surgery._attach import attached_modules

__all__ = ["ChannelInfo", "infer_channels", "infer_spatial_ranks", "is_channels_last_norm"]

_CONVS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.LazyConv1d,
    nn.LazyConv2d,
    nn.LazyConv3d,
    nn.LazyConvTranspose1d,
    nn.LazyConvTranspose2d,
    nn.LazyConvTranspose3d,
)

_FEATURE_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)

_LAYER_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, *RMS_NORMS)  # RMSNorm: torch >= 2.4

# Layers that keep the channel count of their input (they may change the spatial
# size); a Sequential is read backwards through them.
_CHANNEL_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)

# Layers whose type fixes the number of spatial dimensions of their output. A
# BatchNorm1d or InstanceNorm1d also takes (N, C) (no spatial dimension: 0).
_RANKS: tuple[tuple[frozenset[int], tuple[type[nn.Module], ...]], ...] = (
    (
        frozenset({1}),
        (
            nn.Conv1d,
            nn.ConvTranspose1d,
            nn.LazyConv1d,
            nn.LazyConvTranspose1d,
            nn.MaxPool1d,
            nn.AvgPool1d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveMaxPool1d,
            nn.LPPool1d,
        ),
    ),
    (
        frozenset({0, 1}),
        (nn.BatchNorm1d, nn.LazyBatchNorm1d, nn.InstanceNorm1d, nn.LazyInstanceNorm1d),
    ),
    (
        frozenset({2}),
        (
            nn.Conv2d,
            nn.ConvTranspose2d,
            nn.LazyConv2d,
            nn.LazyConvTranspose2d,
            nn.BatchNorm2d,
            nn.LazyBatchNorm2d,
            nn.InstanceNorm2d,
            nn.LazyInstanceNorm2d,
            nn.MaxPool2d,
            nn.AvgPool2d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveMaxPool2d,
            nn.LPPool2d,
        ),
    ),
    (
        frozenset({3}),
        (
            nn.Conv3d,
            nn.ConvTranspose3d,
            nn.LazyConv3d,
            nn.LazyConvTranspose3d,
            nn.BatchNorm3d,
            nn.LazyBatchNorm3d,
            nn.InstanceNorm3d,
            nn.LazyInstanceNorm3d,
            nn.MaxPool3d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool3d,
        ),
    ),
)

# torchvision and timm name their channels-first layer norms LayerNorm2d; the
# ConvNeXt reference code marks them with data_format="channels_first".
_CHANNELS_FIRST_NAME = re.compile(r"[123]d$", re.IGNORECASE)


@dataclass(frozen=True)
class ChannelInfo:
    """A channel count and where it was read from (for messages and the plan)."""

    channels: int
    source: str


def _is_channels_first_norm(module: nn.Module) -> bool:
    if getattr(module, "data_format", None) == "channels_first":
        return True
    return _CHANNELS_FIRST_NAME.search(type(module).__name__) is not None


def is_channels_last_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a layer norm over the last dimension only (channels-last output).

    A plain ``nn.LayerNorm(C)`` normalises the last dimension, so its output is laid
    out ``(N, ..., C)``; an attention block expecting ``(N, C, *spatial)`` must not be
    put after it.

    >>> from torch import nn
    >>> is_channels_last_norm(nn.LayerNorm(64)), is_channels_last_norm(nn.BatchNorm2d(64))
    (True, False)
    """
    if not isinstance(module, _LAYER_NORMS):
        return False
    shape = getattr(module, "normalized_shape", ())
    return len(shape) == 1 and not _is_channels_first_norm(module)


def infer_channels(module: nn.Module) -> ChannelInfo | None:
    """Return the output channel count of ``module`` if its configuration fixes it.

    Args:
        module: any module.

    Returns:
        The channel count and its source, or ``None`` if it cannot be known without
        running the module.

    Example:
        >>> from torch import nn
        >>> infer_channels(nn.Conv2d(3, 16, 3))
        ChannelInfo(channels=16, source='Conv2d.out_channels')
        >>> infer_channels(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()))
        ChannelInfo(channels=16, source='Sequential[1] BatchNorm2d.num_features')
        >>> infer_channels(nn.ReLU()) is None
        True
    """
    kind = type(module).__name__
    if isinstance(module, _CONVS):
        return ChannelInfo(int(cast(int, module.out_channels)), f"{kind}.out_channels")
    if isinstance(module, _FEATURE_NORMS):
        features = int(cast(int, module.num_features))
        return ChannelInfo(features, f"{kind}.num_features") if features > 0 else None
    if isinstance(module, nn.GroupNorm):
        return ChannelInfo(int(module.num_channels), f"{kind}.num_channels")
    if isinstance(module, _LAYER_NORMS):
        shape = tuple(getattr(module, "normalized_shape", ()))
        if len(shape) == 1 and _is_channels_first_norm(module):
            return ChannelInfo(int(shape[0]), f"{kind}.normalized_shape (channels-first)")
        return None
    if _is_plain_sequential(module):
        for key, child in _stages_backwards(module):
            found = infer_channels(child)
            if found is not None:
                return ChannelInfo(found.channels, f"{kind}[{key}] {found.source}")
            if not isinstance(child, _CHANNEL_PRESERVING):
                return None
    return None


def infer_spatial_ranks(module: nn.Module) -> frozenset[int] | None:
    """The possible numbers of spatial dimensions of ``module``'s output, if its type fixes them.

    Args:
        module: any module.

    Returns:
        A set such as ``{2}`` for a ``Conv2d`` (``{0, 1}`` for a ``BatchNorm1d``, which
        also takes ``(N, C)``), or ``None`` if only running the module tells.

    Example:
        >>> from torch import nn
        >>> infer_spatial_ranks(nn.Conv1d(3, 8, 3)), infer_spatial_ranks(nn.ReLU())
        (frozenset({1}), None)
        >>> infer_spatial_ranks(nn.Sequential(nn.Conv3d(3, 8, 1), nn.ReLU()))
        frozenset({3})
    """
    for ranks, types in _RANKS:
        if isinstance(module, types):
            return ranks
    if _is_plain_sequential(module):
        for _, child in _stages_backwards(module):
            found = infer_spatial_ranks(child)
            if found is not None:
                return found
            if not isinstance(child, _CHANNEL_PRESERVING):
                return None
    return None


def _is_plain_sequential(module: nn.Module) -> bool:
    return type(module) is nn.Sequential or (
        isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    )


def _stages_backwards(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A Sequential's stages, last first, without the blocks attnblocks appended."""
    appended = {id(block) for block in attached_modules(module)}
    return [
        (key, child)
        for key, child in reversed(module._modules.items())
        if child is not None and id(child) not in appended
    ]
