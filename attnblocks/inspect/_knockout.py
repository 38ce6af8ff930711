"""Knock attention blocks out: make them identities (gate = 1) for a while.

Comparing a model's accuracy with and without each block measures how much of the
model's performance the block carries, the ablation behind the SE paper's question of
whether late, saturated blocks matter (Hu et al., 2018, section 7.2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError
from attnblocks.blocks import AttentionBlock
from attnblocks.blocks._base import TransientHook
from attnblocks.inspect._sites import Selectors, find_gate_sites

__all__ = ["knockout", "knockout_scan"]

_MISSING = object()
T = TypeVar("T")


class _IdentityForward(TransientHook):
    """A knocked-out block's ``forward``: the input, unchanged.

    A :class:`~attnblocks.blocks._base.TransientHook`, so a copy or pickle of the block
    made inside :func:`knockout` is the normal block, not an identity forever.
    """

    def __init__(self, block: AttentionBlock) -> None:
        self.block = block

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        block = self.block
        if block._gate_hooks:  # recorders see the gate really applied: all ones
            ones = torch.ones(x.shape[0], block.channels, dtype=x.dtype, device=x.device)
            block._emit_gate(ones)
        return x


@contextmanager
def knockout(model: nn.Module, sites: Selectors | None = None) -> Iterator[list[str]]:
    """Turn the chosen attention blocks into identities inside the ``with`` block.

    A knocked-out block returns its input unchanged (its gate is 1 everywhere; gate
    hooks, and so :func:`record_gates`, see that all-ones gate). Nothing about the
    model is edited: the block's ``forward`` is shadowed by an instance attribute that
    is deleted on exit, also when the body raises, so parameters, buffers,
    ``state_dict``, ``repr`` and hooks are exactly as before.

    Args:
        model: a model with attention blocks.
        sites: the blocks to knock out (selectors as in :func:`attnblocks.insert_se`);
            ``None`` knocks out every channel attention block.

    Yields:
        The qualified names of the knocked-out blocks.

    Example:
        >>> from attnblocks.inspect import knockout
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks import SEBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), SEBlock(8, reduction=2))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> with knockout(net) as names:
        ...     torch.equal(net(x), net[0](x))
        True
        >>> names
        ['1']
        >>> torch.equal(net(x), net[0](x))
        False
    """
    blocks = find_gate_sites(model, sites, owner="knockout")
    saved: list[tuple[AttentionBlock, object]] = []
    try:
        for _, block in blocks:
            if any(block is other for other, _ in saved):
                continue
            saved.append((block, block.__dict__.get("forward", _MISSING)))
            block.__dict__["forward"] = _IdentityForward(block)
        yield [name for name, _ in blocks]
    finally:
        for block, previous in reversed(saved):
            if previous is _MISSING:
                del block.__dict__["forward"]
            else:
                block.__dict__["forward"] = previous


def knockout_scan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], T],
    *,
    sites: Selectors | None = None,
) -> tuple[T, dict[str, T]]:
    """Evaluate ``model`` as it is, then with each block knocked out on its own.

    Args:
        model: a model with attention blocks.
        evaluate: called as ``evaluate(model)``, returns a score such as the accuracy
            on a validation set. It decides the mode (call ``model.eval()`` in it).
        sites: the blocks to scan (selectors); ``None`` for every block.

    Returns:
        ``(baseline, {site: score with that site knocked out})``.

    Example:
        >>> from attnblocks.inspect import knockout_scan
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks import SEBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), SEBlock(8), nn.Conv2d(8, 8, 1), SEBlock(8))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> base, scores = knockout_scan(net, lambda m: float(m(x).detach().abs().mean()))
        >>> list(scores)
        ['1', '3']
    """
    if not callable(evaluate):
        raise InvalidArgumentError(
            "knockout_scan: evaluate must be a function called as evaluate(model) that "
            f"returns a score, got {evaluate!r} (type {type(evaluate).__name__})."
        )
    names = [name for name, _ in find_gate_sites(model, sites, owner="knockout_scan")]
    baseline = evaluate(model)
    scores = {}
    for name in names:
        with knockout(model, [name]):
            scores[name] = evaluate(model)
    return baseline, scores
