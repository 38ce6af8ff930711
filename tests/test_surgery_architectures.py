"""insert_se on real torchvision and timm architectures (random weights, small inputs)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import trained_like_
from _surgery_helpers import assert_unchanged, se_blocks, snapshot
from torch import nn

from attnblocks import SEBlock, SurgeryError
from attnblocks.surgery import insert_se, plan_se, remove_se

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# (id, builder, selectors, example_input needed, number of SE blocks)
ARCHITECTURES: list[tuple[str, Callable[[], nn.Module], list[Any], bool, int]] = [
    ("tv-resnet18", lambda: torchvision.models.resnet18(), ["layer*.*.bn2"], False, 8),
    ("tv-resnet50", lambda: torchvision.models.resnet50(), ["layer*.*.bn3"], False, 16),
    ("tv-vgg11_bn", lambda: torchvision.models.vgg11_bn(), [nn.BatchNorm2d], False, 8),
    # The inverted residual's branch is a plain Sequential: SE runs as its last stage,
    # before the residual addition.
    ("tv-mobilenet_v2", lambda: torchvision.models.mobilenet_v2(), ["features.*.conv"], False, 17),
    (
        "tv-densenet121",
        lambda: torchvision.models.densenet121(),
        ["features.denseblock*.denselayer*.conv2", "features.transition?"],
        False,
        58 + 3,
    ),
    # The block's branch ends channels-last (Permute, Linear ...) so channels come from
    # the probe; the downsampling LayerNorm2d layers are channels-first by name.
    (
        "tv-convnext_tiny",
        lambda: torchvision.models.convnext_tiny(),
        ["features.*.*.block", "features.[246].0"],
        True,
        18 + 3,
    ),
    ("timm-resnet18", lambda: timm.create_model("resnet18"), ["layer*.*.bn2"], False, 8),
    (
        "timm-efficientnet_b0",
        lambda: timm.create_model("efficientnet_b0"),
        ["blocks.*.*.bn2", "bn2"],
        False,
        16 + 1,
    ),
]


# a few small ones are also trained for a step (a backward pass through VGG's
# 100 M-parameter head alone would take seconds)
TRAINED = {"tv-resnet18", "tv-mobilenet_v2", "timm-efficientnet_b0"}


@pytest.mark.parametrize(
    ("build", "layers", "needs_example", "count"),
    [case[1:] for case in ARCHITECTURES],
    ids=[case[0] for case in ARCHITECTURES],
)
def test_architecture(
    build: Callable[[], nn.Module], layers: list[Any], needs_example: bool, count: int
) -> None:
    torch.manual_seed(0)
    # trained-like batch norms: timm zero-initialises the last BN of each residual branch
    model = trained_like_(build())
    example = X if needs_example else None
    with torch.no_grad():
        reference = model(X)
    before = snapshot(model)

    plan = plan_se(model, layers, example_input=example)
    assert len(plan) == count

    # Identity law: a block that starts as the identity leaves the outputs unchanged.
    insert_se(model, layers, init="identity", example_input=example)
    assert len(se_blocks(model)) == count
    with torch.no_grad():
        assert (model(X) - reference).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in model.parameters()) == plan.model_params + plan.params_added

    # Round trip: remove gives the original back, bit for bit.
    remove_se(model)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(X), reference)

    # Default init changes the function.
    insert_se(model, layers, example_input=example)
    with torch.no_grad():
        assert not torch.equal(model(X), reference)


@pytest.mark.parametrize(
    ("build", "layers"),
    [(case[1], case[2]) for case in ARCHITECTURES if case[0] in TRAINED],
    ids=[case[0] for case in ARCHITECTURES if case[0] in TRAINED],
)
def test_architecture_trains_end_to_end(build: Callable[[], nn.Module], layers: list[Any]) -> None:
    torch.manual_seed(0)
    model = insert_se(build().train(), layers)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    blocks = [m for m in model.modules() if isinstance(m, SEBlock)]
    assert blocks and all(b.fc1.weight.grad is not None for b in blocks)


def test_densenet_dense_block_container_is_refused() -> None:
    model = torchvision.models.densenet121()
    with pytest.raises(ValueError, match=r"'features\.denseblock1' \(_DenseBlock\).*container"):
        insert_se(model, ["features.denseblock1"])


def test_convnext_channels_last_layernorm_is_refused() -> None:
    model = torchvision.models.convnext_tiny()
    with pytest.raises(ValueError, match="channels-last"):
        insert_se(model, ["features.1.0.block.2"], example_input=X)


def test_timm_blocks_that_already_have_se_need_another_name() -> None:
    model = timm.create_model("efficientnet_b0")
    with pytest.raises(ValueError, match=r"already has an attribute 'se' \(SqueezeExcite\)"):
        insert_se(model, ["blocks.1.0"], example_input=X)


@pytest.mark.parametrize(
    ("build", "size", "heads"),
    [
        (
            lambda: torchvision.models.inception_v3(
                weights=None, aux_logits=True, init_weights=False
            ),
            75,  # the smallest input inception_v3 takes
            ["AuxLogits"],
        ),
        (
            lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False),
            32,
            ["aux1", "aux2"],
        ),
    ],
    ids=["tv-inception_v3", "tv-googlenet"],
)
def test_auxiliary_heads_are_refused_with_a_selector_that_leaves_them_out(
    build: Callable[[], nn.Module], size: int, heads: list[str]
) -> None:
    model = build().eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    with pytest.raises(SurgeryError) as info:
        insert_se(model, [nn.BatchNorm2d], example_input=x)
    message = str(info.value)
    assert f"'{heads[0]}." in message and "not called" in message and "eval mode" in message
    assert_unchanged(model, before)

    suggested = re.search(r"layers=\[(lambda .*?)\]\.$", message)
    assert suggested is not None, message
    predicate = eval(suggested.group(1), {"nn": nn})  # the selector exactly as shown
    insert_se(model, [predicate], example_input=x)
    sites = se_blocks(model)
    expected = [
        f"{name}.se"
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not name.startswith(tuple(heads))
    ]
    assert sites == expected and len(sites) > 10
