"""Why a selected module cannot take an attention block: the texts of the surgery's refusals.

Each function returns the reason as a sentence (without the caller's name), or None
when the module passes that check; :func:`~attnblocks.surgery._prepare.prepare`
raises it as a :class:`~attnblocks.SurgeryError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attnblocks.blocks import available_blocks, get_block_class
from attnblocks.surgery._attach import attached_blocks, attached_child, hooked_attrs
from attnblocks.surgery._channels import infer_spatial_ranks
from attnblocks.surgery._probe import OutputRecord
from attnblocks.surgery._selectors import Selector

__all__ = ["not_called_hint", "rank_problem", "record_problem", "site_problem"]

_MIN_DIMS, _MAX_DIMS = 3, 5  # (N, C) plus 1 to 3 spatial dimensions
_MAX_BRANCHES = 5  # uncalled branches a suggested selector leaves out, at most


def site_problem(
    name: str,
    module: nn.Module,
    *,
    attr: str,
    block_class: type[nn.Module],
    aliases: Sequence[str],
) -> str | None:
    """Why ``module`` cannot take the block, or None if it can (static checks)."""
    kind = type(module).__name__
    label = f"module {name!r} ({kind})" if name else f"the model itself ({kind})"
    if isinstance(module, torch.jit.ScriptModule):
        return f"{label} is a torch.jit.ScriptModule, whose code cannot call a new block."
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return (
            f"{label} is a container (ModuleList/ModuleDict family): it either has no "
            "forward of its own or its forward iterates over its children, so an added "
            "child block would be called on the wrong input. Select the layer whose "
            "output you want gated instead."
        )
    if isinstance(module, nn.Sequential) and type(module).forward is not nn.Sequential.forward:
        last = next(reversed(list(module._modules)), None)
        hint = f", e.g. {name + '.' + last if name else last!r}" if last is not None else ""
        return (
            f"{label} is an nn.Sequential subclass with its own forward, which may "
            "iterate over its children and would then also run an added block. Select "
            f"one of its layers instead{hint}."
        )
    if len(aliases) > 1:
        return (
            f"{label} is registered under several names {list(aliases)}: one module "
            "object used at several places cannot take a block for just one of them."
        )
    for other in attached_blocks(module):
        found = attached_child(module, other)
        if found is not None and isinstance(found[1], block_class):
            return (
                f"{label} already has a {block_class.__name__} inserted as {other!r}; "
                "inserting twice at the same site would stack two blocks. Call "
                "remove_attention(model) (or remove_se) first to start again."
            )
    if attr in attached_blocks(module) or attr in hooked_attrs(module):
        if attached_child(module, attr) is None:
            return (
                f"{label} still carries the forward hook of a block {attr!r} that was "
                "deleted by hand; a new block would be applied twice. Call "
                "remove_attention(model) (or remove_se) first: it drops such leftovers."
            )
        if not hasattr(module, attr):  # an appended block renumbered by its Sequential
            return (
                f"{label} already has a block inserted as {attr!r}. Pass "
                "name='<another identifier>' or remove it first with remove_attention."
            )
    if hasattr(module, attr):
        current = getattr(module, attr)
        return (
            f"{label} already has an attribute {attr!r} ({type(current).__name__}); the "
            "block would overwrite it. Pass name='<another identifier>'."
        )
    return None


def record_problem(
    name: str, module: nn.Module, record: OutputRecord, expected: int | None
) -> str | None:
    """Why the probed output of ``module`` cannot be gated, or None if it can."""
    label = f"module {name!r} ({type(module).__name__})" if name else "the model itself"
    if record.calls == 0:
        return (
            f"{label} was not called in the forward pass with example_input, so a block "
            "attached to it would never run."
        )
    if record.calls > 1:
        return (
            f"{label} is called {record.calls} times in one forward pass (one module object "
            "reused at several places, like a shared nn.ReLU), so a block after it would "
            "gate every one of those tensors. Give each use its own module, or select a "
            "module that is called once."
        )
    shape = record.shape
    if shape is None:
        return (
            f"{label} returns a {record.type_name}, not a tensor; attention blocks gate an "
            "(N, C, *spatial) tensor."
        )
    if record.dtype is not None and not record.dtype.is_floating_point:
        return f"{label} returns a tensor of dtype {record.dtype}; a floating one is needed."
    if not _MIN_DIMS <= len(shape) <= _MAX_DIMS:
        return (
            f"{label} returns a tensor of shape {shape}; attention blocks gate an "
            "(N, C, *spatial) feature map with 1 to 3 spatial dimensions (3D to 5D)."
        )
    if expected is not None and shape[1] != expected:
        return (
            f"{label} should return {expected} channels by its configuration but returned "
            f"shape {shape}, whose dim 1 is {shape[1]}; its output is not laid out "
            "(N, C, *spatial)."
        )
    return None


_RANK_TEXT = {
    0: "(N, C) vectors",
    1: "1D feature maps (N, C, L)",
    2: "2D feature maps (N, C, H, W)",
    3: "3D feature maps (N, C, D, H, W)",
}


def rank_problem(
    name: str, module: nn.Module, block: nn.Module, record: OutputRecord | None
) -> str | None:
    """Why ``block`` cannot gate ``module``'s output because of its rank, or None."""
    dims = getattr(block, "spatial_dims", None)
    if not isinstance(dims, tuple) or not dims:
        return None
    if record is not None and record.shape is not None:
        ranks: frozenset[int] | None = frozenset({len(record.shape) - 2})
        seen = f"returns shape {record.shape} with example_input"
    else:
        ranks = infer_spatial_ranks(module)
        seen = "outputs " + " or ".join(
            _RANK_TEXT.get(r, f"{r}D maps") for r in sorted(ranks or ())
        )
    if ranks is None or ranks & set(dims):
        return None
    kind = type(block).__name__
    label = f"module {name!r} ({type(module).__name__})" if name else "the model itself"
    wanted = " or ".join(_RANK_TEXT.get(d, f"{d}D maps") for d in dims)
    others = [
        n
        for n in available_blocks()
        if ranks & set(getattr(get_block_class(n), "spatial_dims", ()))
    ]
    return (
        f"{kind} gates {wanted} only, but {label} {seen}, so the model would fail at "
        f"its first forward pass. Select a module whose output has the rank {kind} "
        f"needs, or use a block that accepts this one: {others}."
    )


