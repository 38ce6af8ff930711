"""insert_attention(..., init="identity") for every registered block, over a small CNN.

Blocks whose class sets ``supports_identity_init`` leave the model's outputs unchanged
(bit for bit, in train and eval mode) while every inserted parameter
receives gradient; the others are refused with an error that says why and which
blocks do support it, and the model is left untouched.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import TinyResNet, small_cnn, trained_like_
from _surgery_helpers import assert_unchanged, snapshot
from torch import nn

from attnblocks import (
    AttentionBlock,
    InvalidArgumentError,
    available_blocks,
    insert_attention,
    plan_attention,
    remove_attention,
)
from attnblocks.blocks import get_block_class

#: Block options tried besides the defaults (identity init must hold for each).
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "cbam": [{"spatial_kernel_size": 3, "activation": "silu"}],
    "eca": [{"kernel_size": 5, "bias": True}],
    "scse": [{"combine": "max"}, {"reduction": 2}],
    "se": [{"activation": "gelu", "gate": "hard_sigmoid"}, {"hidden_channels": 1}],
}

#: The blocks the documentation lists as supporting identity init.
DOCUMENTED = {"se", "eca", "cbam", "scse"}

SUPPORTED = [n for n in available_blocks() if get_block_class(n).supports_identity_init]
UNSUPPORTED = [n for n in available_blocks() if n not in SUPPORTED]


def _cases() -> list[Any]:
    cases = []
    for name in SUPPORTED:
        for options in [{}, *OPTIONS.get(name, [])]:
            label = ",".join(f"{k}={v}" for k, v in options.items())
            cases.append(pytest.param(name, options, id=f"{name}[{label}]" if label else name))
    return cases


def _blocks(model: nn.Module) -> list[AttentionBlock]:
    return [m for m in model.modules() if isinstance(m, AttentionBlock)]


@pytest.mark.parametrize(("name", "options"), _cases())
@pytest.mark.parametrize(
    ("build", "layers", "shape", "example"),
    [
        pytest.param(small_cnn, ["1", "4"], (4, 3, 8, 8), False, id="cnn-bn"),
        pytest.param(small_cnn, ["2", "5"], (4, 3, 8, 8), True, id="cnn-relu-probe"),
        pytest.param(TinyResNet, ["stem", "blocks.*.bn2"], (4, 3, 12, 12), False, id="resnet"),
    ],
)
def test_identity_insertion_keeps_the_outputs(
    name: str,
    options: dict[str, Any],
    build: Any,
    layers: list[str],
    shape: tuple[int, ...],
    example: bool,
) -> None:
    torch.manual_seed(0)
    model = trained_like_(build())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before_eval = model.eval()(x)
        statistics = copy.deepcopy(model.state_dict())
        before_train = model.train()(x)  # moves the BatchNorm running statistics...
        model.load_state_dict(statistics)  # ...which are put back
    example_input = x[:1] if example else None
    insert_attention(
        model, layers, block=name, init="identity", example_input=example_input, **options
    )
    blocks = _blocks(model)
    assert len(blocks) == len(layers) + (1 if "blocks.*.bn2" in layers else 0)
    assert all(block.init == "identity" for block in blocks)
    with torch.no_grad():
        after_eval = model.eval()(x)
        after_train = model.train()(x)
    assert torch.equal(after_eval, before_eval)
    assert torch.equal(after_train, before_train)
    # identity, yet trainable: every parameter of every inserted block gets gradient
    model.train()
    model(x).square().sum().backward()
    for block in blocks:
        for pname, param in block.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_blocks_without_identity_init_are_refused_saying_why(name: str) -> None:
    model = trained_like_(small_cnn())
    before = snapshot(model)
    cls = get_block_class(name)
    reason = cls.identity_init_unavailable
    assert reason, f"{cls.__name__} should say why it has no identity init"
    for call in (insert_attention, plan_attention):
        with pytest.raises(InvalidArgumentError) as info:
            call(model, ["1", "4"], block=name, init="identity")
        message = str(info.value)
        assert f"init='identity' is not available for {cls.__name__}" in message
        assert reason in message
        assert str(SUPPORTED) in message
        assert_unchanged(model, before)
    # the default init still works, and removes cleanly
    insert_attention(model, ["1", "4"], block=name)
    assert len(_blocks(model)) == 2
    remove_attention(model)
    assert not _blocks(model)


def test_the_documented_list_is_the_registry() -> None:
    assert set(SUPPORTED) == DOCUMENTED
    page = (Path(__file__).resolve().parents[1] / "docs" / "blocks.rst").read_text()
    assert "It is available for SE, ECA, CBAM and scSE." in page
    plan = plan_attention(small_cnn(), ["1"], block="cbam", init="identity")
    assert plan.init == "identity"
