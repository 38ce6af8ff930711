"""What the map-over-image figures share: their input checks and their grid of panels.

:func:`~attnblocks.plot.gradcam_overlay` and :func:`~attnblocks.plot.spatial_map_overlay`
both draw a row of images and, under it, one row per labelled set of maps laid over
the same images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks.inspect._maps import check_upsample
from attnblocks.plot._images import as_batch, to_rgb
from attnblocks.plot._mpl import check_cmap

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["OverlayStyle", "check_titles", "draw_rows", "map_sets", "overlay_batch"]


@dataclass(frozen=True)
class OverlayStyle:
    """How the maps are drawn over the images, and for whom (``owner``, in messages)."""

    cmap: str
    alpha: float
    mean: Sequence[float] | torch.Tensor | None
    std: Sequence[float] | torch.Tensor | None
    owner: str


def overlay_batch(
    images: object, max_images: int, upsample: object, style: OverlayStyle
) -> tuple[torch.Tensor, int]:
    """Check the colour map and the upsampling mode; return the images as a batch and
    how many of them are shown (at most ``max_images``, already checked)."""
    check_cmap(style.cmap, owner=style.owner)
    check_upsample(None, upsample, owner=style.owner)
    batch = as_batch(images, owner=style.owner)
    return batch, min(batch.shape[0], max_images)


def map_sets(maps: object, name: str, label: str, *, owner: str, hint: str = "") -> dict[Any, Any]:
    """``{label: maps}`` for one map tensor, a copy of a mapping; an empty one is refused
    (``name`` is the argument's name, ``hint`` ends the message)."""
    sets = dict(maps) if isinstance(maps, Mapping) else {label: maps}
    if not sets:
        raise InvalidInputError(
            f"{owner}: {name} is an empty mapping; give at least one map set{hint}."
        )
    return sets


def check_titles(titles: Sequence[str] | None, n: int, *, owner: str) -> None:
    """Refuse fewer column titles than images shown."""
    if titles is not None and len(titles) < n:
        raise InvalidArgumentError(
            f"{owner}: got {len(titles)} titles for {n} images; give one title per image."
        )


def draw_rows(
    axes: Any,
    batch: torch.Tensor,
    rows: Sequence[tuple[Any, torch.Tensor, tuple[float, float]]],
    titles: Sequence[str] | None,
    style: OverlayStyle,
    *,
    label_size: float,
) -> None:
    """Draw the images in the first row of ``axes`` and each map row over them below.

    Args:
        axes: ``1 + len(rows)`` rows of ``n`` axes (``axes[r][j]``).
        batch: the images; the first ``n`` are drawn.
        rows: ``(row label, (n, H, W) maps at image size, (vmin, vmax))`` per map
            row; the first row is labelled ``"input"``.
        titles: one title per image column, or ``None``.
        style: the colour map, opacity and image normalisation.
        label_size: the font size of the row labels.
    """
    n = len(axes[0])
    for j in range(n):
        rgb = to_rgb(batch[j], mean=style.mean, std=style.std, owner=style.owner)
        gray = "gray" if rgb.ndim == 2 else None
        axes[0][j].imshow(rgb, cmap=gray)
        if titles is not None:
            axes[0][j].set_title(str(titles[j]), fontsize=8)
        for r, (_, maps, (lo, hi)) in enumerate(rows, start=1):
            axes[r][j].imshow(rgb, cmap=gray)
            axes[r][j].imshow(maps[j].numpy(), cmap=style.cmap, alpha=style.alpha, vmin=lo, vmax=hi)
    for r, label in enumerate(["input", *(row[0] for row in rows)]):
        ax: Axes
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r][0].set_ylabel(label, fontsize=label_size)
