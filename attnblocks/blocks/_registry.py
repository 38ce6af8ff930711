"""Registry of attention blocks: build a block from a name or a class."""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from attnblocks._errors import InvalidArgumentError

__all__ = ["available_blocks", "create_block", "get_block_class", "register_block"]

_BLOCKS: dict[str, type[nn.Module]] = {}

BlockT = TypeVar("BlockT", bound=type[nn.Module])


def register_block(name: str) -> Callable[[BlockT], BlockT]:
    """Class decorator that registers an attention block under ``name``.

    The class must be an ``nn.Module`` subclass that takes its channel count as the
    first positional argument and every option as a keyword argument, like
    :class:`~attnblocks.SEBlock`. The name is case-insensitive and must be a valid
    Python identifier that is not a keyword, since surgery stores the block under
    it (``model.layer1.se``). A refused registration leaves the registry unchanged.

    Example:
        >>> from attnblocks import register_block
        >>> decorator = register_block("my_block")  # then: @register_block("my_block")
        >>> register_block("my block!")
        Traceback (most recent call last):
        ...
        attnblocks._errors.InvalidArgumentError: register_block: name must be a valid Python ...
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"register_block: name must be a string, got {name!r} (type {type(name).__name__})."
        )
    key = name.lower()
    if not key.isidentifier() or keyword.iskeyword(key):
        raise InvalidArgumentError(
            "register_block: name must be a valid Python identifier that is not a keyword "
            f"(surgery stores the block under it, e.g. model.layer1.se), got {name!r}."
        )

    def decorator(cls: BlockT) -> BlockT:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InvalidArgumentError(
                f"register_block({name!r}) decorates block classes (nn.Module subclasses), "
                f"got {cls!r} (type {type(cls).__name__})."
            )
        if key in _BLOCKS and _BLOCKS[key] is not cls:
            raise InvalidArgumentError(
                f"register_block: the name {name!r} is already taken by "
                f"{_BLOCKS[key].__qualname__}; choose another name."
            )
        _BLOCKS[key] = cls
        return cls

    return decorator


def available_blocks() -> list[str]:
    """The registered block names, sorted.

    >>> from attnblocks import available_blocks
    >>> "se" in available_blocks()
    True
    """
    return sorted(_BLOCKS)


def get_block_class(block: str | type[nn.Module]) -> type[nn.Module]:
    """Return the block class for a registered name, or ``block`` itself if it is a class."""
    if isinstance(block, type):
        if not issubclass(block, nn.Module):
            raise InvalidArgumentError(
                f"block class {block.__qualname__} is not an nn.Module subclass."
            )
        return block
    if isinstance(block, str):
        key = block.lower()
        if key not in _BLOCKS:
            raise InvalidArgumentError(
                f"unknown block {block!r}; registered blocks are {available_blocks()}, "
                "or pass an nn.Module class."
            )
        return _BLOCKS[key]
    raise InvalidArgumentError(
        f"block must be a registered name {available_blocks()} or an nn.Module class, "
        f"got {block!r} (type {type(block).__name__})."
    )


def create_block(block: str | type[nn.Module], channels: int, **kwargs: Any) -> nn.Module:
    """Build an attention block from a registered name or a class.

    Args:
        block: a registered name (see :func:`available_blocks`) or a block class.
        channels: the number of channels of the feature map the block will gate.
        **kwargs: keyword options for the block's constructor.

    Example:
        >>> from attnblocks import create_block
        >>> create_block("se", 64, reduction=8).hidden_channels
        8
    """
    cls = get_block_class(block)
    try:
        return cls(channels, **kwargs)
    except TypeError as err:
        raise InvalidArgumentError(
            f"could not build {cls.__qualname__}({channels}, **{kwargs}): {err}"
        ) from None
