"""Training curves: per-iteration loss and per-epoch loss/accuracy, one or several runs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_positive_int
from attnblocks.plot._images import check_figsize
from attnblocks.plot._mpl import new_figure, require_matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["training_curves"]

_EPOCH_KEY = re.compile(r"(?P<split>[A-Za-z0-9]+)_(?P<metric>loss|acc|accuracy)")
_STYLES = {"train": "-", "val": "--", "valid": "--", "validation": "--", "test": ":"}
History = Mapping[str, Sequence[float]]


def _as_floats(values: Any, key: str, owner: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        try:
            values = list(values)
        except TypeError:
            raise InvalidInputError(
                f"{owner}: {key} must be a sequence of numbers, got {type(values).__name__}."
            ) from None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{owner}: {key} must contain only numbers.") from None


def _is_history(obj: object) -> bool:
    return isinstance(obj, Mapping) and not any(isinstance(v, Mapping) for v in obj.values())


def _moving_average(values: list[float], window: int) -> list[float]:
    if window <= 1 or len(values) < window:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    cs = torch.cat([t.new_zeros(1), t.cumsum(0)])
    return ((cs[window:] - cs[:-window]) / window).tolist()


def training_curves(
    runs: History | Mapping[str, History],
    *,
    smooth: int = 1,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Loss and accuracy curves of one or several training runs on shared axes.

    A *history* is a mapping of lists: ``"iter_loss"`` (the loss of every iteration)
    and per-epoch values named ``<split>_loss`` and ``<split>_acc`` (or
    ``<split>_accuracy``), e.g. ``train_loss``, ``val_loss``, ``train_acc``,
    ``test_acc``. Pass one history, or ``{run name: history}`` to compare runs: each
    run gets a colour, each split a line style (train solid, val dashed, test
    dotted). Only panels with data are drawn: iteration loss, epoch loss, accuracy.

    Args:
        runs: a history or a mapping of run names to histories.
        smooth: moving-average window for the iteration loss (the raw curve stays
            visible, faint).
        title: the figure title.
        figsize: ``(width, height)`` in inches; chosen from the panel count if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> from attnblocks.plot import training_curves
        >>> fig = training_curves({
        ...     "ResNet-20": {"iter_loss": [2.3, 1.9, 1.6, 1.5], "train_acc": [0.4, 0.6],
        ...                   "val_acc": [0.38, 0.55]},
        ...     "SE-ResNet-20": {"iter_loss": [2.3, 1.8, 1.5, 1.3], "train_acc": [0.45, 0.65],
        ...                      "val_acc": [0.42, 0.6]}})
        >>> [ax.get_title() for ax in fig.axes]
        ['loss per iteration', 'accuracy per epoch']
    """
    owner = "training_curves"
    smooth = check_positive_int(smooth, "smooth", owner=owner)
    if _is_history(runs):
        named: dict[str, Any] = {"": runs}
    elif isinstance(runs, Mapping) and runs and all(_is_history(h) for h in runs.values()):
        named = dict(runs)
    else:
        raise InvalidInputError(
            f"{owner}: runs must be a history {{'iter_loss': [...], 'train_acc': [...], ...}} "
            f"or a mapping {{run name: history}}, got {type(runs).__name__}."
        )
    panels: dict[str, list[tuple[str, str, list[float]]]] = {"iter": [], "loss": [], "acc": []}
    for run, history in named.items():
        if not history:
            raise InvalidInputError(f"{owner}: the history of run {run!r} is empty.")
        for key, values in history.items():
            floats = _as_floats(values, f"{run + ': ' if run else ''}{key}", owner)
            if key == "iter_loss":
                panels["iter"].append((run, "train", floats))
                continue
            match = _EPOCH_KEY.fullmatch(str(key))
            if match is None:
                raise InvalidArgumentError(
                    f"{owner}: unknown history key {key!r}; valid keys are 'iter_loss' and "
                    "'<split>_loss', '<split>_acc', '<split>_accuracy' (e.g. 'train_loss', "
                    "'val_acc')."
                )
            metric = "loss" if match["metric"] == "loss" else "acc"
            panels[metric].append((run, match["split"], floats))
    used = [p for p in ("iter", "loss", "acc") if panels[p]]
    fig = new_figure(check_figsize(figsize, (4.3 * len(used) + 0.3, 3.6), owner=owner))
    axes = fig.subplots(1, len(used), squeeze=False)[0]
    colors = require_matplotlib().colormaps["tab10"].colors
    from matplotlib import ticker

    color_of = {run: colors[i % 10] for i, run in enumerate(named)}
    titles = {"iter": "loss per iteration", "loss": "loss per epoch", "acc": "accuracy per epoch"}
    for ax, panel in zip(axes, used, strict=True):
        _draw_panel(ax, panel, panels[panel], color_of, smooth)
        ax.set_title(titles[panel], fontsize=10)
        ax.set_xlabel("iteration" if panel == "iter" else "epoch", fontsize=9)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if panel == "acc" else "loss", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title is not None:
        fig.suptitle(title, fontsize=11)
    return fig


def _draw_panel(
    ax: Axes,
    panel: str,
    lines: list[tuple[str, str, list[float]]],
    color_of: dict[str, Any],
    smooth: int,
) -> None:
    for run, split, values in lines:
        color = color_of[run]
        if panel == "iter":
            x = list(range(1, len(values) + 1))
            label = run or "train"
            if smooth > 1 and len(values) >= smooth:
                ax.plot(x, values, color=color, alpha=0.25, lw=0.6)
                avg = _moving_average(values, smooth)
                ax.plot(x[smooth - 1 :], avg, color=color, lw=1.3, label=f"{label} (avg {smooth})")
            else:
                ax.plot(x, values, color=color, lw=1.0, label=label)
            continue
        x = list(range(1, len(values) + 1))
        label = f"{run}: {split}" if run else split
        marker = "o" if len(values) <= 30 else None
        ax.plot(
            x,
            values,
            color=color,
            ls=_STYLES.get(split, "-."),
            marker=marker,
            ms=3,
            lw=1.2,
            label=label,
        )
