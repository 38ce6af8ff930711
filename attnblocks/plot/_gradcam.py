"""Grad-CAM overlays: the maps of one or several models drawn over the images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from attnblocks._errors import InvalidInputError
from attnblocks._validation import check_choice, check_positive_int
from attnblocks.inspect._maps import MapNormalization, UpsampleMode, normalize_maps, upsample_maps
from attnblocks.plot._images import check_figsize, check_fraction, host
from attnblocks.plot._mpl import new_figure, scalar_mappable
from attnblocks.plot._overlay import OverlayStyle, check_titles, draw_rows, map_sets, overlay_batch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["gradcam_overlay"]

_SCALE_LABEL = {
    "image": "Grad-CAM (each image on its own [0, 1] scale)",
    "shared": "Grad-CAM (one [0, 1] scale for all panels)",
    "none": "Grad-CAM (raw values)",
}
_SCALE_TITLE = {
    "image": "Grad-CAM, each panel normalised on its own (per image)",
    "shared": "Grad-CAM, one shared scale for all panels",
    "none": "Grad-CAM, raw values on one colour scale",
}


def gradcam_overlay(
    images: torch.Tensor,
    cams: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    titles: Sequence[str] | None = None,
    normalize: MapNormalization = "image",
    upsample: UpsampleMode = "bilinear",
    alpha: float = 0.5,
    cmap: str = "turbo",
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    max_images: int = 8,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Grad-CAM maps over their images: one column per image, one row per map set.

    The first row shows the images; each further row overlays one set of maps, e.g.
    ``{"ResNet-20": cams_a, "SE-ResNet-20": cams_b}`` from
    :func:`attnblocks.inspect.grad_cam` with ``normalize="none"``. The default
    ``normalize="image"`` rescales each panel to [0, 1] on its own, the convention of
    Grad-CAM figures (pytorch-grad-cam, TorchCAM): where each model looks on each
    image. ``"shared"`` puts every panel on one colour scale instead, so a weaker map
    looks weaker (and a map much weaker than the strongest one nearly blank). The
    figure's title and colour bar say which scale is shown.

    Args:
        images: ``(N, 3, H, W)`` or ``(N, 1, H, W)`` inputs (or one ``(C, H, W)``).
        cams: raw maps ``(N, h, w)``, or a mapping of labelled map sets.
        titles: one column title per image, e.g. ``"cat -> dog (0.87)"``.
        normalize: ``"image"`` (per image), ``"shared"`` or ``"none"`` (raw values,
            one colour scale for all panels), see :func:`attnblocks.inspect.normalize_maps`.
        upsample: the interpolation that brings maps to image size.
        alpha: opacity of the heat map.
        cmap: the colour map.
        mean, std: the normalisation of the images, undone for display.
        max_images: show at most this many images.
        title: the figure title; by default it names the scale shown.
        figsize: ``(width, height)`` in inches; chosen from the grid size if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import gradcam_overlay
        >>> import torch
        >>> fig = gradcam_overlay(torch.rand(2, 3, 32, 32),
        ...                       {"A": torch.rand(2, 8, 8), "B": torch.rand(2, 8, 8)})
        >>> len(fig.axes)  # 3 rows x 2 images and a colour bar
        7
        >>> fig.get_suptitle()
        'Grad-CAM, each panel normalised on its own (per image)'
    """
    owner = "gradcam_overlay"
    alpha = check_fraction(alpha, "alpha", owner=owner)
    max_images = check_positive_int(max_images, "max_images", owner=owner)
    check_choice(normalize, "normalize", tuple(_SCALE_LABEL), owner=owner)
    style = OverlayStyle(cmap, alpha, mean, std, owner)
    batch, n = overlay_batch(images, max_images, upsample, style)
    sets = map_sets(cams, "cams", "Grad-CAM", owner=owner)
    size = (batch.shape[-2], batch.shape[-1])
    resized = {}
    for label, maps in sets.items():
        if not isinstance(maps, torch.Tensor) or maps.dim() != 3 or maps.shape[0] != batch.shape[0]:
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise InvalidInputError(
                f"{owner}: cams[{label!r}] must be a tensor (N, h, w) with N = "
                f"{batch.shape[0]} (one map per image), got {got}."
            )
        if 0 in maps.shape[1:]:
            raise InvalidInputError(
                f"{owner}: cams[{label!r}] of shape {tuple(maps.shape)} has no positions to draw."
            )
        shown = host(maps[:n], owner=owner, name=f"cams[{label!r}]")
        resized[label] = upsample_maps(shown, size, mode=upsample)
    scaled = normalize_maps(resized, normalize)
    if normalize == "none":
        vmin = min(float(m.min()) for m in scaled.values())
        vmax = max(float(m.max()) for m in scaled.values())
    else:
        vmin, vmax = 0.0, 1.0
    check_titles(titles, n, owner=owner)
    rows = 1 + len(scaled)
    fig = new_figure(check_figsize(figsize, (1.9 * n + 1.6, 1.9 * rows + 0.4), owner=owner))
    axes = fig.subplots(rows, n, squeeze=False)
    panels = [(label, m, (vmin, vmax)) for label, m in scaled.items()]
    draw_rows(axes, batch, panels, titles, style, label_size=9)
    bar = fig.colorbar(
        scalar_mappable(cmap, vmin, vmax), ax=axes[1:, :].ravel().tolist(), shrink=0.9, pad=0.02
    )
    bar.set_label(_SCALE_LABEL[normalize], fontsize=8)
    fig.suptitle(_SCALE_TITLE[normalize] if title is None else str(title), fontsize=10)
    return fig
