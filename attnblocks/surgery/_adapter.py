"""Train only the inserted attention (adapter-style fine-tuning of a trained backbone)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from attnblocks._errors import InvalidArgumentError, SurgeryError
from attnblocks._validation import check_bool
from attnblocks.surgery._record import inserted_sites
from attnblocks.surgery._selectors import Selector, resolve_selectors

__all__ = ["NORM_LAYERS", "attention_parameters", "freeze_except_attention"]

#: The module classes ``train_norms=True`` keeps trainable (subclasses included):
#: batch, instance, group and layer norms (and ``nn.RMSNorm`` where torch has it).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _check_model(model: object, owner: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be an nn.Module, got {type(model).__name__}."
        )
    return model


def _unique(parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    kept = []
    for param in parameters:
        if id(param) not in seen:
            seen.add(id(param))
            kept.append(param)
    return kept


def attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the blocks inserted into ``model``, in model order, each once.

    Empty for a model without inserted blocks. Pass them to an optimiser to train
    the attention alone (:func:`freeze_except_attention` also stops gradients to the
    rest, which saves the backbone's weight gradients).

    Example:
        >>> from torch import nn
        >>> from attnblocks import attention_parameters, insert_se
        >>> net = insert_se(nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32)), ["1"])
        >>> sum(p.numel() for p in attention_parameters(net))  # 32*2 + 2 + 2*32 + 32
        162
    """
    model = _check_model(model, "attention_parameters")
    found: list[nn.Parameter] = []
    for site in inserted_sites(model):
        found.extend(site.block.parameters())
    return _unique(found)


def freeze_except_attention(
    model: nn.Module,
    *,
    train_norms: bool = False,
    head: Selector | Sequence[Selector] | None = None,
) -> list[nn.Parameter]:
    """Make only the inserted attention trainable (``requires_grad``), in place.

    Every parameter of ``model`` gets ``requires_grad=False`` except those of the
    inserted blocks and, optionally, of the normalisation layers and of a head, which
    get ``requires_grad=True``. Buffers are not touched: BatchNorm running statistics
    still move in train mode; put those layers in eval mode to freeze them too.

    Args:
        model: a model with blocks inserted by :func:`insert_attention` or
            :func:`insert_se`.
        train_norms: also train every normalisation layer outside the blocks (the
            classes in ``NORM_LAYERS``: batch, instance, group, layer norms).
        head: modules to keep trainable as well, usually the classifier: a qualified
            name (``"fc"``), or any selectors :func:`insert_attention` accepts (a
            list of names, globs, ``"re:"`` regexes, classes, predicates); each must
            match a module.

    Returns:
        The trainable parameters, in model order, each once: the list to give the
        optimiser.

    Raises:
        SurgeryError: the model has no inserted block.
        SelectorError: a ``head`` selector matches nothing (the message suggests
            names).
        InvalidArgumentError: ``model`` or ``train_norms`` has the wrong type.

    Nothing changes when it raises.

    Example:
        >>> from torch import nn
        >>> from attnblocks import freeze_except_attention, insert_se
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
        ...     nn.Flatten(), nn.Linear(16, 4),
        ... )
        >>> _ = insert_se(net, ["1"], init="identity", reduction=4)
        >>> trainable = freeze_except_attention(net, head="4")
        >>> names = [name for name, p in net.named_parameters() if p.requires_grad]
        >>> names  # doctest: +NORMALIZE_WHITESPACE
        ['1.se.fc1.weight', '1.se.fc1.bias', '1.se.fc2.weight', '1.se.fc2.bias',
         '4.weight', '4.bias']
        >>> len(trainable)
        6
    """
    owner = "freeze_except_attention"
    model = _check_model(model, owner)
    check_bool(train_norms, "train_norms", owner=owner)
    attention = attention_parameters(model)
    if not attention:
        raise SurgeryError(
            f"{owner}: the model has no attention blocks inserted by attnblocks, so nothing "
            "would train. Insert some with insert_attention or insert_se first."
        )
    kept = list(attention)
    if train_norms:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                kept.extend(module.parameters(recurse=False))
    if head is not None:
        selectors: list[Selector] = list(head) if isinstance(head, (list, tuple)) else [head]  # type: ignore[list-item]
        if not selectors:
            raise InvalidArgumentError(
                f"{owner}: head must select at least one module, got {head!r}; pass "
                "head=None to train no head."
            )
        for _, module in resolve_selectors(model, selectors, strict=True, owner=owner):
            kept.extend(module.parameters())
    keep = {id(param) for param in kept}
    trainable = []
    for param in _unique(list(model.parameters())):
        param.requires_grad_(id(param) in keep)
        if id(param) in keep:
            trainable.append(param)
    return trainable
