"""Small argument and tensor checks shared by every block.

They raise :class:`~attnblocks.AttnBlocksError` subclasses with messages that
quote the value received and say what is valid, instead of ``assert``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TypeGuard, TypeVar

import torch

from attnblocks._errors import ChannelMismatchError, InvalidArgumentError, InvalidInputError

__all__ = [
    "MAX_EXPANSION",
    "check_bool",
    "check_choice",
    "check_feature_map",
    "check_positive_int",
    "check_positive_number",
    "check_reduction",
    "is_real",
]

#: The widest hidden layer a ``reduction`` may ask for, in multiples of the channels
#: (``reduction >= 1 / MAX_EXPANSION``): far beyond any published block, small enough
#: that a typo such as ``reduction=1e-19`` is an error, not an overflow or a huge allocation.
MAX_EXPANSION = 64


T = TypeVar("T")


def check_bool(value: object, name: str, *, owner: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(
            f"{owner}: {name} must be True or False, got {value!r} (type {type(value).__name__})."
        )
    return value


def check_choice(value: object, name: str, choices: Sequence[T], *, owner: str) -> T:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    for choice in choices:
        if isinstance(value, type(choice)) and value == choice:
            return choice
    raise InvalidArgumentError(
        f"{owner}: unknown {name} {value!r}; valid values are {list(choices)}."
    )


def is_real(value: object) -> TypeGuard[numbers.Real]:
    """Whether ``value`` is a real number (NumPy scalars included) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(value: object, name: str, *, owner: str) -> int:
    """Return ``value`` as an ``int`` if it is a whole number >= 1, else raise.

    Args:
        value: the value to check.
        name: the argument's name, used in the message.
        owner: the class or function the argument belongs to.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(
            f"{owner}: {name} must be a positive int, got {value!r} (type {type(value).__name__})."
        )
    if value <= 0:
        raise InvalidArgumentError(f"{owner}: {name} must be a positive int (>= 1), got {value}.")
    return int(value)


def check_positive_number(value: object, name: str, *, owner: str) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number > 0, else raise."""
    if not is_real(value):
        raise InvalidArgumentError(
            f"{owner}: {name} must be a positive number, got {value!r} "
            f"(type {type(value).__name__})."
        )
    as_float = float(value)
    if not as_float > 0 or as_float == float("inf"):
        raise InvalidArgumentError(f"{owner}: {name} must be a finite number > 0, got {value!r}.")
    return as_float


def check_reduction(value: object, *, owner: str) -> float:
    """Return a block's ``reduction`` as a ``float``: finite, > 0 and >= ``1 / MAX_EXPANSION``.

    A ratio below 1 widens the hidden layer (``reduction=0.5`` doubles it); below
    ``1 / MAX_EXPANSION`` it is refused. Pass ``hidden_channels`` for an exact width.

    >>> check_reduction(0.5, owner="X")
    0.5
    >>> check_reduction(1e-19, owner="X")
    Traceback (most recent call last):
    ...
    attnblocks._errors.InvalidArgumentError: X: reduction=1e-19 would make the hidden layer ...
    """
    ratio = check_positive_number(value, "reduction", owner=owner)
    if ratio * MAX_EXPANSION < 1:
        raise InvalidArgumentError(
            f"{owner}: reduction={value!r} would make the hidden layer {1 / ratio:.3g} times "
            f"as wide as the input; reduction must be at least 1/{MAX_EXPANSION} "
            f"({1 / MAX_EXPANSION}). Pass hidden_channels for an exact width."
        )
    return ratio


def check_feature_map(
    x: object, channels: int, *, owner: str, min_spatial: int = 1, max_spatial: int = 3
) -> None:
    """Check that ``x`` is a floating ``(N, C, *spatial)`` tensor with ``C == channels``.

    Args:
        x: the block's input.
        channels: the channel count the block was built for.
        owner: the block's class name, used in the message.
        min_spatial: the fewest spatial dimensions the block accepts.
        max_spatial: the most spatial dimensions the block accepts.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{owner} expects a torch.Tensor, got {type(x).__name__}.")
    lo, hi = 2 + min_spatial, 2 + max_spatial
    if not lo <= x.dim() <= hi:
        raise InvalidInputError(
            f"{owner} expects a tensor of shape (N, C, *spatial) with {min_spatial} to "
            f"{max_spatial} spatial dims ({lo}D to {hi}D), got a {x.dim()}D tensor of shape "
            f"{tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise InvalidInputError(
            f"{owner} expects a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}. Convert it first, e.g. x.float()."
        )
    if x.shape[1] != channels:
        raise ChannelMismatchError(
            f"{owner} was built for {channels} channels but got a tensor with "
            f"{x.shape[1]} channels (dim 1 of shape {tuple(x.shape)})."
        )
