"""What the map-over-image figures share: their input checks and their grid of panels.

:func:`~attnblocks.plot.gradcam_overlay` and :func:`~attnblocks.plot.spatial_map_overlay`
both draw a row of images and, under it, one row per labelled set of maps laid over
the same images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from attnblocks._errors import InvalidInputError
from attnblocks.inspect._maps import check_upsample
from attnblocks.plot._images import as_batch, to_rgb
from attnblocks.plot._mpl import check_cmap

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["draw_overlays", "overlay_inputs"]


def overlay_inputs(
    images: object,
    maps: object,
    *,
    max_images: int,
    cmap: object,
    upsample: object,
    name: str,
    default_label: str,
    empty_hint: str = "",
    owner: str,
) -> tuple[torch.Tensor, int, dict[Any, Any]]:
    """Check the colour map, the upsampling mode and the images; label the map sets.

    Args:
        images: the images argument, ``(N, C, H, W)`` or one ``(C, H, W)``.
        maps: one map tensor, or a mapping ``{label: maps}``.
        max_images: show at most this many images (already checked).
        cmap, upsample: checked here.
        name: the maps argument's name, for the message about an empty mapping.
        default_label: the row label of a single map tensor.
        empty_hint: appended to the message about an empty mapping.
        owner: the public function, for messages.

    Returns:
        ``(images as a batch, the number of images shown, {label: maps})``; the
        maps themselves are checked by the caller.
    """
    check_cmap(cmap, owner=owner)
    check_upsample(None, upsample, owner=owner)
    batch = as_batch(images, owner=owner)
    n = min(batch.shape[0], max_images)
    sets = dict(maps) if isinstance(maps, Mapping) else {default_label: maps}
    if not sets:
        raise InvalidInputError(
            f"{owner}: {name} is an empty mapping; give at least one map set{empty_hint}."
        )
    return batch, n, sets


def draw_overlays(
    axes: Any,
    batch: torch.Tensor,
    rows: Sequence[torch.Tensor],
    limits: Sequence[tuple[float, float]],
    labels: Sequence[str],
    *,
    titles: Sequence[str] | None,
    mean: Sequence[float] | torch.Tensor | None,
    std: Sequence[float] | torch.Tensor | None,
    cmap: str,
    alpha: float,
    label_size: float,
    owner: str,
) -> None:
    """Draw the images in the first row of ``axes`` and each map row over them below.

    Args:
        axes: ``1 + len(rows)`` rows of ``n`` axes (``axes[r][j]``).
        batch: the images; the first ``n`` are drawn.
        rows: per map row, ``(n, H, W)`` maps at image size.
        limits: per map row, the colour scale ``(vmin, vmax)``.
        labels: per map row, its label (the first row is labelled ``"input"``).
        titles: one title per image column, or ``None``.
        mean, std: the normalisation of the images, undone for display.
        cmap, alpha: the heat maps' colour map and opacity.
        label_size: the font size of the row labels.
        owner: the public function, for messages.
    """
    n = len(axes[0])
    for j in range(n):
        rgb = to_rgb(batch[j], mean=mean, std=std, owner=owner)
        gray = "gray" if rgb.ndim == 2 else None
        axes[0][j].imshow(rgb, cmap=gray)
        if titles is not None:
            axes[0][j].set_title(str(titles[j]), fontsize=8)
        for r, (maps, (lo, hi)) in enumerate(zip(rows, limits, strict=True), start=1):
            axes[r][j].imshow(rgb, cmap=gray)
            axes[r][j].imshow(maps[j].numpy(), cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)
    for r, label in enumerate(["input", *labels]):
        ax: Axes
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r][0].set_ylabel(label, fontsize=label_size)
