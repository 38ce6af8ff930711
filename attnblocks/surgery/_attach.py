"""How an attention block is attached to a module and detached again.

The selected module (the *host*) stays where it is. The block becomes a child of
the host, so its parameters appear in the state dict under ``<host>.<attr>.*`` and
every original key keeps its name and order. It is applied to the host's output:

* for a plain ``nn.Sequential`` host, by the Sequential itself: the block is
  appended as its last stage;
* for any other host, by a forward hook (:class:`ApplyChild`) that calls the block
  on the host's output.

The host records what was attached in a plain attribute (not a parameter, buffer
or module), so detaching gives back the same module tree, state dict and outputs.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

__all__ = ["ApplyChild", "AttachMode", "attach_block", "attached_blocks", "detach_block"]

AttachMode = Literal["hook", "sequential"]

_MARKER = "_attnblocks_inserted"


class ApplyChild:
    """Forward hook that applies the host's child ``attr`` to the host's output.

    It holds only the child's name, never a module, so the model stays picklable
    and ``copy.deepcopy`` gives a copy whose hook applies the copied block.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> host = nn.Conv2d(3, 4, 1)
        >>> host.double_it = nn.Identity()
        >>> _ = host.register_forward_hook(ApplyChild("double_it"))
        >>> host(torch.zeros(1, 3, 2, 2)).shape
        torch.Size([1, 4, 2, 2])
    """

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, args: object, output: object) -> object:
        return getattr(module, self.attr)(output)

    def __repr__(self) -> str:
        return f"ApplyChild({self.attr!r})"


def attached_blocks(host: nn.Module) -> dict[str, AttachMode]:
    """The blocks attnblocks attached to ``host``: attribute name -> mode, in order.

    >>> from torch import nn
    >>> attached_blocks(nn.Conv2d(3, 4, 1))
    {}
    """
    return dict(host.__dict__.get(_MARKER, {}))


def attach_block(host: nn.Module, attr: str, block: nn.Module, mode: AttachMode) -> None:
    """Make ``block`` the child ``attr`` of ``host`` and apply it to the host's output.

    The caller has checked that ``host`` has no attribute ``attr``.
    """
    host.add_module(attr, block)
    if mode == "hook":
        host.register_forward_hook(ApplyChild(attr))
    marker: dict[str, AttachMode] = host.__dict__.setdefault(_MARKER, {})
    marker[attr] = mode


def detach_block(host: nn.Module, attr: str) -> nn.Module:
    """Undo :func:`attach_block` for ``attr`` and return the detached block."""
    marker: dict[str, AttachMode] = host.__dict__[_MARKER]
    mode = marker.pop(attr)
    if mode == "hook":
        stale = [
            key
            for key, hook in host._forward_hooks.items()
            if isinstance(hook, ApplyChild) and hook.attr == attr
        ]
        for key in stale:
            del host._forward_hooks[key]
            host._forward_hooks_with_kwargs.pop(key, None)
            host._forward_hooks_always_called.pop(key, None)
    block = host._modules.pop(attr)
    if not marker:
        del host.__dict__[_MARKER]
    if block is None:  # pragma: no cover - attach_block never stores None
        raise KeyError(attr)
    return block
