"""The base class shared by every attention block: constructor contract and gate hooks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["AttentionBlock", "GateHook"]

#: A gate hook is called as ``hook(block, gate)`` with the block and the gate it
#: has just applied, detached: ``(N, C)`` for channel gates.
GateHook = Callable[[nn.Module, torch.Tensor], None]


class AttentionBlock(nn.Module):
    """Base class of attnblocks' attention blocks.

    Every block takes its channel count as the first positional argument and
    everything else as keyword-only arguments, maps ``(N, C, *spatial)`` to a
    tensor of the same shape, dtype and memory format, and calls its gate hooks
    with the gate it applied, so tools such as :func:`attnblocks.inspect.record_gates`
    can read gates without recomputing them.

    Subclasses set :attr:`supports_identity_init` to say whether ``init="identity"``
    is available, and call :meth:`_emit_gate` from ``forward``.
    """

    #: Whether ``init="identity"`` makes the block an exact identity map.
    supports_identity_init: ClassVar[bool] = False
    #: Whether the block applies a per-(sample, channel) gate (some blocks decide
    #: per instance, so read it from the instance).
    has_channel_gate: bool = True
    #: The numbers of spatial dimensions the block accepts (1: Conv1d features, ...).
    spatial_dims: tuple[int, ...] = (1, 2, 3)

    channels: int

    def __init__(self) -> None:
        super().__init__()
        self._gate_hooks: OrderedDict[int, GateHook] = OrderedDict()

    def register_gate_hook(self, hook: GateHook) -> RemovableHandle:
        """Register ``hook(block, gate)``, called on every forward with the detached gate.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._gate_hooks)
        self._gate_hooks[handle.id] = hook
        return handle

    def _emit_gate(self, gate: torch.Tensor) -> None:
        if self._gate_hooks:
            detached = gate.detach()
            for hook in list(self._gate_hooks.values()):
                hook(self, detached)

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        if "_gate_hooks" not in self.__dict__:
            self._gate_hooks = OrderedDict()
