"""Estimate the compute an attention block adds, from the shape of the tensor it gates.

The block is built on the ``meta`` device and run, in eval mode, on a ``meta``
tensor of one sample, so nothing is allocated or computed (eval mode: the inference
cost, and a block with BatchNorm accepts a single sample whatever the map size).
Two numbers are counted per sample:

* **MACs**: multiply-accumulates of matrix multiplications and convolutions, as
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` (its FLOPs / 2) on
  the block's reference modules (``fast_path`` off, so the count is the same on every
  torch version);
  for SE these are the two fully connected layers, :math:`2 C^2 / r`.
* **elementwise ops**: for every other operator that is not a pure view, the
  number of elements of its largest tensor argument or result, i.e. one op per
  element read or written; for SE, mostly the squeeze (global average pooling,
  :math:`C H W` additions) and the scale (:math:`C H W` multiplications).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["BlockCost", "estimate_block_cost"]


class BlockCost(tuple[int, int]):
    """``(macs, elementwise_ops)`` for one sample."""

    __slots__ = ()

    @property
    def macs(self) -> int:
        return self[0]

    @property
    def elementwise(self) -> int:
        return self[1]


@functools.cache
def _elementwise_counter_class() -> type:
    """The counting dispatch mode, built on first use (torch.utils.flop_counter is slow
    to import, and ``import attnblocks`` should stay light)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import flop_registry

    class ElementwiseCounter(TorchDispatchMode):
        """Counts one op per element of the largest tensor of each non-view operator."""

        def __init__(self) -> None:
            super().__init__()
            self.total = 0

        def __torch_dispatch__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: Mapping[str, Any] | None = None,
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            packet = getattr(func, "overloadpacket", None)
            if packet not in flop_registry and not getattr(func, "is_view", False):
                leaves = tree_leaves((args, kwargs or {}, out))
                sizes = [t.numel() for t in leaves if isinstance(t, torch.Tensor)]
                if sizes:
                    self.total += max(sizes)
            return out

    return ElementwiseCounter


def estimate_block_cost(
    block_class: type[nn.Module],
    channels: int,
    block_kwargs: Mapping[str, Any],
    shape: tuple[int, ...],
) -> BlockCost:
    """Return the per-sample MACs and elementwise ops of one block on ``shape``.

    Args:
        block_class: the block's class.
        channels: its channel count.
        block_kwargs: its keyword options (``init`` is ignored: it does not change
            the cost).
        shape: the shape of the tensor it gates, ``(N, C, *spatial)``; ``N`` is
            replaced by 1.

    Example:
        >>> from attnblocks import SEBlock
        >>> cost = estimate_block_cost(SEBlock, 64, {"reduction": 16}, (8, 64, 32, 32))
        >>> cost.macs == 2 * 64 * 4
        True
        >>> cost.elementwise >= 2 * 64 * 32 * 32
        True
    """
    from torch.utils.flop_counter import FlopCounterMode

    options = {k: v for k, v in block_kwargs.items() if k != "init"}
    with torch.device("meta"):
        block = block_class(channels, **options).eval()
        x = torch.empty((1, *shape[1:]))
    if hasattr(block, "fast_path"):
        # Count the block's reference modules, not a fast path (ECA's shifted sums in
        # place of its conv1d): whether a fast path runs depends on the torch version
        # and on hooks (newer FlopCounterModes register global module hooks).
        block.fast_path = False  # type: ignore[assignment]  # a plain attribute
    macs = FlopCounterMode(display=False)
    elementwise = _elementwise_counter_class()()
    with torch.no_grad(), macs, elementwise:
        block(x)
    return BlockCost((int(macs.get_total_flops()) // 2, elementwise.total))
