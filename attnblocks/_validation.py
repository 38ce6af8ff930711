"""Small argument and tensor checks shared by every block.

They raise :class:`~attnblocks.AttnBlocksError` subclasses with messages that
quote the value received and say what is valid, instead of ``assert``.
"""

from __future__ import annotations

import numbers

import torch

from attnblocks._errors import ChannelMismatchError, InvalidArgumentError, InvalidInputError

__all__ = ["check_feature_map", "check_positive_int", "check_positive_number"]


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
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"{owner}: {name} must be a positive number, got {value!r} "
            f"(type {type(value).__name__})."
        )
    as_float = float(value)
    if not as_float > 0 or as_float == float("inf"):
        raise InvalidArgumentError(f"{owner}: {name} must be a finite number > 0, got {value!r}.")
    return as_float


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
