"""An exponential moving average of a model's weights and BatchNorm statistics."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """Keep ``shadow = d * shadow + (1 - d) * weights`` after every optimiser step.

    The decay ramps up as ``d = min(decay, (1 + t) / (10 + t))`` after ``t`` updates,
    so the average follows the fast early changes and does not remember the random
    initialisation. Floating-point buffers (BatchNorm's running mean and variance)
    are averaged the same way; integer buffers (``num_batches_tracked``) are copied.
    The shadow model is a deep copy (hooks, attention blocks and memory format
    included) kept in eval mode without gradients.

    Args:
        model: the model being trained (not wrapped in DistributedDataParallel).
        decay: the largest decay per step, in ``(0, 1)``.

    >>> net = nn.Linear(2, 1)
    >>> ema = WeightEMA(net, decay=0.9)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> ema.update(net)  # t = 1: d = 2 / 11
    >>> bool(torch.allclose(ema.shadow.weight, net.weight - 2 / 11))
    True
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay!r}.")
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine: list[torch.Tensor] = []
        theirs: list[torch.Tensor] = []
        for a, b in zip(self.shadow.parameters(), model.parameters(), strict=True):
            mine.append(a)
            theirs.append(b.detach())
        for buf, source in zip(self.shadow.buffers(), model.buffers(), strict=True):
            if buf.is_floating_point():
                mine.append(buf)
                theirs.append(source)
            else:
                buf.copy_(source)
        return mine, theirs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs = self._pairs(model)
        torch._foreach_lerp_(mine, theirs, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        """The shadow weights and the update count, for checkpoints."""
        return {"shadow": self.shadow.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
