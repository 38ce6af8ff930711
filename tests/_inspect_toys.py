"""Small SE models with blocks placed by hand, shared by the inspect and plot tests."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from attnblocks import SEBlock


def toy_se_net(num_classes: int = 5, width: int = 8, seed: int = 0) -> nn.Sequential:
    """conv-bn-relu-SE, strided conv-bn-relu-SE, pool, linear. SE sites: stem.se, stage.se."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(3, width, 3, padding=1),
                    bn=nn.BatchNorm2d(width),
                    relu=nn.ReLU(inplace=True),
                    se=SEBlock(width, reduction=2),
                )
            ),
            stage=nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                    bn=nn.BatchNorm2d(2 * width),
                    relu=nn.ReLU(inplace=True),
                    se=SEBlock(2 * width, reduction=4),
                )
            ),
            head=nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
            ),
        )
    )
    # make batch-norm statistics non-trivial so eval and train differ
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The number of registered hooks of every kind, per module."""
    out = {}
    for name, module in model.named_modules():
        out[name] = (
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._backward_hooks),
            len(module._backward_pre_hooks),
            len(getattr(module, "_gate_hooks", ())),
        )
    return out


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]
