"""What each inserted block was built from, kept on the block for :func:`save_attention`.

The record is a plain attribute of the block (not a parameter, buffer or module), so
it travels with ``copy.deepcopy`` and pickle, leaves the state dict and ``repr``
alone, and goes away with the block on :func:`~attnblocks.surgery.remove_attention`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from attnblocks.surgery._attach import attached_blocks

__all__ = [
    "BlockPath",
    "InsertedSite",
    "InsertionRecord",
    "inserted_sites",
    "insertion_record",
    "remember_insertion",
]

_ATTRIBUTE = "_attnblocks_insertion"


@dataclass(frozen=True)
class InsertionRecord:
    """How an inserted block was built: ``create_block(block, channels, init=init, **options)``.

    >>> InsertionRecord("se", "identity", {"reduction": 4}, 32)
    InsertionRecord(block='se', init='identity', options={'reduction': 4}, channels=32)
    """

    block: str
    init: str
    options: dict[str, Any] = field(default_factory=dict)
    channels: int = 0


def remember_insertion(
    block: nn.Module, name: str, init: str, options: Mapping[str, Any], channels: int
) -> None:
    """Store on ``block`` the registry name, init and options it was built with."""
    kept = {key: value for key, value in options.items() if key != "init"}
    block.__dict__[_ATTRIBUTE] = InsertionRecord(name, init, kept, channels)


def insertion_record(block: nn.Module) -> InsertionRecord | None:
    """The record :func:`remember_insertion` stored on ``block``, if any."""
    record = block.__dict__.get(_ATTRIBUTE)
    return record if isinstance(record, InsertionRecord) else None


class BlockPath:
    """Where a block is stored in a model: as attribute ``attr`` of module ``host_name``."""

    host_name: str
    attr: str

    @property
    def prefix(self) -> str:
        """The block's state-dict prefix in the model: ``"<host>.<attr>."``."""
        return f"{self.host_name}.{self.attr}." if self.host_name else f"{self.attr}."

    @property
    def label(self) -> str:
        """The block's qualified name in the model: ``"<host>.<attr>"``."""
        return self.prefix[:-1]


@dataclass(frozen=True)
class InsertedSite(BlockPath):
    """One inserted block: its host's qualified name, the host, the attribute and the block."""

    host_name: str
    host: nn.Module
    attr: str
    block: nn.Module


def inserted_sites(model: nn.Module) -> Iterator[InsertedSite]:
    """Every block attnblocks attached to ``model``, in module order, then attach order.

    >>> from torch import nn
    >>> from attnblocks import insert_se
    >>> net = insert_se(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), ["0", "1"])
    >>> [site.label for site in inserted_sites(net)]
    ['0.se', '1.se']
    """
    for host_name, host in model.named_modules():
        for attr in attached_blocks(host):
            block = host._modules.get(attr)
            if block is not None:
                yield InsertedSite(host_name, host, attr, block)
