"""Summary metrics of recorded gates: saturation and class specificity.

The SE paper (Hu et al., 2018, arXiv:1709.01507, section 7.2) observes that early
blocks excite channels in a class-agnostic way, later blocks become class-specific,
and the last blocks saturate (most gates near 1) so that they act almost as
identities. These two numbers measure exactly that for any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import overload

import torch

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_positive_int, is_real

__all__ = ["class_specificity", "saturation"]


#: The most classes a tool infers from the labels alone (largest label + 1): a larger
#: label is far more likely a bug (a sample id, a hash, logits taken for labels) than a
#: class, and its per-class tables would not fit in memory. Pass ``num_classes`` to go
#: beyond, up to :data:`MAX_CLASSES`.
MAX_INFERRED_CLASSES = 1 << 16
#: The most classes ``num_classes`` may declare.
MAX_CLASSES = 1 << 24


def check_gates(gates: object, *, owner: str, name: str = "gates") -> torch.Tensor:
    """Check that ``gates`` is a floating ``(N, C)`` tensor with values and return it."""
    if not isinstance(gates, torch.Tensor):
        raise InvalidInputError(
            f"{owner}: {name} must be a torch.Tensor of shape (N, C), got {type(gates).__name__}."
        )
    if gates.dim() != 2 or not gates.is_floating_point():
        raise InvalidInputError(
            f"{owner}: {name} must be a floating (N, C) tensor, got shape {tuple(gates.shape)} "
            f"and dtype {gates.dtype}."
        )
    if gates.is_meta:
        raise InvalidInputError(
            f"{owner}: {name} is on the meta device, which holds shapes but no values; "
            "record the gates of a model on a real device."
        )
    return gates


def check_num_classes(num_classes: object, *, owner: str) -> int | None:
    """Return ``num_classes`` (``None`` or an int in ``1 .. MAX_CLASSES``), else raise."""
    if num_classes is None:
        return None
    value = check_positive_int(num_classes, "num_classes", owner=owner)
    if value > MAX_CLASSES:
        raise InvalidArgumentError(
            f"{owner}: num_classes={value} is more than {MAX_CLASSES} classes; per-class "
            "tables that large would not fit in memory."
        )
    return value


def as_tensor_or_none(values: object, *, arrays_only: bool) -> torch.Tensor | None:
    """``values`` as a tensor (a tensor is returned as it is), or ``None`` if it is none.

    With ``arrays_only`` only lists, tuples and array-likes (``__array__``) are
    converted; otherwise anything :func:`torch.as_tensor` takes except ``None``,
    ``str`` and ``bytes``. An empty sequence converts to float32; it is returned as
    int64, since it is empty, not fractional.

    >>> as_tensor_or_none([], arrays_only=True).dtype, as_tensor_or_none("01", arrays_only=False)
    (torch.int64, None)
    """
    if isinstance(values, torch.Tensor):
        return values
    if values is None or isinstance(values, (str, bytes)):
        return None
    if arrays_only and not (isinstance(values, (list, tuple)) or hasattr(values, "__array__")):
        return None
    try:
        converted = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        return None
    return converted.long() if converted.numel() == 0 else converted


def check_labels(
    labels: object, rows: int, *, owner: str, num_classes: int | None = None
) -> torch.Tensor:
    """Return ``labels`` as a 1-D int64 tensor of ``rows`` class indices in range, else raise.

    Lists, tuples and numpy arrays of ints are converted. The indices must be ``>= 0``
    and below ``num_classes`` when it is given, else below :data:`MAX_INFERRED_CLASSES`.
    """
    converted = as_tensor_or_none(labels, arrays_only=True)
    if converted is None:
        raise InvalidInputError(
            f"{owner}: labels must be class indices: a 1-D integer torch.Tensor, numpy "
            f"array or list of ints, got {type(labels).__name__} {labels!r:.60}."
        )
    labels = converted
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise InvalidInputError(
            f"{owner}: labels must be a 1-D tensor of integer class indices, got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}."
        )
    if labels.is_meta:
        raise InvalidInputError(
            f"{owner}: labels are on the meta device, which holds no values; pass real labels."
        )
    if labels.numel() != rows:
        raise InvalidInputError(
            f"{owner}: got {labels.numel()} labels for {rows} rows of gates; give one label "
            "per sample (if a block runs several times per forward pass, record its gates "
            "without labels)."
        )
    if rows and int(labels.min()) < 0:
        raise InvalidInputError(
            f"{owner}: labels must be class indices >= 0, got {int(labels.min())}."
        )
    if rows:
        top = int(labels.max())
        if num_classes is not None and top >= num_classes:
            raise InvalidInputError(
                f"{owner}: label {top} is out of range for num_classes={num_classes} "
                f"(valid labels are 0...{num_classes - 1})."
            )
        if num_classes is None and top >= MAX_INFERRED_CLASSES:
            raise InvalidInputError(
                f"{owner}: label {top} would mean {top + 1} classes; labels must be class "
                f"indices, and without num_classes at most {MAX_INFERRED_CLASSES} classes are "
                "inferred. Pass num_classes= if there really are that many."
            )
    return labels.to(torch.long)


def check_threshold(threshold: object, *, owner: str) -> float:
    """Check that ``threshold`` is a finite real number."""
    if not is_real(threshold):
        raise InvalidArgumentError(
            f"{owner}: threshold must be a number, got {threshold!r} "
            f"(type {type(threshold).__name__})."
        )
    value = float(threshold)
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgumentError(f"{owner}: threshold must be finite, got {threshold!r}.")
    return value


def specificity_from_moments(
    counts: torch.Tensor, means: torch.Tensor, m2: torch.Tensor, *, per_channel: bool
) -> torch.Tensor:
    """Between-class over within-class variance from per-class counts, means and M2.

    Args:
        counts: ``(K,)`` samples per class.
        means: ``(K, C)`` per-class means (any value where the count is 0).
        m2: ``(K, C)`` per-class sums of squared deviations from the class mean.
        per_channel: return the ratio per channel ``(C,)``, else the ratio of the
            totals over channels (a scalar).
    """
    counts = counts.to(torch.float64)
    present = counts > 0
    counts, means, m2 = counts[present], means[present].double(), m2[present].double()
    total = counts.sum()
    if total == 0:
        shape = (means.shape[-1],) if per_channel else ()
        return torch.zeros(shape, dtype=torch.float64)
    grand = (counts[:, None] * means).sum(0) / total
    between = (counts[:, None] * (means - grand) ** 2).sum(0) / total
    within = m2.sum(0) / total
    if not per_channel:
        between, within = between.sum(), within.sum()
    ratio = between / within
    ratio = torch.where(within > 0, ratio, torch.where(between > 0, torch.inf, 0.0))
    return ratio


@overload
def saturation(
    gates: torch.Tensor, *, threshold: float = ..., per_channel: bool = ...
) -> torch.Tensor: ...
@overload
def saturation(
    gates: Mapping[str, torch.Tensor], *, threshold: float = ..., per_channel: bool = ...
) -> dict[str, torch.Tensor]: ...
def saturation(
    gates: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    threshold: float = 0.9,
    per_channel: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The share of gates at or above ``threshold`` ("near 1": the block lets them pass).

    A block whose gates are almost all saturated behaves nearly as an identity (SE
    paper, section 7.2). Gates are compared as recorded, so for blocks with
    ``gate_scale != 1`` (``init="identity"``) pick the threshold on that scale.

    Args:
        gates: an ``(N, C)`` gate tensor, or a mapping such as ``rec.gates``.
        threshold: gates ``>= threshold`` count as saturated.
        per_channel: return one share per channel ``(C,)`` instead of one overall.

    Returns:
        A float64 tensor (scalar or ``(C,)``), or a dict of them for a mapping.

    Example:
        >>> from attnblocks.inspect import saturation
        >>> import torch
        >>> saturation(torch.tensor([[0.95, 0.2], [0.99, 0.5]]))
        tensor(0.5000, dtype=torch.float64)
        >>> saturation(torch.tensor([[0.95, 0.2], [0.99, 0.5]]), per_channel=True)
        tensor([1., 0.], dtype=torch.float64)
    """
    owner = "saturation"
    value = check_threshold(threshold, owner=owner)
    if isinstance(gates, Mapping):
        return {
            name: saturation(g, threshold=value, per_channel=per_channel)
            for name, g in gates.items()
        }
    g = check_gates(gates, owner=owner)
    hits = (g >= value).to(torch.float64)
    if g.shape[0] == 0:
        return torch.full((g.shape[1],) if per_channel else (), float("nan"), dtype=torch.float64)
    return hits.mean(0) if per_channel else hits.mean()


