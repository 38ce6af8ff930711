"""Surgery after hand edits: deleted blocks, renumbered Sequentials, a second block at a site."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _models import TinyResNet, small_cnn, trained_like_
from _surgery_helpers import assert_unchanged, snapshot
from torch import nn

from attnblocks import CBAMBlock, SEBlock, SurgeryError
from attnblocks.surgery import (
    insert_attention,
    insert_se,
    plan_attention,
    remove_attention,
    remove_se,
)

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _hook_free(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_a_forward_through_the_hook_of_a_deleted_block_says_what_happened() -> None:
    model = trained_like_(TinyResNet())
    insert_se(model, ["blocks.*.bn2"])
    del model.blocks[0].bn2.se
    with pytest.raises(SurgeryError) as info:
        model(torch.randn(1, 3, 8, 8))
    message = str(info.value)
    for fragment in ["attention block 'se'", "BatchNorm2d", "removed by hand", "remove_attention"]:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "remove", [remove_se, remove_attention], ids=["remove_se", "remove_attention"]
)
def test_remove_drops_the_leftovers_of_a_deleted_block(remove: object) -> None:
    model = trained_like_(small_cnn()).eval()
    before = snapshot(model)
    with torch.no_grad():
        reference = model(X)
    insert_se(model, ["1", "4"])
    del model[1].se
    assert remove(model) is model  # type: ignore[operator]
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(X), reference)


def test_remove_se_drops_leftovers_and_keeps_blocks_of_other_kinds() -> None:
    model = trained_like_(small_cnn()).eval()
    insert_se(model, ["1"])
    insert_attention(model, ["1", "4"], block="cbam", reduction=2)
    del model[1].se
    remove_se(model)
    assert [n for n, m in model.named_modules() if isinstance(m, CBAMBlock)] == [
        "1.cbam",
        "4.cbam",
    ]
    assert model(X).shape == (2, 4)
    remove_attention(model)
    assert _hook_free(model)


def test_remove_survives_a_block_set_to_none_and_hooks_whose_record_was_lost() -> None:
    model = small_cnn()
    before = snapshot(model)
    insert_se(model, ["1", "4"])
    model[1].se = None  # registered as a None child
    del model[4].__dict__["_attnblocks_inserted"]  # the record gone, the hook still there
    remove_attention(model)
    assert_unchanged(model, before)


def test_leftovers_survive_a_copy_and_are_removed_from_it() -> None:
    model = small_cnn().eval()  # the failing forward must not touch running statistics
    before = snapshot(model)
    insert_se(model, ["1"])
    del model[1].se
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(SurgeryError, match="removed by hand"):
            copied(X)
        remove_se(copied)
        assert_unchanged(copied, before)


@pytest.mark.parametrize(
    "edit",
    [
        lambda seq: seq.__delitem__(0),
        lambda seq: seq.pop(1),
        lambda seq: seq.__delitem__(slice(0, 2)),
    ],
    ids=["del-first", "pop", "del-slice"],
)
@pytest.mark.parametrize(
    "remove", [remove_se, remove_attention], ids=["remove_se", "remove_attention"]
)
def test_an_appended_block_is_found_after_the_sequential_renumbers_its_keys(
    edit: object, remove: object
) -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 3, 1), nn.Identity(), nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)]
        return nn.Sequential(nn.Sequential(*layers), nn.Flatten()).eval()

    expected = build()
    edit(expected[0])  # type: ignore[operator]
    before = snapshot(expected)

    model = build()
    insert_se(model, ["0"])
    edit(model[0])  # type: ignore[operator]
    assert "se" not in model[0]._modules  # renumbered: the block now has a number as key
    assert model(X).shape[0] == 2
    remove(model)  # type: ignore[operator]
    assert_unchanged(model, before)
    assert not any(isinstance(m, SEBlock) for m in model.modules())


def test_an_appended_block_deleted_from_its_sequential_leaves_nothing_behind() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))).eval()
    before = snapshot(model)
    insert_se(model, ["0"])
    del model[0][-1]  # the SE block itself
    assert model(X).shape == (2, 8, 8, 8)
    remove_se(model)
    assert_unchanged(model, before)


def test_a_second_block_at_a_sequential_site_sees_through_the_first() -> None:
    model = trained_like_(TinyResNet()).eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    insert_se(model, ["stem"])
    plan = plan_attention(model, ["stem"], block="cbam", reduction=4)
    assert plan.sites[0].channels == 16
    assert plan.sites[0].channel_source == "Sequential[1] BatchNorm2d.num_features"
    insert_attention(model, ["stem"], block="cbam", reduction=4)
    assert list(model.stem._modules) == ["0", "1", "2", "se", "cbam"]
    assert model.stem.cbam.channels == 16
    assert model(x).shape == reference.shape
    remove_se(model)
    assert list(model.stem._modules) == ["0", "1", "2", "cbam"]
    remove_attention(model)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_a_second_block_at_a_probed_sequential_site() -> None:
    model = small_cnn()
    seq = nn.Sequential(model, nn.Unflatten(1, (4, 1, 1)))  # ends in a shapeless module
    insert_se(seq, [""], example_input=X)
    insert_attention(seq, [""], block="eca", example_input=X)
    assert list(seq._modules) == ["0", "1", "se", "eca"]
    assert seq(X).shape == (2, 4, 1, 1)
