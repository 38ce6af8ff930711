"""Spatial attention maps (CBAM, scSE, SimAM, ...) drawn over the images they were computed on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch

from attnblocks._errors import InvalidInputError
from attnblocks._validation import check_choice, check_positive_int
from attnblocks.inspect._maps import UpsampleMode, describe_maps, normalize_maps, upsample_maps
from attnblocks.plot._images import check_figsize, check_fraction, host
from attnblocks.plot._mpl import new_figure, scalar_mappable
from attnblocks.plot._overlay import OverlayStyle, check_titles, draw_rows, map_sets, overlay_batch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["spatial_map_overlay"]

#: ``"site"``: raw values, one colour scale per row; ``"none"``: raw values, one colour
#: scale for all rows; ``"image"``: each panel min-max scaled to [0, 1].
SpatialScale = Literal["site", "none", "image"]

_SCALES = ("site", "none", "image")
_REDUCTIONS = ("mean", "max")


def _as_maps(maps: object, n: int, *, owner: str, label: str) -> torch.Tensor:
    """``(N, K, h, w)`` or ``(N, h, w)`` -> ``(N, K, h, w)`` float on the CPU."""
    if (
        not isinstance(maps, torch.Tensor)
        or maps.dim() not in (3, 4)
        or maps.shape[0] != n
        or not maps.is_floating_point()
    ):
        raise InvalidInputError(
            f"{owner}: maps[{label!r}] must be a floating tensor (N, 1, h, w), (N, C, h, w) "
            f"or (N, h, w) with N = {n} (one map per image, e.g. rec.maps from "
            f"attnblocks.inspect.record_maps); got {describe_maps(maps)}. Only 2D maps can "
            "be drawn over images."
        )
    if 0 in maps.shape[-2:]:
        raise InvalidInputError(
            f"{owner}: maps[{label!r}] of shape {tuple(maps.shape)} has no positions to draw."
        )
    maps = host(maps, owner=owner, name=f"maps[{label!r}]")
    return maps[:, None] if maps.dim() == 3 else maps


def _limits(values: list[torch.Tensor]) -> tuple[float, float]:
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    if hi <= lo:  # a constant map (e.g. a block at its identity init): widen a little
        pad = 1e-6 * max(abs(lo), 1.0)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def spatial_map_overlay(
    images: torch.Tensor,
    maps: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    titles: Sequence[str] | None = None,
    normalize: SpatialScale = "site",
    reduce: Literal["mean", "max"] = "mean",
    upsample: UpsampleMode = "bilinear",
    alpha: float = 0.55,
    cmap: str = "turbo",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    max_images: int = 8,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Spatial attention maps over their images: one column per image, one row per block.

    The first row shows the images; each further row overlays the maps of one block,
    e.g. ``rec.maps`` from :func:`attnblocks.inspect.record_maps` (CBAM's and scSE's
    spatial gates, SimAM's weights, Global Context's pooling weights...). A map with
    one value per channel, ``(N, C, h, w)``, is shown as its channel ``reduce``
    (mean or maximum); the row label gives the site, the map's resolution and the
    reduction. Maps are brought to image size with ``upsample``.

    The maps are not rescaled by default: their values mean something (a CBAM gate
    of 0.9 keeps 90% of the activation), so ``normalize="site"`` colours each row on
    its own range, with its own colour bar, and the images of one row can be
    compared. ``"none"`` puts every row on one range (for blocks whose maps share a
    meaning, such as several CBAM gates); ``"image"`` rescales each panel to [0, 1].

    Args:
        images: ``(N, 3, H, W)`` or ``(N, 1, H, W)`` inputs (or one ``(C, H, W)``).
        maps: ``(N, 1, h, w)``, ``(N, C, h, w)`` or ``(N, h, w)`` maps, or a mapping
            ``{label: maps}`` such as ``rec.maps``, one row each.
        titles: one column title per image, e.g. the class names.
        normalize: ``"site"``, ``"none"`` or ``"image"``, see above.
        reduce: ``"mean"`` or ``"max"``: how a per-channel map becomes one map.
        upsample: the interpolation that brings maps to image size
            (:func:`attnblocks.inspect.upsample_maps`).
        alpha: opacity of the heat map.
        cmap: the colour map.
        mean, std: the normalisation of the images, undone for display.
        max_images: show at most this many images.
        figsize: ``(width, height)`` in inches; chosen from the grid size if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks import CBAMBlock
        >>> from attnblocks.inspect import record_maps
        >>> from attnblocks.plot import spatial_map_overlay
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CBAMBlock(8, reduction=2))
        >>> images = torch.rand(3, 3, 32, 32)
        >>> with torch.no_grad(), record_maps(net) as rec:
        ...     _ = net(images)
        >>> fig = spatial_map_overlay(images, rec.maps)
        >>> len(fig.axes)  # 2 rows x 3 images and one colour bar
        7
    """
    owner = "spatial_map_overlay"
    alpha = check_fraction(alpha, "alpha", owner=owner)
    max_images = check_positive_int(max_images, "max_images", owner=owner)
    check_choice(normalize, "normalize", _SCALES, owner=owner)
    check_choice(reduce, "reduce", _REDUCTIONS, owner=owner)
    style = OverlayStyle(cmap, alpha, mean, std, owner)
    batch, n = overlay_batch(images, max_images, upsample, style)
    empty = " (rec.maps is empty when the model ran no forward pass inside record_maps)"
    sets = map_sets(maps, "maps", "spatial map", owner=owner, hint=empty)
    check_titles(titles, n, owner=owner)
    size = (batch.shape[-2], batch.shape[-1])
    rows: dict[str, torch.Tensor] = {}
    labels: dict[str, str] = {}
    for label, m in sets.items():
        full = _as_maps(m, batch.shape[0], owner=owner, label=str(label))[:n]
        k, h, w = full.shape[1:]
        one = full[:, 0] if k == 1 else (full.mean(1) if reduce == "mean" else full.amax(1))
        rows[label] = upsample_maps(one, size, mode=upsample)
        detail = f"{h}x{w}" + ("" if k == 1 else f", {reduce} of {k} ch")
        labels[label] = f"{label}\n{detail}"
    if normalize == "image":
        rows = normalize_maps(rows, "image")

    nrows = 1 + len(rows)
    fig = new_figure(check_figsize(figsize, (1.9 * n + 2.0, 1.9 * nrows + 0.3), owner=owner))
    # one narrow extra column holds the colour bars, so every row keeps the same width
    grid = fig.add_gridspec(nrows, n + 1, width_ratios=[1.0] * n + [0.07])
    axes = [[fig.add_subplot(grid[r, j]) for j in range(n)] for r in range(nrows)]
    shared = _limits(list(rows.values()))
    panels = [
        (labels[key], values, _limits([values]) if normalize == "site" else shared)
        for key, values in rows.items()
    ]
    draw_rows(axes, batch, panels, titles, style, label_size=8)
    if normalize == "site":
        for r, values in enumerate(rows.values(), start=1):
            lo, hi = _limits([values])
            bar = fig.colorbar(scalar_mappable(cmap, lo, hi), cax=fig.add_subplot(grid[r, n]))
            bar.ax.tick_params(labelsize=7)
    else:
        lo, hi = (0.0, 1.0) if normalize == "image" else shared
        bar = fig.colorbar(scalar_mappable(cmap, lo, hi), cax=fig.add_subplot(grid[1:, n]))
        bar.ax.tick_params(labelsize=7)
        what = "each image on its own [0, 1] scale" if normalize == "image" else "raw values"
        bar.set_label(f"spatial map ({what})", fontsize=8)
    return fig
