"""The one exception family of attnblocks.

Every error that attnblocks raises because of what a user passed in is an
:class:`AttnBlocksError`, itself a :class:`ValueError`, so ``except ValueError``
keeps working for code that does not know about attnblocks. Each message says
what was wrong, what was received and what would have been valid.
"""

from __future__ import annotations

__all__ = [
    "AttnBlocksError",
    "ChannelMismatchError",
    "InvalidArgumentError",
    "InvalidInputError",
    "SelectorError",
]


class AttnBlocksError(ValueError):
    """Base class of every error attnblocks raises for a misuse."""


class InvalidArgumentError(AttnBlocksError):
    """A constructor or function argument has an invalid value or type."""


class InvalidInputError(AttnBlocksError):
    """A tensor given to a block has the wrong rank or dtype."""


class ChannelMismatchError(InvalidInputError):
    """A tensor's channel dimension differs from the one the block was built for."""


class SelectorError(InvalidArgumentError):
    """A module selector is malformed or matches no module of the model.

    The message names the selector and suggests the closest real module names.
    """
