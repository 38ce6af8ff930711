"""Inserted blocks take their host's train/eval mode; nothing else changes mode.

A block inserted into an eval-mode model must be in eval mode (a Coordinate Attention
or Gather-Excite block in training mode would use batch statistics at inference and
update its BatchNorm running statistics), into a train-mode model in train mode, and in
a model with mixed modes, the mode of the module it is attached to. Planning
(``plan_*``) changes no mode at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import TinyResNet, small_cnn, trained_like_
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnblocks import (
    AttentionBlock,
    available_blocks,
    insert_attention,
    insert_se,
    plan_attention,
    plan_se,
)
from attnblocks.surgery._attach import attached_blocks

#: Sites of the test models where every registered block fits (2D maps, channels known).
SITES: dict[str, list[str]] = {
    "cnn": ["0", "1", "3", "4"],
    "resnet": ["stem", "stem.1", "blocks.0.bn1", "blocks.1.bn2"],
}


def _build(kind: str) -> nn.Module:
    return trained_like_(small_cnn(width=8) if kind == "cnn" else TinyResNet(width=16))


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _inserted(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(host, block) for every block attnblocks attached."""
    pairs = []
    for host in model.modules():
        for attr in attached_blocks(host):
            pairs.append((host, host._modules[attr]))
    return pairs


def _assert_blocks_follow_hosts(model: nn.Module, before: dict[str, bool]) -> None:
    inserted = {id(m) for _, block in _inserted(model) for m in block.modules()}
    assert inserted, "nothing was inserted"
    for host, block in _inserted(model):
        for name, sub in block.named_modules():
            assert sub.training == host.training, (type(block).__name__, name)
    for name, module in model.named_modules():
        if id(module) not in inserted:
            assert module.training == before[name], name


@pytest.mark.parametrize("name", available_blocks())
@pytest.mark.parametrize("training", [False, True])
def test_an_inserted_block_is_in_the_model_mode(name: str, training: bool) -> None:
    model = _build("cnn").train(training)
    insert_attention(model, ["1", "4"], block=name)
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == 2
    for block in blocks:
        assert all(sub.training == training for sub in block.modules())


@pytest.mark.parametrize("name", available_blocks())
def test_an_eval_model_stays_deterministic_per_sample_after_insertion(name: str) -> None:
    # In eval mode a sample's output does not depend on the rest of its batch, and no
    # running statistic moves, whatever the block holds (BatchNorm in CA and GE).
    torch.manual_seed(0)
    model = _build("cnn").eval()
    insert_attention(model, ["1", "4"], block=name)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        whole = model(x)
        first = model(x[:1])
    torch.testing.assert_close(whole[:1], first, rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@given(
    name=st.sampled_from(available_blocks()),
    kind=st.sampled_from(sorted(SITES)),
    data=st.data(),
    use_example=st.booleans(),
)
def test_blocks_take_their_host_mode_in_a_mixed_mode_model(
    name: str, kind: str, data: st.DataObject, use_example: bool
) -> None:
    model = _build(kind)
    for module in model.modules():  # a random mode for every module
        module.training = data.draw(st.booleans(), label="mode")
    layers = data.draw(
        st.lists(st.sampled_from(SITES[kind]), min_size=1, max_size=3, unique=True),
        label="layers",
    )
    before = _modes(model)
    example = torch.randn(1, 3, 8, 8) if use_example else None
    plan = plan_attention(model, layers, block=name, example_input=example)
    assert _modes(model) == before, "plan_attention changed a mode"
    assert len(plan.sites) == len(layers)
    insert_attention(model, layers, block=name, example_input=example)
    _assert_blocks_follow_hosts(model, before)


def test_plan_se_and_insert_se_keep_modes() -> None:
    model = _build("resnet")
    model.train()
    model.blocks[0].eval()  # a frozen stage inside a training model
    before = _modes(model)
    plan_se(model, ["stem", "blocks.*.bn2"], example_input=torch.randn(1, 3, 8, 8))
    assert _modes(model) == before
    insert_se(model, ["stem", "blocks.*.bn2"], reduction=4)
    _assert_blocks_follow_hosts(model, before)
    assert model.stem.se.training
    assert not model.blocks[0].bn2.se.training
    assert model.blocks[1].bn2.se.training
