"""Take inserted attention blocks out again, giving the original model back."""

from __future__ import annotations

from torch import nn

from attnblocks._errors import InvalidArgumentError
from attnblocks.surgery._attach import attached_blocks, attached_child, detach_block, hooked_attrs
from attnblocks.surgery._prepare import block_identity

__all__ = ["remove_attention", "remove_se"]


def remove_attention(model: nn.Module, *, block: str | type[nn.Module] | None = None) -> nn.Module:
    """Remove the blocks that :func:`insert_attention` added, in place.

    The result has the same module tree (same ``repr``), the same state-dict keys in
    the same order and bit-identical outputs as the model had before insertion.
    Modules without inserted blocks are left alone; a model without any is returned
    unchanged.

    Hand edits are repaired rather than refused: the leftovers of a block deleted by
    hand (``del model.layer1[0].bn2.se`` leaves the hook that applied it) are
    dropped whatever ``block`` says, and a block appended to an ``nn.Sequential``
    is found even after ``del seq[0]`` or ``seq.pop(0)`` renumbered its keys. So
    the model returned always runs.

    Args:
        model: a model modified by :func:`insert_attention` or :func:`insert_se`
            (or a deep copy or unpickled copy of one).
        block: remove only blocks of this kind (a registered name or a class);
            ``None`` removes every inserted block.

    Returns:
        ``model`` itself.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks.surgery import insert_attention, remove_attention
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> text = repr(net)
        >>> _ = insert_attention(net, ["0", "1"], reduction=2)
        >>> repr(remove_attention(net)) == text
        True
    """
    return _remove(model, block=block, owner="remove_attention")


def remove_se(model: nn.Module) -> nn.Module:
    """Remove the SE blocks that :func:`insert_se` added, in place.

    :func:`remove_attention` restricted to SE blocks; blocks of other kinds stay
    (leftovers of blocks deleted by hand are dropped, as there).

    Example:
        >>> from torch import nn
        >>> from attnblocks.surgery import insert_se, remove_se
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> keys = list(net.state_dict())
        >>> _ = insert_se(net, ["1"])
        >>> list(remove_se(net).state_dict()) == keys
        True
    """
    return _remove(model, block="se", owner="remove_se")


def _remove(model: nn.Module, *, block: str | type[nn.Module] | None, owner: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be an nn.Module, got {type(model).__name__}."
        )
    block_class = None if block is None else block_identity(block, owner=owner)[0]
    for module in list(model.modules()):
        # recorded blocks, and hooks of ours whose record was lost, each name once
        attrs = dict.fromkeys([*attached_blocks(module), *hooked_attrs(module)])
        for attr in attrs:
            found = attached_child(module, attr)
            if found is None or block_class is None or isinstance(found[1], block_class):
                detach_block(module, attr)
    return model