def not_called_hint(
    selected: Sequence[tuple[str, nn.Module]],
    records: Sequence[OutputRecord],
    layers: Sequence[Selector],
) -> str:
    """The other uncalled sites, and a selector that leaves out the branches holding them.

    A branch is the shortest name prefix of an uncalled site under which no selected
    module was called: for torchvision's inception_v3 ``AuxLogits``, for googlenet
    ``aux1`` and ``aux2`` (auxiliary heads run in training mode only).
    """
    uncalled = [name for (name, _), r in zip(selected, records, strict=True) if r.calls == 0]
    busy: set[str] = set()  # every prefix of a called site
    for (name, _), record in zip(selected, records, strict=True):
        if record.calls:
            parts = name.split(".")
            busy.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    found: dict[str, None] = {}  # the branches, in order
    for name in uncalled:
        parts = name.split(".")
        prefixes = [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
        if not any(prefix in found for prefix in prefixes):
            found[next((p for p in prefixes if p not in busy), name)] = None
    branches = list(found)
    hint = ""
    if len(uncalled) > 1:
        shown = ", ".join(repr(n) for n in uncalled[1:6])
        more = f" and {len(uncalled) - 6} more" if len(uncalled) > 6 else ""
        hint += f" Not called either: {shown}{more}."
    hint += (
        " The model runs in eval mode for this check, so branches used in training only, "
        "such as auxiliary classifiers (torchvision's inception_v3 AuxLogits, googlenet "
        "aux1 and aux2), do not run."
    )
    if not branches or "" in branches or len(branches) > _MAX_BRANCHES:
        return hint
    starts = tuple(b + "." for b in branches)
    subject = "(name + '.')" if any(b in uncalled for b in branches) else "name"
    target = starts[0] if len(starts) == 1 else starts
    test = f"{subject}.startswith({target!r})"
    classes = [s for s in layers if isinstance(s, type)]
    if classes and len(classes) == len(layers):
        names = [_class_text(c) for c in classes]
        which = names[0] if len(names) == 1 else "(" + ", ".join(names) + ")"
        predicate = f"lambda name, m: isinstance(m, {which}) and not {test}"
    else:
        predicate = f"lambda name, m: <your selection> and not {test}"
    shown_branches = ", ".join(repr(b) for b in branches)
    return (
        f"{hint} Leave out {shown_branches} with a predicate selector, e.g. layers=[{predicate}]."
    )


def _class_text(cls: type) -> str:
    """How a class is written in a suggested selector (``nn.Conv2d`` for torch.nn)."""
    if cls.__module__.startswith("torch.nn.modules"):
        return f"nn.{cls.__qualname__}"
    return cls.__qualname__
