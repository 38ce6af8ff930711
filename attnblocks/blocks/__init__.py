"""Attention blocks, one per file, and their registry."""

from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._registry import (
    available_blocks,
    create_block,
    get_block_class,
    register_block,
)
from attnblocks.blocks.se import SEBlock, se_hidden_channels

__all__ = [
    "AttentionBlock",
    "SEBlock",
    "available_blocks",
    "create_block",
    "get_block_class",
    "register_block",
    "se_hidden_channels",
]
