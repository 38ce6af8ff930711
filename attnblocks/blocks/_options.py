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
    is_real,
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
    divisor: object = None,
    round_limit: object = 0.0,
    *,
    owner: str,
    minimum: int = 1,
) -> tuple[float, int]:
    """Resolve ``reduction`` / ``hidden_channels`` to ``(reduction, width)``.

    The width is ``hidden_channels`` when given (it must be at least ``minimum``),
    else ``max(minimum, floor(channels / reduction))``; with ``divisor``, ``channels /
    reduction`` is instead rounded to the nearest multiple of ``divisor`` (halves up, at
    least ``divisor``), plus one more ``divisor`` when that fell below ``round_limit``
    times the unrounded width. That is timm's ``rd_divisor`` rule (its SE and CBAM
    modules use ``round_limit=0``) and torchvision's ``_make_divisible`` (``round_limit
    = 0.9``), so a block can have exactly a reference model's width.

    >>> hidden_width(256, 16, None, owner="X")
    (16.0, 16)
    >>> hidden_width(64, 32, None, owner="X", minimum=8)
    (32.0, 8)
    >>> hidden_width(64, 16, None, 8, owner="X")  # timm's seresnet18, layer1
    (16.0, 8)
    >>> hidden_width(72, 4, None, 8, 0.9, owner="X")  # 18 -> 16 -> 24
    (4.0, 24)
    """
    ratio = check_reduction(reduction, owner=owner)
    plain_limit = is_real(round_limit) and float(round_limit) == 0
    if divisor is None and not plain_limit:
        raise InvalidArgumentError(
            f"{owner}: round_limit={round_limit!r} applies to rounding to a divisor; pass "
            "divisor too (e.g. divisor=8, round_limit=0.9) or leave round_limit out."
        )
    rounding = divisor is not None
    if hidden_channels is None:
        exact = channels / ratio
        if not rounding:
            return ratio, max(minimum, int(exact))
        step = check_positive_int(divisor, "divisor", owner=owner)
        limit = _check_round_limit(round_limit, owner=owner)
        width = max(step, int(exact + step / 2) // step * step)
        if width < limit * exact:
            width += step
        return ratio, _bounded(max(minimum, width), channels, owner=owner, name="the rounded width")
    width = check_positive_int(hidden_channels, "hidden_channels", owner=owner)
    if rounding:
        given = f"divisor={divisor!r}" + ("" if plain_limit else f", round_limit={round_limit!r}")
        raise InvalidArgumentError(
            f"{owner}: {given} rounds the width that reduction gives, but "
            f"hidden_channels={width} sets it; pass one or the other."
        )
    if width < minimum:
        raise InvalidArgumentError(
            f"{owner}: hidden_channels must be at least {minimum}, got {width}."
        )
    return ratio, _bounded(width, channels, owner=owner, name=f"hidden_channels={width}")


def _check_round_limit(value: object, *, owner: str) -> float:
    if not (is_real(value) and 0 <= float(value) < 1):  # NaN fails the comparison too
        raise InvalidArgumentError(
            f"{owner}: round_limit must be a number in [0, 1) (0: plain rounding to the "
            f"divisor, 0.9: never more than 10 % below), got {value!r}."
        )
    return float(value)


def _bounded(width: int, channels: int, *, owner: str, name: str) -> int:
    """``width``, unless the hidden layer would be over MAX_EXPANSION times the input."""
    # As for reduction: refused before any layer allocates (10**9 would need gigabytes).
    bound = MAX_EXPANSION * channels
    if width > bound:
        raise InvalidArgumentError(
            f"{owner}: {name} would make the hidden layer {width / channels:.3g} times as "
            f"wide as the input ({channels} channels); it must be at most {MAX_EXPANSION} x "
            f"channels ({bound})."
        )
    return width
