"""Gate figures: per-class gate profiles (SE paper, Figs. 6 and 7) and site x channel heat maps.

Paper: Jie Hu, Li Shen, Samuel Albanie, Gang Sun, Enhua Wu, "Squeeze-and-Excitation
Networks", CVPR 2018 / TPAMI 2019, https://arxiv.org/abs/1709.01507, section 7.2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_choice, check_positive_int
from attnblocks.inspect._stats import GateStats, SiteStats
from attnblocks.plot._images import check_figsize, host
from attnblocks.plot._mpl import check_cmap, new_figure, require_matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["gate_class_profile", "gate_heatmap", "gate_profiles"]

GateValue = Literal["mean", "std", "saturation", "specificity"]
_VALUES = ("mean", "std", "saturation", "specificity")


def _check_stats(stats: object, owner: str) -> GateStats:
    if not isinstance(stats, GateStats) or not len(stats):
        raise InvalidInputError(
            f"{owner}: stats must be a GateStats with at least one site (from "
            f"attnblocks.inspect.gate_statistics or GateStats.update), got {stats!r:.80}."
        )
    return stats


def _pick_sites(stats: GateStats, sites: Sequence[str] | None, owner: str) -> list[str]:
    if sites is None:
        return list(stats)
    if isinstance(sites, str):
        raise InvalidArgumentError(f"{owner}: sites must be a list of site names, got {sites!r}.")
    missing = [s for s in sites if s not in stats]
    if missing or not sites:
        raise InvalidArgumentError(
            f"{owner}: unknown sites {missing or sites!r}; the statistics have {list(stats)}."
        )
    return list(sites)


def _site_args(
    stats: object, sites: Sequence[str] | None, ncols: object, owner: str
) -> tuple[GateStats, list[str], int]:
    """The checked ``stats``, the names of the sites to draw and ``ncols``."""
    checked = _check_stats(stats, owner)
    names = _pick_sites(checked, sites, owner)
    return checked, names, check_positive_int(ncols, "ncols", owner=owner)


def _class_names(
    classes: Sequence[int], class_names: Sequence[str] | None, owner: str
) -> list[str]:
    if class_names is None:
        return [f"class {c}" for c in classes]
    if max(classes, default=-1) >= len(class_names):
        raise InvalidArgumentError(
            f"{owner}: class_names has {len(class_names)} names but class {max(classes)} "
            "was asked for; give a name for every class index."
        )
    return [str(class_names[c]) for c in classes]


def _site_figure(
    stats: GateStats, names: list[str], ncols: int, figsize: tuple[float, float] | None, owner: str
) -> tuple[Figure, list[tuple[Axes, str, SiteStats, Any]]]:
    """A figure with one panel per site, ``ncols`` per row, sharing the gate axis.

    Returns the figure and, per site, ``(axes, name, statistics, channel indices)``.
    """
    panels = len(names)
    cols = min(ncols, panels)
    rows = math.ceil(panels / cols)
    fig = new_figure(check_figsize(figsize, (4.0 * cols + 0.4, 2.7 * rows + 1.0), owner=owner))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax in axes[panels:]:
        ax.set_axis_off()
    sites = [stats[name] for name in names]
    return fig, [
        (ax, name, site, torch.arange(site.channels).numpy())
        for ax, name, site in zip(axes, names, sites, strict=False)
    ]


def _channel_axes(ax: Axes, site: SiteStats, ylabel: str) -> None:
    """Label and limit a panel whose x axis is the site's channel index."""
    ax.set_xlabel("channel index", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlim(0, max(site.channels - 1, 1))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _check_class(stats: GateStats, site: SiteStats, class_index: int, owner: str) -> None:
    if (
        isinstance(class_index, bool)
        or not isinstance(class_index, int)
        or not 0 <= class_index < site.num_classes
    ):
        raise InvalidArgumentError(
            f"{owner}: class {class_index!r} is not among the {site.num_classes} classes "
            "with statistics (labels 0 .. num_classes - 1); pass labels when collecting "
            "the statistics."
        )


def gate_profiles(
    stats: GateStats,
    *,
    sites: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    ncols: int = 3,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Mean gate per channel for several classes and for all classes, one panel per site.

    The figure of the SE paper's Fig. 6: where the class curves lie on the all-class
    curve the block is class-agnostic; where they separate, class-specific.

    Args:
        stats: gate statistics collected with labels (:func:`~attnblocks.inspect.
            gate_statistics`); without labels only the all-class mean is drawn.
        sites: the sites to draw, in order; ``None`` for all.
        classes: the class indices to draw; ``None`` for the first four.
        class_names: a name for every class index, for the legend.
        ncols: panels per row.
        title: the figure title.
        figsize: ``(width, height)`` in inches; chosen from the panel count if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import gate_profiles
        >>> import torch
        >>> from attnblocks.inspect import GateStats
        >>> stats = GateStats.from_gates({"layer1.se": torch.rand(40, 16)},
        ...                              labels=torch.arange(40) % 4)
        >>> fig = gate_profiles(stats, class_names=["cat", "dog", "ship", "frog"])
        >>> fig.axes[0].get_title()
        'layer1.se (C=16)'
    """
    owner = "gate_profiles"
    stats, names, ncols = _site_args(stats, sites, ncols, owner)
    k = stats.num_classes
    chosen = list(range(min(k, 4))) if classes is None else list(classes)
    for c in chosen:
        _check_class(stats, stats[names[0]], c, owner)
    labels = _class_names(chosen, class_names, owner)
    fig, panels = _site_figure(stats, names, ncols, figsize, owner)
    colors = require_matplotlib().colormaps["tab10"].colors
    for ax, name, site, x in panels:
        class_mean = site.class_mean
        for i, (c, label) in enumerate(zip(chosen, labels, strict=True)):
            ax.plot(x, class_mean[c].numpy(), color=colors[i % 10], lw=1.0, label=label)
        ax.plot(x, site.mean.numpy(), color="black", lw=1.6, ls="--", label="all classes")
        ax.set_title(f"{name} (C={site.channels})", fontsize=9)
        _channel_axes(ax, site, "mean gate")
        handles, legend_labels = ax.get_legend_handles_labels()
    fig.legend(
        handles, legend_labels, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8
    )
    fig.suptitle(title if title is not None else "SE gate profiles per class", fontsize=11)
    return fig


def gate_class_profile(
    stats: GateStats,
    class_index: int,
    *,
    sites: Sequence[str] | None = None,
    class_name: str | None = None,
    show_overall: bool = True,
    ncols: int = 3,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Mean +/- one standard deviation of the gates for one class, one panel per site.

    The figure of the SE paper's Fig. 7: a narrow band means the block treats every
    image of the class alike.

    Args:
        stats: gate statistics collected with labels.
        class_index: the class to draw.
        sites: the sites to draw; ``None`` for all.
        class_name: the class's name for the legend and title.
        show_overall: also draw the all-class mean, dashed.
        ncols: panels per row.
        title: the figure title.
        figsize: ``(width, height)`` in inches; chosen from the panel count if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import gate_class_profile
        >>> import torch
        >>> from attnblocks.inspect import GateStats
        >>> stats = GateStats.from_gates({"s": torch.rand(30, 8)}, labels=torch.arange(30) % 3)
        >>> fig = gate_class_profile(stats, 1, class_name="dog")
        >>> fig.get_suptitle()
        'SE gates for class dog: mean +/- std'
    """
    owner = "gate_class_profile"
    stats, names, ncols = _site_args(stats, sites, ncols, owner)
    _check_class(stats, stats[names[0]], class_index, owner)
    label = class_name if class_name is not None else f"class {class_index}"
    fig, panels = _site_figure(stats, names, ncols, figsize, owner)
    color = require_matplotlib().colormaps["tab10"].colors[0]
    for ax, name, site, x in panels:
        mean = site.class_mean[class_index]
        std = site.class_std()[class_index].nan_to_num(0.0)
        ax.fill_between(
            x,
            (mean - std).numpy(),
            (mean + std).numpy(),
            color=color,
            alpha=0.3,
            lw=0,
            label=f"{label}: mean +/- std",
        )
        ax.plot(x, mean.numpy(), color=color, lw=1.2, label=f"{label}: mean")
        if show_overall:
            ax.plot(x, site.mean.numpy(), color="black", lw=1.0, ls="--", label="all classes: mean")
        ax.set_title(
            f"{name} (C={site.channels}, n={int(site.class_count[class_index])})", fontsize=9
        )
        _channel_axes(ax, site, "gate")
        handles, legend_labels = ax.get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(
        title if title is not None else f"SE gates for class {label}: mean +/- std", fontsize=11
    )
    return fig


def _site_vectors(
    values: GateStats | Mapping[str, torch.Tensor],
    value: str,
    class_index: int | None,
    owner: str,
) -> dict[str, torch.Tensor]:
    if isinstance(values, GateStats):
        _check_stats(values, owner)
        out = {}
        for name, site in values.items():
            if class_index is not None:
                _check_class(values, site, class_index, owner)
                if value == "mean":
                    out[name] = site.class_mean[class_index]
                elif value == "std":
                    out[name] = site.class_std()[class_index]
                else:
                    raise InvalidArgumentError(
                        f"{owner}: class_index works with value='mean' or 'std', got {value!r}."
                    )
            elif value == "mean":
                out[name] = site.mean
            elif value == "std":
                out[name] = site.std()
            elif value == "saturation":
                out[name] = site.saturation
            else:
                out[name] = site.class_specificity()
        return out
    if not isinstance(values, Mapping) or not values:
        raise InvalidInputError(
            f"{owner}: values must be a GateStats or a non-empty mapping {{site: tensor}}, got "
            f"{type(values).__name__}."
        )
    out = {}
    for name, t in values.items():
        if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInputError(
                f"{owner}: values[{name!r}] must be a (C,) vector or (N, C) gates, got {got}."
            )
        values_of = host(t, owner=owner, name=f"values[{name!r}]", dtype=torch.float64)
        out[name] = values_of if t.dim() == 1 else values_of.mean(0)
    return out


def gate_heatmap(
    values: GateStats | Mapping[str, torch.Tensor],
    *,
    value: GateValue = "mean",
    class_index: int | None = None,
    sites: Sequence[str] | None = None,
    log: bool = False,
    cmap: str = "viridis",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """A sites x channels heat map of one gate statistic.

    Rows are sites in model order, columns channel indices; sites with fewer
    channels than the widest are padded with grey.

    Args:
        values: a :class:`~attnblocks.inspect.GateStats`, or a mapping ``{site: (C,)
            values}`` or ``{site: (N, C) gates}`` (averaged over rows), e.g. ``rec.gates``.
        value: with ``GateStats``: ``"mean"``, ``"std"``, ``"saturation"`` (share of
            gates at or above the threshold) or ``"specificity"`` (between- / within-class
            variance; ``inf`` is drawn at the largest finite value).
        class_index: with ``GateStats`` and ``value`` ``"mean"`` or ``"std"``: that
            class's statistic instead of the all-class one.
        sites: the sites (rows) to draw; ``None`` for all.
        log: use a logarithmic colour scale (useful for specificity).
        cmap: the colour map.
        title: the figure title.
        figsize: ``(width, height)`` in inches; chosen from the matrix size if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import gate_heatmap
        >>> import torch
        >>> fig = gate_heatmap({"layer1.se": torch.rand(10, 16), "layer2.se": torch.rand(10, 32)})
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['layer1.se', 'layer2.se']
    """
    owner = "gate_heatmap"
    check_cmap(cmap, owner=owner)
    check_choice(value, "value", _VALUES, owner=owner)
    vectors = _site_vectors(values, value, class_index, owner)
    if sites is not None:
        missing = [s for s in sites if s not in vectors]
        if missing or isinstance(sites, str) or not sites:
            raise InvalidArgumentError(
                f"{owner}: unknown sites {missing or sites!r}; available: {list(vectors)}."
            )
        vectors = {s: vectors[s] for s in sites}
    width = max(v.numel() for v in vectors.values())
    matrix = torch.full((len(vectors), width), float("nan"), dtype=torch.float64)
    for i, v in enumerate(vectors.values()):
        matrix[i, : v.numel()] = v
    finite = matrix[torch.isfinite(matrix)]
    if finite.numel():
        matrix = torch.where(torch.isinf(matrix), finite.max(), matrix)
    mpl = require_matplotlib()
    base = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    colormap = base.with_extremes(bad="#d9d9d9")
    norm = None
    if log:
        positive = finite[finite > 0]
        if not positive.numel():
            raise InvalidArgumentError(f"{owner}: log=True needs positive values; all are <= 0.")
        norm = mpl.colors.LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
        matrix = torch.where(matrix > 0, matrix, float("nan"))
    rows = len(vectors)
    fig = new_figure(check_figsize(figsize, (8.0, 0.32 * rows + 1.8), owner=owner))
    ax = fig.subplots()
    image = ax.imshow(
        matrix.numpy(), aspect="auto", interpolation="nearest", cmap=colormap, norm=norm
    )
    ax.set_yticks(range(rows), list(vectors), fontsize=8)
    ax.set_xlabel("channel index", fontsize=9)
    label = {
        "mean": "mean gate",
        "std": "gate std",
        "saturation": "share of saturated gates",
        "specificity": "class specificity (between / within var.)",
    }[value]
    if class_index is not None:
        label = f"{label}, class {class_index}"
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label(label, fontsize=8)
    ax.set_title(
        title if title is not None else f"SE gates per site and channel: {label}", fontsize=10
    )
    return fig
