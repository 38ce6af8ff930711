"""Confusion matrix figure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_choice, check_positive_int
from attnblocks.inspect._metrics import as_tensor_or_none
from attnblocks.plot._images import check_figsize
from attnblocks.plot._mpl import check_cmap, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["confusion_matrix"]

Normalization = Literal["true", "pred", "all", "none"]
_NORMALIZE = {
    "true": "share of each true class",
    "pred": "share of each predicted class",
    "all": "share of all samples",
    "none": "count",
}


#: The most classes a confusion matrix is drawn for (its cells grow as the square).
MAX_CLASSES = 4096


def _labels(values: object, name: str, owner: str) -> torch.Tensor:
    t = as_tensor_or_none(values, arrays_only=False)
    if t is None:
        raise InvalidInputError(
            f"{owner}: {name} must be a 1-D sequence or tensor of class indices, got "
            f"{type(values).__name__}."
        )
    if t.is_meta:
        raise InvalidInputError(
            f"{owner}: {name} is on the meta device, which holds shapes but no values."
        )
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(
            f"{owner}: {name} must be a 1-D tensor of integer class indices, got shape "
            f"{tuple(t.shape)} and dtype {t.dtype}."
        )
    if t.numel() and int(t.min()) < 0:
        raise InvalidInputError(f"{owner}: {name} contains the negative class {int(t.min())}.")
    return t.detach().cpu().long()


def confusion_matrix(
    targets: Sequence[int] | torch.Tensor,
    predictions: Sequence[int] | torch.Tensor,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    normalize: Normalization = "true",
    annotate: bool | None = None,
    cmap: str = "Blues",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """The confusion matrix of ``predictions`` against ``targets`` (true classes in rows).

    Args:
        targets: the true class of every sample.
        predictions: the predicted class of every sample (same length).
        num_classes: the number of classes; ``None`` uses ``len(class_names)`` or the
            largest index seen + 1.
        class_names: the tick labels.
        normalize: ``"true"`` (rows sum to 1), ``"pred"`` (columns sum to 1), ``"all"``
            or ``"none"`` (raw counts).
        annotate: write the value in each cell; ``None`` does so up to 15 classes.
        cmap: the colour map.
        title: the figure title; by default it states the accuracy.
        figsize: ``(width, height)`` in inches; chosen from the class count if ``None``.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Example:
        >>> fig = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], class_names=["a", "b", "c"])
        >>> fig.axes[0].get_title()
        'Confusion matrix, accuracy 75.0% (n=4)'
    """
    owner = "confusion_matrix"
    check_choice(normalize, "normalize", tuple(_NORMALIZE), owner=owner)
    check_cmap(cmap, owner=owner)
    t = _labels(targets, "targets", owner)
    p = _labels(predictions, "predictions", owner)
    if t.numel() != p.numel():
        raise InvalidInputError(
            f"{owner}: got {t.numel()} targets but {p.numel()} predictions; they must pair up."
        )
    if t.numel() == 0:
        raise InvalidInputError(f"{owner}: targets and predictions are empty.")
    seen = int(max(int(t.max()), int(p.max()))) + 1
    if class_names is not None and (
        isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence)
    ):
        raise InvalidArgumentError(
            f"{owner}: class_names must be a list of names, one per class, got {class_names!r:.60}."
        )
    if num_classes is not None:
        k = check_positive_int(num_classes, "num_classes", owner=owner)
        source = f"num_classes={k}"
    elif class_names is not None:
        k, source = len(class_names), f"{len(class_names)} class_names"
    else:
        k, source = seen, ""
    if k > MAX_CLASSES:
        found = f"{source} asks" if source else f"the largest class index found, {seen - 1}, asks"
        raise InvalidArgumentError(
            f"{owner}: {found} for {k} classes, more than the {MAX_CLASSES} a confusion matrix "
            "is drawn for. targets and predictions must be class indices (e.g. "
            "logits.argmax(1)); check them for sample ids or other large numbers."
        )
    if k < seen:
        raise InvalidArgumentError(
            f"{owner}: {source} is too few for class index {seen - 1} found in the targets "
            f"or predictions (indices must be below the number of classes)."
        )
    if class_names is not None and len(class_names) != k:
        raise InvalidArgumentError(f"{owner}: got {len(class_names)} class names for {k} classes.")
    counts = torch.bincount(t * k + p, minlength=k * k).view(k, k).double()
    if normalize == "true":
        shown = counts / counts.sum(1, keepdim=True).clamp(min=1)
    elif normalize == "pred":
        shown = counts / counts.sum(0, keepdim=True).clamp(min=1)
    elif normalize == "all":
        shown = counts / counts.sum()
    else:
        shown = counts
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(k)]
    side = min(max(3.6, 0.5 * k + 2.2), 14.0)
    fig = new_figure(check_figsize(figsize, (side + 0.9, side), owner=owner))
    ax = fig.subplots()
    vmax = 1.0 if normalize != "none" else float(shown.max())
    image = ax.imshow(shown.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(
        range(k),
        names,
        rotation=45 if max(map(len, names)) > 2 else 0,
        ha="right" if max(map(len, names)) > 2 else "center",
        fontsize=8,
    )
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted class", fontsize=9)
    ax.set_ylabel("true class", fontsize=9)
    if annotate is None:
        annotate = k <= 15
    if annotate:
        for i in range(k):
            for j in range(k):
                v = float(shown[i, j])
                text = f"{int(v)}" if normalize == "none" else f"{100 * v:.0f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.6 * vmax else "black",
                )
    bar = fig.colorbar(image, ax=ax, shrink=0.85, pad=0.02)
    bar.set_label(
        _NORMALIZE[normalize] + (" (cells in %)" if annotate and normalize != "none" else ""),
        fontsize=8,
    )
    accuracy = float(counts.trace() / counts.sum())
    default = f"Confusion matrix, accuracy {100 * accuracy:.1f}% (n={t.numel()})"
    ax.set_title(title if title is not None else default, fontsize=10)
    return fig
