"""Checks for the keyword options the attention blocks share.

Every check raises :class:`~attnblocks.InvalidArgumentError` with the value
received and the values that are valid.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnblocks._errors import InvalidArgumentError
from attnblocks._validation import (
    MAX_EXPANSION,
    check_choice,
    check_positive_int,
    check_reduction,
)

__all__ = ["check_init", "hidden_width"]


def check_init(
    init: object, modes: Sequence[str], *, owner: str, identity_unavailable: str = ""
) -> str:
    """Validate an ``init=`` option.

    Args:
        init: the value received.
        modes: the values the block accepts.
        owner: the block's class name.
        identity_unavailable: for blocks without ``init="identity"``, the reason,
            quoted when a user asks for it.
    """
    if init == "identity" and "identity" not in modes:
        raise InvalidArgumentError(
            f"{owner} does not support init='identity': {identity_unavailable} "
            f"Valid values are {list(modes)}."
        )
    return check_choice(init, "init", modes, owner=owner)


def hidden_width(
    channels: int,
    reduction: object,
    hidden_channels: object,
    *,
    owner: str,
    minimum: int = 1,
) -> tuple[float, int]:
    """Resolve ``reduction`` / ``hidden_channels`` to ``(reduction, width)``.

    The width is ``hidden_channels`` when given (it must be at least ``minimum``),
    else ``max(minimum, floor(channels / reduction))``.

    >>> hidden_width(256, 16, None, owner="X")
    (16.0, 16)
    >>> hidden_width(64, 32, None, owner="X", minimum=8)
    (32.0, 8)
    """
    ratio = check_reduction(reduction, owner=owner)
    if hidden_channels is None:
        return ratio, max(minimum, int(channels / ratio))
    width = check_positive_int(hidden_channels, "hidden_channels", owner=owner)
    if width < minimum:
        raise InvalidArgumentError(
            f"{owner}: hidden_channels must be at least {minimum}, got {width}."
        )
    # As for reduction: refused before any layer allocates (10**9 would need gigabytes).
    bound = max(minimum, MAX_EXPANSION * channels)
    if width > bound:
        raise InvalidArgumentError(
            f"{owner}: hidden_channels={width} would make the hidden layer "
            f"{width / channels:.3g} times as wide as the input ({channels} channels); it "
            f"must be at most {MAX_EXPANSION} x channels ({bound})."
        )
    return ratio, width
