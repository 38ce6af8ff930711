"""The example's networks and their attention arms, built by model surgery.

Two plain networks: the tutorial's 3-conv-layer CNN (``"tutorial"``) and the CIFAR
ResNet-20 of He et al. 2016 (``"resnet20"``). Every attention arm is the plain
network rewritten by :func:`attnblocks.insert_se` / :func:`attnblocks.insert_attention`;
there is no second model class.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "RESNET20_SITES",
    "SE_SITES",
    "ResNet20",
    "TutorialCNN",
    "attention_sites",
    "build_model",
    "count_parameters",
    "valid_arms",
]

#: The plain networks :func:`build_model` knows.
MODELS = ("tutorial", "resnet20")

#: Where the SE arm gets its blocks: after each conv block's activation (before pooling).
SE_SITES = ["features.block*.relu"]

#: ResNet-20's attention sites: the last BatchNorm of each of the 9 residual branches,
#: so the block acts on the branch before the addition (the SE paper's Fig. 3).
RESNET20_SITES = ["layer*.*.bn2"]


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


class _PadShortcut(nn.Module):
    """Option A shortcut: keep every 2nd pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (the residual branch), plus the shortcut, then ReLU.

    ``bn2`` is the branch's last BatchNorm: an attention block put after it acts
    before the addition.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = (
            _PadShortcut(cin, cout) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    first = BasicBlock(cin, cout, stride)
    return nn.Sequential(first, *(BasicBlock(cout, cout, 1) for _ in range(blocks - 1)))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. 2016 (Sec. 4.2): 0.27 M parameters (269,722).

    A 3x3 conv (16 channels) + BN + ReLU stem, three stages of three basic blocks
    with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
    resolution with a stride-2 conv), global average pooling and a linear layer.
    Shortcuts are the paper's option A for CIFAR: identity, and where the shape
    changes, a parameter-free subsampled identity with zero-padded extra channels.
    Convolutions get Kaiming-normal initialisation (fan-out, ReLU gain), BatchNorm
    weight 1 and bias 0, the linear layer PyTorch's default.

    Blocks are named ``layer{1,2,3}.{0,1,2}``; each residual branch ends in
    ``layerX.Y.bn2`` (see :data:`RESNET20_SITES`).

    Args:
        num_classes: the number of outputs.
        widths: the channel counts of the three stages.
        blocks: basic blocks per stage (3 for ResNet-20; 6n + 2 layers in all).

    >>> model = ResNet20()
    >>> count_parameters(model)
    269722
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"ResNet20: blocks must be an int >= 1, got {blocks!r}.")
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c1, c2, c3 = widths
        self.layer1 = _stage(c1, c1, blocks, stride=1)
        self.layer2 = _stage(c1, c2, blocks, stride=2)
        self.layer3 = _stage(c2, c3, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def valid_arms() -> list[str]:
    """``"baseline"``, ``"se_r4"`` (SE with r = 4) and every attention block registered in
    attnblocks (``"se"``, ``"eca"``, ``"cbam"``, ...)."""
    from attnblocks import available_blocks

    return ["baseline", *available_blocks(), "se_r4"]


def attention_sites(model: str) -> list[str]:
    """The selectors of ``model``'s attention sites (:data:`SE_SITES` or :data:`RESNET20_SITES`)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid models are {list(MODELS)}.")
    return SE_SITES if model == "tutorial" else RESNET20_SITES


def build_model(
    arm: str,
    *,
    model: str = "tutorial",
    num_classes: int = 10,
    image_size: int = 32,
    init: str = "default",
) -> nn.Module:
    """Build one arm of one model: ``"baseline"`` (the plain network) or it with attention.

    ``model`` is ``"tutorial"`` (the tutorial CNN) or ``"resnet20"`` (:class:`ResNet20`).
    For the tutorial CNN, ``"se"`` is the tutorial's SE variant, made by
    :func:`attnblocks.insert_se` (r = 16) after each conv block's activation. For
    ResNet-20 every arm is made by :func:`attnblocks.insert_attention` after the last
    BatchNorm of each residual branch (9 sites), ``"se"`` with r = 16. On both,
    ``"se_r4"`` is SE with r = 4 and any other registered block name (``"eca"``,
    ``"cbam"``, ...) is inserted with the block's default options. ``init`` is passed
    on (``"identity"``: every block starts as an exact identity). Channels are found
    by a probe pass.

    >>> net = build_model("se", model="resnet20")
    >>> count_parameters(net) - count_parameters(build_model("baseline", model="resnet20"))
    2373
    """
    sites = attention_sites(model)
    net: nn.Module
    if model == "tutorial":
        net = TutorialCNN(num_classes=num_classes, image_size=image_size)
    else:
        net = ResNet20(num_classes=num_classes)
    if arm == "baseline":
        return net
    from attnblocks import available_blocks, insert_attention, insert_se

    probe = torch.zeros(1, 3, image_size, image_size)
    if arm == "se" and model == "tutorial":
        return insert_se(net, sites, reduction=16, init=init, example_input=probe)
    if arm in ("se", "se_r4"):
        reduction = 16 if arm == "se" else 4
        return insert_attention(
            net, sites, block="se", reduction=reduction, init=init, example_input=probe
        )
    if arm in available_blocks():
        return insert_attention(net, sites, block=arm, init=init, example_input=probe)
    raise ValueError(f"unknown arm {arm!r}; valid arms are {valid_arms()}.")
