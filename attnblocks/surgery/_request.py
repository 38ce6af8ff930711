"""One surgery request: the arguments of an insertion or a dry run, as the caller gave them.

:func:`~attnblocks.surgery.insert_attention`, :func:`~attnblocks.surgery.insert_se`,
:func:`~attnblocks.surgery.plan_attention` and :func:`~attnblocks.surgery.plan_se`
each build one :class:`SurgeryRequest` and pass it whole to the steps after them,
instead of forwarding nine arguments from function to function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from attnblocks.surgery._probe import ExampleInput
from attnblocks.surgery._selectors import Selector

__all__ = ["SurgeryRequest"]


@dataclass(frozen=True)
class SurgeryRequest:
    """The arguments of one surgery call, unchecked, in the order of its signature.

    Nothing is validated here: :func:`~attnblocks.surgery._prepare.prepare` checks
    every field and raises the caller's errors. ``block_kwargs`` is copied into a
    read-only mapping, so the request cannot change after it is built.

    ``saved_channels`` is not a public argument: :func:`~attnblocks.surgery.load_attention`
    sets it to the channel count its config saved for the site, which a site whose module
    does not declare its channels takes when there is no ``example_input``.

    >>> from torch import nn
    >>> request = SurgeryRequest(nn.ReLU(), ["0"], "se", "default", None, True, None, {}, "demo")
    >>> request.owner, dict(request.block_kwargs)
    ('demo', {})
    """

    model: nn.Module
    layers: Sequence[Selector]
    block: str | type[nn.Module]
    init: str
    example_input: ExampleInput | None
    strict: bool
    name: str | None
    block_kwargs: Mapping[str, Any]
    owner: str
    saved_channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_kwargs", MappingProxyType(dict(self.block_kwargs)))
