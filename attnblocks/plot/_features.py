"""Feature-map figures: channel grids per layer, and channel heat maps on the image."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnblocks._errors import ChannelMismatchError, InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_choice, check_positive_int
from attnblocks.inspect import normalize_maps, upsample_maps
from attnblocks.inspect._maps import (
    MAP_NORMALIZATIONS,
    MapNormalization,
    UpsampleMode,
    check_upsample,
)
from attnblocks.plot._images import check_figsize, check_fraction, host, to_rgb
from attnblocks.plot._mpl import check_cmap, new_figure, scalar_mappable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["channel_heatmaps", "feature_map_grid"]

ChannelOrder = Literal["activation", "first"]


def _one_map(feature: object, index: int, *, owner: str, name: str) -> torch.Tensor:
    """``(C, H, W)`` float from ``(N, C, H, W)`` (picking ``index``) or ``(C, H, W)``."""
    if not isinstance(feature, torch.Tensor) or feature.dim() not in (3, 4):
        got = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
        raise InvalidInputError(
            f"{owner}: {name} must be a feature map (N, C, H, W) or (C, H, W), got {got}."
        )
    if feature.dim() == 4:
        if not -feature.shape[0] <= index < feature.shape[0]:
            raise InvalidArgumentError(
                f"{owner}: index {index} is out of range for {name} with batch size "
                f"{feature.shape[0]}."
            )
        feature = feature[index]
    if 0 in feature.shape[1:]:
        raise InvalidInputError(
            f"{owner}: {name} has maps of shape {tuple(feature.shape[1:])}, with no positions "
            "to draw."
        )
    return host(feature, owner=owner, name=name)


def _top_channels(scores: torch.Tensor, k: int) -> list[int]:
    return scores.topk(min(k, scores.numel())).indices.tolist()


def feature_map_grid(
    image: torch.Tensor,
    features: Mapping[str, torch.Tensor],
    *,
    index: int = 0,
    channels: int = 8,
    order: ChannelOrder = "activation",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    cmap: str = "viridis",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Feature maps of several layers for one image, shown beside the image.

    One row per layer, ``channels`` maps per row, each map on its own colour scale
    (the shapes matter here, not the magnitudes; compare magnitudes with
    :func:`channel_heatmaps` and ``normalize="shared"``).

    Args:
        image: the input image ``(3, H, W)`` or ``(1, H, W)``.
        features: ``{layer name: feature map}``, e.g. ``rec.features`` from
            :func:`attnblocks.inspect.record_features`; each ``(N, C, h, w)`` (the
            ``index``-th sample is shown) or ``(C, h, w)``.
        index: which sample of batched feature maps to show.
        channels: how many channels to show per layer.
        order: ``"activation"`` shows the channels with the highest mean activation
            first; ``"first"`` shows channels ``0 .. channels-1``.
        mean, std: the normalisation of ``image``, undone for display.
        cmap: the colour map of the feature maps.
        title: the figure title.
        figsize: ``(width, height)`` in inches; chosen from the grid size if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import feature_map_grid
        >>> import torch
        >>> fig = feature_map_grid(torch.rand(3, 32, 32), {"conv1": torch.randn(1, 16, 16, 16)},
        ...                        channels=4)
        >>> len(fig.axes)
        5
    """
    owner = "feature_map_grid"
    k = check_positive_int(channels, "channels", owner=owner)
    check_cmap(cmap, owner=owner)
    check_choice(order, "order", ("activation", "first"), owner=owner)
    if not isinstance(features, Mapping) or not features:
        raise InvalidInputError(
            f"{owner}: features must be a non-empty mapping {{layer name: feature map}}, "
            f"e.g. rec.features; got {features!r:.80}."
        )
    rgb = to_rgb(image, mean=mean, std=std, owner=owner)
    maps = {
        name: _one_map(f, index, owner=owner, name=f"features[{name!r}]")
        for name, f in features.items()
    }
    rows = len(maps)
    k = min(k, max(1, *(m.shape[0] for m in maps.values())))  # never more panels than channels
    width, height = check_figsize(
        figsize, (2.6 + 1.05 * k, max(2.8, 1.1 * rows + 0.6)), owner=owner
    )
    fig = new_figure((width, height))
    halves: Any = fig.subfigures(1, 2, squeeze=False, width_ratios=[2.4, max(width - 2.4, 1.0)])
    left, right = halves[0, 0], halves[0, 1]
    ax = left.subplots()
    ax.imshow(rgb, cmap="gray" if rgb.ndim == 2 else None)
    ax.set_title("input", fontsize=10)
    ax.set_axis_off()
    grid = right.subplots(rows, k, squeeze=False)
    for r, (name, fmap) in enumerate(maps.items()):
        c = fmap.shape[0]
        scores = fmap.flatten(1).mean(1)
        chosen = _top_channels(scores, k) if order == "activation" else list(range(min(k, c)))
        for j in range(k):
            a = grid[r, j]
            a.set_xticks([])
            a.set_yticks([])
            if j >= len(chosen):
                a.set_axis_off()
                continue
            a.imshow(fmap[chosen[j]].numpy(), cmap=cmap)
            a.set_title(f"ch {chosen[j]}", fontsize=7, pad=2)
            if j == 0:
                shape = "x".join(str(s) for s in fmap.shape)
                a.set_ylabel(f"{name}\n{shape}", fontsize=8)
    what = "top channels by mean activation" if order == "activation" else "first channels"
    fig.suptitle(title if title is not None else f"Feature maps ({what})", fontsize=11)
    return fig


