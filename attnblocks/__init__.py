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
    SurgeryError,
)
from attnblocks._version import __version__
from attnblocks.blocks import (
    AttentionBlock,
    CBAMBlock,
    CoordAttentionBlock,
    ECABlock,
    GatherExciteBlock,
    GlobalContextBlock,
    SCSEBlock,
    SEBlock,
    SimAMBlock,
    available_blocks,
    create_block,
    register_block,
)
from attnblocks.surgery import (
    attention_parameters,
    attention_state_dict,
    freeze_except_attention,
    insert_attention,
    insert_se,
    load_attention,
    plan_attention,
    plan_se,
    remove_attention,
    remove_se,
    save_attention,
)

__all__ = [
    "AttentionBlock",
    "AttnBlocksError",
    "CBAMBlock",
    "ChannelMismatchError",
    "CoordAttentionBlock",
    "ECABlock",
    "GatherExciteBlock",
    "GlobalContextBlock",
    "InvalidArgumentError",
    "InvalidInputError",
    "SCSEBlock",
    "SEBlock",
    "SelectorError",
    "SimAMBlock",
    "SurgeryError",
    "__version__",
    "attention_parameters",
    "attention_state_dict",
    "available_blocks",
    "create_block",
    "freeze_except_attention",
    "insert_attention",
    "insert_se",
    "load_attention",
    "plan_attention",
    "plan_se",
    "register_block",
    "remove_attention",
    "remove_se",
    "save_attention",
]
