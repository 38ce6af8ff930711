"""Find the attention blocks ("sites") of a model, optionally narrowed by selectors.

Selectors are the ones of :func:`attnblocks.insert_se` (see
:mod:`attnblocks.surgery._selectors`), so the same list picks where blocks go and
which of them to inspect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from attnblocks._errors import InvalidArgumentError, SelectorError
from attnblocks.blocks import AttentionBlock
from attnblocks.surgery._selectors import Selector, describe_selector, resolve_selectors

__all__ = ["Selectors", "find_gate_sites", "find_map_sites", "resolve_modules"]

#: What ``sites=`` and ``layers=`` accept: a list of selectors (exact names, globs,
#: ``"re:"`` regexes, module classes, predicates), as for :func:`attnblocks.insert_se`.
Selectors = Sequence[Selector]


def resolve_modules(
    model: nn.Module, selectors: Selectors, *, owner: str
) -> list[tuple[str, nn.Module]]:
    """Resolve ``selectors`` to ``(qualified name, module)`` pairs; each must match."""
    return resolve_selectors(model, selectors, strict=True, owner=owner)


def _is_gate_site(module: nn.Module) -> bool:
    # read from the instance: some blocks decide per instance (e.g. by their options)
    return isinstance(module, AttentionBlock) and bool(getattr(module, "has_channel_gate", True))


def _is_map_site(module: nn.Module) -> bool:
    return isinstance(module, AttentionBlock) and bool(getattr(module, "has_spatial_map", False))


def find_gate_sites(
    model: nn.Module, sites: Selectors | None = None, *, owner: str
) -> list[tuple[str, AttentionBlock]]:
    """The channel-gating attention blocks of ``model`` as ``(name, block)`` pairs.

    Args:
        model: the model to search.
        sites: ``None`` for every block, else a list of selectors; each must match at
            least one attention block (other modules it matches are skipped, so the
            glob ``"layer3.*"`` picks the blocks under ``layer3``).
        owner: the calling function's name, used in error messages.

    Returns:
        The blocks in ``model.named_modules()`` order, each once.
    """
    return _find_sites(
        model,
        sites,
        _is_gate_site,
        owner=owner,
        kind="attention block with a channel gate",
        missing="no channel attention block (an attnblocks.blocks.AttentionBlock such as "
        "SEBlock); add some first, e.g. with attnblocks.insert_se",
    )


def find_map_sites(
    model: nn.Module, sites: Selectors | None = None, *, owner: str
) -> list[tuple[str, AttentionBlock]]:
    """The attention blocks of ``model`` with a spatial map, as ``(name, block)`` pairs.

    The same as :func:`find_gate_sites` for blocks whose ``has_spatial_map`` is True
    (CBAM, scSE, SimAM, Coordinate Attention, Global Context, Gather-Excite with a
    local extent).
    """
    return _find_sites(
        model,
        sites,
        _is_map_site,
        owner=owner,
        kind="attention block with a spatial map",
        missing="no attention block with a spatial map (has_spatial_map: CBAM, scSE, "
        "SimAM, Coordinate Attention, Global Context, Gather-Excite with a local extent); "
        "add some first, e.g. with attnblocks.insert_attention(model, layers, block='cbam')",
    )


def _find_sites(
    model: nn.Module,
    sites: Selectors | None,
    is_site: Callable[[nn.Module], bool],
    *,
    owner: str,
    kind: str,
    missing: str,
) -> list[tuple[str, AttentionBlock]]:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    everything = [(name, m) for name, m in model.named_modules() if is_site(m)]
    if not everything:
        raise InvalidArgumentError(f"{owner}: {type(model).__name__} contains {missing}.")
    if sites is None:
        return everything
    if isinstance(sites, (str, bytes)) or not isinstance(sites, Sequence):
        raise SelectorError(
            f"{owner}: sites must be None or a list of selectors, got {sites!r} (type "
            f"{type(sites).__name__}). Wrap a single selector in a list, e.g. "
            f"sites=[{sites!r}]."
        )
    if not sites:
        raise SelectorError(
            f"{owner}: sites is empty; pass None to use every {kind}, or a list of at least "
            f"one selector (the model's are {[n for n, _ in everything]})."
        )
    matched = {name for name, _ in resolve_modules(model, sites, owner=owner)}
    for selector in sites:
        hits = resolve_modules(model, [selector], owner=owner)
        if not any(is_site(m) for _, m in hits):
            got = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in hits[:5])
            raise SelectorError(
                f"{owner}: the selector {describe_selector(selector)} matches no {kind} "
                f"(it matches {got}); the model's are {[n for n, _ in everything]}."
            )
    return [(name, block) for name, block in everything if name in matched]
