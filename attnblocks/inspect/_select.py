"""TEMPORARY placeholder until attnblocks.surgery._selectors is merged."""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from attnblocks._errors import InvalidArgumentError


def resolve_selectors(
    model: nn.Module, layers: list[Any], *, strict: bool = True, owner: str = "resolve_selectors"
) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    out: dict[str, nn.Module] = {}
    for sel in layers:
        if isinstance(sel, str):
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, sel)]
        elif isinstance(sel, type):
            hits = [(n, m) for n, m in named if isinstance(m, sel)]
        else:
            hits = [(n, m) for n, m in named if sel(n, m)]
        if strict and not hits:
            raise InvalidArgumentError(f"{owner}: selector {sel!r} matched nothing.")
        for n, m in hits:
            out.setdefault(n, m)
    return list(out.items())
