"""attnblocks: channel attention for PyTorch.

Squeeze-and-Excitation and its relatives as well-tested modules, and the tools to
add them to any model.

>>> import torch
>>> from attnblocks import SEBlock
>>> SEBlock(32)(torch.randn(2, 32, 8, 8)).shape
torch.Size([2, 32, 8, 8])
"""

from attnblocks._errors import (
    AttnBlocksError,
    ChannelMismatchError,
    InvalidArgumentError,
    InvalidInputError,
    SelectorError,
)
from attnblocks._version import __version__
from attnblocks.blocks import (
    AttentionBlock,
    SEBlock,
    available_blocks,
    create_block,
    register_block,
)

__all__ = [
    "AttentionBlock",
    "AttnBlocksError",
    "ChannelMismatchError",
    "InvalidArgumentError",
    "InvalidInputError",
    "SEBlock",
    "SelectorError",
    "__version__",
    "available_blocks",
    "create_block",
    "register_block",
]