def channel_heatmaps(
    image: torch.Tensor,
    feature: torch.Tensor,
    *,
    k: int = 6,
    rank_by: Literal["activation", "gate"] = "activation",
    gate: torch.Tensor | None = None,
    index: int = 0,
    upsample: UpsampleMode = "bilinear",
    normalize: MapNormalization = "image",
    alpha: float = 0.5,
    cmap: str = "turbo",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    layer: str | None = None,
    ncols: int = 4,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """The top-``k`` channels of a feature map as heat maps over the input image.

    Channels are ranked either by their mean activation on this image (the usual
    tutorial figure), or by the SE gate this image received at the block that
    re-weights this feature map: the channels the block chose to let through.

    Args:
        image: the input image ``(3, H, W)`` (RGB) or ``(1, H, W)``.
        feature: ``(N, C, h, w)`` (sample ``index`` is used) or ``(C, h, w)``.
        k: how many channels to show.
        rank_by: ``"activation"`` or ``"gate"`` (needs ``gate``).
        gate: the gates, ``(N, C)`` or ``(C,)``, e.g. ``rec.gates["layer3.0.se"]``.
        index: which sample to show when ``feature`` / ``gate`` are batched.
        upsample: the interpolation that brings maps to the image size.
        normalize: ``"image"`` scales each map to [0, 1] on its own, ``"shared"``
            puts all ``k`` maps on one scale (so strong and weak channels can be
            compared), ``"none"`` shows raw activations on a shared colour scale.
        alpha: opacity of the heat map over the image.
        cmap: the colour map of the heat maps.
        mean, std: the normalisation of ``image``, undone for display.
        layer: the layer's name, shown in the title.
        ncols: panels per row.
        figsize: ``(width, height)`` in inches; chosen from the panel count if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import channel_heatmaps
        >>> import torch
        >>> fig = channel_heatmaps(torch.rand(3, 32, 32), torch.rand(16, 8, 8), k=3,
        ...                        rank_by="gate", gate=torch.rand(16))
        >>> len(fig.axes)  # the image, three overlays and a colour bar
        5
    """
    owner = "channel_heatmaps"
    k = check_positive_int(k, "k", owner=owner)
    check_cmap(cmap, owner=owner)
    check_upsample(None, upsample, owner=owner)
    ncols = check_positive_int(ncols, "ncols", owner=owner)
    alpha = check_fraction(alpha, "alpha", owner=owner)
    check_choice(rank_by, "rank_by", ("activation", "gate"), owner=owner)
    check_choice(normalize, "normalize", MAP_NORMALIZATIONS, owner=owner)
    rgb = to_rgb(image, mean=mean, std=std, owner=owner)
    fmap = _one_map(feature, index, owner=owner, name="feature")
    c = fmap.shape[0]
    if rank_by == "gate":
        if gate is None:
            raise InvalidArgumentError(
                f"{owner}: rank_by='gate' needs gate=, the gates of the block that "
                "re-weights this feature map, e.g. rec.gates['layer3.0.se']."
            )
        if not isinstance(gate, torch.Tensor) or gate.dim() not in (1, 2):
            got = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise InvalidInputError(f"{owner}: gate must be a tensor (N, C) or (C,), got {got}.")
        g = gate[index] if gate.dim() == 2 else gate
        if g.numel() != c:
            raise ChannelMismatchError(
                f"{owner}: gate has {g.numel()} channels but the feature map has {c}; pass "
                "the gates of the block applied to this feature map."
            )
        scores = host(g, owner=owner, name="gate")
    else:
        scores = fmap.flatten(1).mean(1)
    chosen = _top_channels(scores, k)
    size = (rgb.shape[0], rgb.shape[1])
    heat = upsample_maps(fmap[chosen], size, mode=upsample)
    heat = normalize_maps(heat, normalize)
    vmin, vmax = (0.0, 1.0) if normalize != "none" else (float(heat.min()), float(heat.max()))
    panels = 1 + len(chosen)
    rows = math.ceil(panels / ncols)
    cols = math.ceil(panels / rows)
    fig = new_figure(check_figsize(figsize, (2.3 * cols + 0.8, 2.4 * rows + 0.5), owner=owner))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    gray = "gray" if rgb.ndim == 2 else None
    axes[0].imshow(rgb, cmap=gray)
    axes[0].set_title("input", fontsize=9)
    for j, ch in enumerate(chosen, start=1):
        ax = axes[j]
        ax.imshow(rgb, cmap=gray)
        ax.imshow(heat[j - 1].numpy(), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
        label = "gate" if rank_by == "gate" else "mean act."
        ax.set_title(f"ch {ch}  ({label} {float(scores[ch]):.3g})", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if chosen:
        bar = fig.colorbar(scalar_mappable(cmap, vmin, vmax), ax=list(axes), shrink=0.8, pad=0.02)
        bar.set_label(
            {"image": "activation (per-map scale)", "shared": "activation (shared scale)"}.get(
                normalize, "activation"
            ),
            fontsize=8,
        )
    by = "SE gate" if rank_by == "gate" else "mean activation"
    where = f"{layer}: " if layer else ""
    fig.suptitle(f"{where}top-{len(chosen)} of {c} channels by {by}", fontsize=11)
    return fig
