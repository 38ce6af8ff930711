"""The tutorial's 3-conv-layer CNN, and the SE variant built from it with ``insert_se``."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["SE_SITES", "TutorialCNN", "build_model", "count_parameters", "valid_arms"]

#: Where the SE arm gets its blocks: after each conv block's activation (before pooling).
SE_SITES = ["features.block*.relu"]


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size=3, padding=1),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(2),
        )
    )


class TutorialCNN(nn.Module):
    """conv 3->32->64->128 (3x3, BN, ReLU, 2x2 max-pool), FC 2048->512, ReLU, dropout, FC 512->10.

    Args:
        num_classes: the number of outputs.
        widths: the channel counts of the three conv blocks.
        dropout: the dropout probability before the last layer.
        image_size: the input side (32 for CIFAR-10).
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (32, 64, 128),
        dropout: float = 0.5,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            OrderedDict(
                block1=_conv_block(3, c1), block2=_conv_block(c1, c2), block3=_conv_block(c2, c3)
            )
        )
        flat = c3 * (image_size // 8) ** 2
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(flat, 512),
                relu=nn.ReLU(inplace=True),
                dropout=nn.Dropout(dropout),
                fc2=nn.Linear(512, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def valid_arms() -> list[str]:
    """``"baseline"`` and every attention block registered in attnblocks (``"se"``, ...)."""
    from attnblocks import available_blocks

    return ["baseline", *available_blocks()]


def build_model(arm: str, *, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """Build one arm: ``"baseline"`` (the tutorial CNN) or the same CNN with attention.

    ``"se"`` is the tutorial's SE variant, made by :func:`attnblocks.insert_se` (r = 16)
    after each conv block's activation; any other registered block name (``"eca"``,
    ``"cbam"``, ...) is inserted at the same sites by :func:`attnblocks.insert_attention`
    with the block's default options. Channels are found by a probe pass.
    """
    model = TutorialCNN(num_classes=num_classes, image_size=image_size)
    if arm == "baseline":
        return model
    from attnblocks import available_blocks, insert_attention, insert_se

    probe = torch.zeros(1, 3, image_size, image_size)
    if arm == "se":
        return insert_se(model, SE_SITES, reduction=16, example_input=probe)
    if arm in available_blocks():
        return insert_attention(model, SE_SITES, block=arm, example_input=probe)
    raise ValueError(f"unknown arm {arm!r}; valid arms are {valid_arms()}.")