def class_specificity(
    gates: torch.Tensor,
    labels: torch.Tensor,
    *,
    per_channel: bool = True,
) -> torch.Tensor:
    r"""How much a block's gates differ between classes: between- / within-class variance.

    For channel :math:`c` with class means :math:`\mu_{k,c}`, class sizes :math:`n_k`
    and overall mean :math:`\mu_c`, the ratio is
    :math:`\frac{\sum_k n_k (\mu_{k,c} - \mu_c)^2}{\sum_k \sum_{i \in k} (s_{i,c} -
    \mu_{k,c})^2}` (Fisher's ratio). 0 means the gates ignore the class; large values
    mean the class explains most of the gate's variation. A channel that never varies
    gets 0, one that is constant within each class but differs between classes gets
    ``inf``.

    Args:
        gates: ``(N, C)`` recorded gates.
        labels: ``(N,)`` integer class of each row.
        per_channel: return ``(C,)`` ratios; with ``False`` one ratio of the
            variances summed over channels, a single number per site.

    Returns:
        A float64 tensor, ``(C,)`` or scalar.

    Example:
        >>> from attnblocks.inspect import class_specificity
        >>> import torch
        >>> gates = torch.tensor(
        ...     [[0.1, 0.5], [0.2, 0.6], [0.9, 0.4], [0.8, 0.7]], dtype=torch.float64)
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> [round(v, 6) for v in class_specificity(gates, labels).tolist()]
        [49.0, 0.0]
    """
    owner = "class_specificity"
    g = check_gates(gates, owner=owner).double()
    y = check_labels(labels, g.shape[0], owner=owner).to(g.device)
    k = int(y.max()) + 1 if y.numel() else 0
    counts = torch.zeros(k, dtype=torch.float64, device=g.device).index_add_(
        0, y, torch.ones_like(y, dtype=torch.float64)
    )
    sums = torch.zeros(k, g.shape[1], dtype=torch.float64, device=g.device).index_add_(0, y, g)
    means = sums / counts.clamp(min=1)[:, None]
    dev = g - means[y]
    m2 = torch.zeros_like(sums).index_add_(0, y, dev * dev)
    return specificity_from_moments(counts.cpu(), means.cpu(), m2.cpu(), per_channel=per_channel)
