"""Find the attention blocks ("sites") of a model, optionally narrowed by selectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from attnblocks._errors import InvalidArgumentError
from attnblocks.blocks import AttentionBlock

__all__ = ["Selectors", "find_gate_sites", "resolve_modules"]

#: What ``sites=`` / ``layers=`` accept: one selector or a sequence of them, with the
#: selector syntax of :func:`attnblocks.insert_se` (exact names, globs, ``"re:"``
#: regexes, module classes, predicates).
Selectors = Any


def _as_list(selectors: Selectors) -> list[Any]:
    if isinstance(selectors, (str, type)) or callable(selectors):
        return [selectors]
    if isinstance(selectors, Sequence):
        return list(selectors)
    return [selectors]


def resolve_modules(
    model: nn.Module, selectors: Selectors, *, owner: str
) -> list[tuple[str, nn.Module]]:
    """Resolve ``selectors`` to ``(qualified name, module)`` pairs; every selector must match."""
    from attnblocks.inspect._select import resolve_selectors

    return resolve_selectors(model, _as_list(selectors), strict=True, owner=owner)


def _is_gate_site(module: nn.Module) -> bool:
    return isinstance(module, AttentionBlock) and type(module).has_channel_gate


def find_gate_sites(
    model: nn.Module, sites: Selectors | None = None, *, owner: str
) -> list[tuple[str, AttentionBlock]]:
    """The channel-gating attention blocks of ``model`` as ``(name, block)`` pairs.

    Args:
        model: the model to search.
        sites: ``None`` for every block, else selectors; each selector must match at
            least one attention block (other modules it matches are skipped, so a glob
            such as ``"layer3.*"`` picks the blocks under ``layer3``).
        owner: the calling function's name, used in error messages.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    everything = [(name, m) for name, m in model.named_modules() if _is_gate_site(m)]
    if not everything:
        raise InvalidArgumentError(
            f"{owner}: {type(model).__name__} contains no channel attention block "
            "(an attnblocks.blocks.AttentionBlock such as SEBlock); add some first, "
            "e.g. with attnblocks.insert_se."
        )
    if sites is None:
        return everything
    chosen: dict[str, AttentionBlock] = {}
    for selector in _as_list(sites):
        matched = [(n, m) for n, m in resolve_modules(model, [selector], owner=owner)]
        blocks = [(n, m) for n, m in matched if _is_gate_site(m)]
        if not blocks:
            got = ", ".join(f"{n} ({type(m).__name__})" for n, m in matched[:5])
            raise InvalidArgumentError(
                f"{owner}: selector {selector!r} matched no attention block (it matched "
                f"{got}); the model's attention blocks are {[n for n, _ in everything]}."
            )
        for name, block in blocks:
            chosen.setdefault(name, block)
    order = {name: i for i, (name, _) in enumerate(everything)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])
