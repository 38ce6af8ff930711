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
A block appended to an ``nn.Sequential`` also carries the name it was attached
under, so it is found again after ``del seq[0]`` or ``seq.pop(0)`` renumber the
Sequential's keys.

Hand edits are survived: after ``del host.se`` the leftover hook raises a
:class:`~attnblocks.SurgeryError` saying what happened, and :func:`detach_block`
drops leftovers (a hook or a record without its block) without complaint.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from attnblocks._errors import SurgeryError
from attnblocks._torch_compat import forward_hooks, remove_forward_hook

__all__ = [
    "ApplyChild",
    "AttachMode",
    "attach_block",
    "attached_blocks",
    "attached_child",
    "attached_modules",
    "detach_block",
    "hooked_attrs",
]

AttachMode = Literal["hook", "sequential"]

_MARKER = "_attnblocks_inserted"
# Set on a block appended to an nn.Sequential host: the name it was attached under.
_APPENDED = "_attnblocks_appended_as"


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
        block = getattr(module, self.attr, None)
        if block is None:
            kind = type(module).__name__
            raise SurgeryError(
                f"the attention block {self.attr!r} that attnblocks inserted after this "
                f"{kind} is gone (removed by hand, e.g. with `del <{kind}>.{self.attr}`), "
                "but the forward hook that applied it is still registered. Call "
                "attnblocks.remove_attention(model) to drop such leftovers (it also "
                "removes every other inserted block; remove_attention(model, "
                "block=<kind>) or remove_se(model) keep the blocks of other kinds), or "
                f"put a block back as <{kind}>.{self.attr}."
            )
        return block(output)

    def __repr__(self) -> str:
        return f"ApplyChild({self.attr!r})"


def attached_blocks(host: nn.Module) -> dict[str, AttachMode]:
    """The blocks attnblocks attached to ``host``: attribute name -> mode, in order.

    >>> from torch import nn
    >>> attached_blocks(nn.Conv2d(3, 4, 1))
    {}
    """
    return dict(host.__dict__.get(_MARKER, {}))


def hooked_attrs(host: nn.Module) -> list[str]:
    """The names that :class:`ApplyChild` hooks of ``host`` apply, recorded or not.

    >>> from torch import nn
    >>> hooked_attrs(nn.Conv2d(3, 4, 1))
    []
    """
    return [hook.attr for hook in forward_hooks(host).values() if isinstance(hook, ApplyChild)]


def attached_child(host: nn.Module, attr: str) -> tuple[str, nn.Module] | None:
    """The key in ``host._modules`` and the block attached as ``attr``; None if it is gone.

    A block appended to an ``nn.Sequential`` is found under its new key when the
    Sequential renumbered its children (``del seq[0]``, ``seq.pop(0)``).

    >>> from torch import nn
    >>> attached_child(nn.Conv2d(3, 4, 1), "se") is None
    True
    """
    child = host._modules.get(attr)
    if child is not None:
        return attr, child
    if attached_blocks(host).get(attr) == "sequential":
        for key, module in host._modules.items():
            if module is not None and module.__dict__.get(_APPENDED) == attr:
                return key, module
    return None


def attached_modules(host: nn.Module) -> list[nn.Module]:
    """The blocks attnblocks attached to ``host`` that are still there."""
    found = [attached_child(host, attr) for attr in attached_blocks(host)]
    return [item[1] for item in found if item is not None]


def attach_block(host: nn.Module, attr: str, block: nn.Module, mode: AttachMode) -> None:
    """Make ``block`` the child ``attr`` of ``host`` and apply it to the host's output.

    The caller has checked that ``host`` has no attribute ``attr``.
    """
    host.add_module(attr, block)
    if mode == "hook":
        host.register_forward_hook(ApplyChild(attr))
    else:
        block.__dict__[_APPENDED] = attr
    marker: dict[str, AttachMode] = host.__dict__.setdefault(_MARKER, {})
    marker[attr] = mode


def detach_block(host: nn.Module, attr: str) -> nn.Module | None:
    """Undo :func:`attach_block` for ``attr`` and return the detached block.

    Leftovers of hand edits go quietly: a hook or a record whose block was deleted
    is dropped, and None is returned when the block itself is gone.
    """
    found = attached_child(host, attr)
    marker: dict[str, AttachMode] = host.__dict__.get(_MARKER, {})
    marker.pop(attr, None)
    stale = [
        hook_id
        for hook_id, hook in forward_hooks(host).items()
        if isinstance(hook, ApplyChild) and hook.attr == attr
    ]
    for hook_id in stale:
        remove_forward_hook(host, hook_id)
    if _MARKER in host.__dict__ and not marker:
        del host.__dict__[_MARKER]
    if attr in host._modules and host._modules[attr] is None:  # `host.<attr> = None`
        del host._modules[attr]
    if found is None:
        return None
    key, block = found
    del host._modules[key]
    block.__dict__.pop(_APPENDED, None)
    return block
