"""Attention blocks, one per file, and their registry."""

from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._registry import (
    available_blocks,
    create_block,
    get_block_class,
    register_block,
)
from attnblocks.blocks.cbam import CBAMBlock
from attnblocks.blocks.coord import CoordAttentionBlock
from attnblocks.blocks.eca import ECABlock, eca_kernel_size
from attnblocks.blocks.gc import GlobalContextBlock
from attnblocks.blocks.ge import GatherExciteBlock
from attnblocks.blocks.scse import SCSEBlock
from attnblocks.blocks.se import SEBlock, se_hidden_channels
from attnblocks.blocks.simam import SimAMBlock

__all__ = [
    "AttentionBlock",
    "CBAMBlock",
    "CoordAttentionBlock",
    "ECABlock",
    "GatherExciteBlock",
    "GlobalContextBlock",
    "SCSEBlock",
    "SEBlock",
    "SimAMBlock",
    "available_blocks",
    "create_block",
    "eca_kernel_size",
    "get_block_class",
    "register_block",
    "se_hidden_channels",
]
