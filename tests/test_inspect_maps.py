"""record_maps: the maps captured are the ones the blocks applied; nothing is left behind."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from _inspect_toys import hook_counts as module_hook_counts
from _inspect_toys import modes
from _models import small_cnn, trained_like_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import (
    CBAMBlock,
    CoordAttentionBlock,
    GatherExciteBlock,
    GlobalContextBlock,
    InvalidArgumentError,
    InvalidInputError,
    SCSEBlock,
    SEBlock,
    SelectorError,
    SimAMBlock,
    insert_attention,
)
from attnblocks.inspect import record_features, record_gates, record_maps


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every kind of hook per module, the attention blocks' map hooks included."""
    counts = module_hook_counts(model)
    return {
        name: (*counts[name], len(getattr(module, "_map_hooks", ())))
        for name, module in model.named_modules()
    }


#: The blocks of toy_spatial_net with a spatial map, and the channel count of their map.
MAP_SITES = {"cbam": 1, "simam": 12, "coord": 12, "gc": 1, "scse": 1, "ge": 12}


def toy_spatial_net(seed: int = 0) -> nn.Sequential:
    """A CNN with one block of every spatial kind placed by hand, and one SE block."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3, padding=1),
            bn=nn.BatchNorm2d(8),
            cbam=CBAMBlock(8, reduction=2),
            se=SEBlock(8, reduction=2),
            conv2=nn.Conv2d(8, 12, 3, stride=2, padding=1),
            simam=SimAMBlock(12),
            coord=CoordAttentionBlock(12),
            gc=GlobalContextBlock(12, reduction=4),
            scse=SCSEBlock(12, reduction=3),
            ge=GatherExciteBlock(12, extent=2),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3)),
        )
    )
    return trained_like_(net, seed)


def expected_maps(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block's spatial_map on the input it really receives, computed step by step."""
    out = {}
    h = x
    for name, module in net.named_children():
        if name in MAP_SITES:
            out[name] = module.spatial_map(h)
        h = module(h)
    return out


@settings(deadline=None, max_examples=10)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    side=st.integers(4, 10),
    seed=st.integers(0, 1000),
)
def test_recorded_maps_equal_each_blocks_spatial_map(
    sizes: list[int], side: int, seed: int
) -> None:
    net = toy_spatial_net().eval()
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, 3, side, side + 1, generator=generator) for n in sizes]
    with torch.no_grad(), record_maps(net) as rec:
        for x in batches:
            net(x)
    assert rec.sites == tuple(MAP_SITES)  # SE has no map; model order
    with torch.no_grad():
        expected = [expected_maps(net, x) for x in batches]
    for site, channels in MAP_SITES.items():
        want = torch.cat([e[site] for e in expected])
        got = rec.maps[site]
        assert got.shape[:2] == (sum(sizes), channels)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_maps_of_inserted_blocks_and_gates_together() -> None:
    """Blocks added by insert_attention are found too; gates and maps record side by side."""
    model = trained_like_(small_cnn())
    insert_attention(model, ["1"], block="cbam", reduction=2)
    insert_attention(model, ["4"], block="scse", reduction=4)
    x = torch.randn(3, 3, 8, 8)
    with (
        torch.no_grad(),
        record_maps(model) as maps,
        record_gates(model) as gates,
        record_features(model, ["1"], before_hooks=True) as feats,  # what CBAM receives
    ):
        model(x)
    assert maps.sites == ("1.cbam", "4.scse") == gates.sites
    assert maps.maps["4.scse"].shape == (3, 1, 8, 8)
    with torch.no_grad():
        bn = feats.features["1"]
        want_map = model[1].cbam.spatial_map(bn)
        want_gate = model[1].cbam.excitation(bn)
    torch.testing.assert_close(maps.maps["1.cbam"], want_map, rtol=0, atol=0)
    torch.testing.assert_close(gates.gates["1.cbam"], want_gate, rtol=0, atol=0)


def test_hooks_removed_after_exit_and_after_exceptions() -> None:
    net = toy_spatial_net()
    before = hook_counts(net)
    with record_maps(net) as rec:
        assert rec.active
        assert hook_counts(net) != before
        net(torch.randn(2, 3, 8, 8))
    assert not rec.active
    assert hook_counts(net) == before
    with pytest.raises(RuntimeError, match="boom"), record_maps(net):
        net(torch.randn(2, 3, 8, 8))
        raise RuntimeError("boom")
    assert hook_counts(net) == before
    with pytest.raises(RuntimeError), record_maps(net):
        net(torch.randn(2, 4, 8, 8))  # wrong channel count: the first conv raises
    assert hook_counts(net) == before
    # a forward pass after the context records nothing
    net(torch.randn(5, 3, 8, 8))
    assert rec.maps["cbam"].shape[0] == 2
    assert repr(rec).startswith("MapRecorder(closed")


@pytest.mark.parametrize("training", [True, False])
def test_mode_and_grads_untouched(training: bool) -> None:
    net = toy_spatial_net().train(training)
    net.bn.eval()  # a mixed state must survive too
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before_modes = modes(net)
    with record_maps(net) as rec:
        out = net(torch.randn(4, 3, 8, 8))
    assert modes(net) == before_modes
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    assert out.requires_grad
    assert all(not m.requires_grad for m in rec.maps.values())


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_reduce_over_channels(reduce: str) -> None:
    net = toy_spatial_net().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad(), record_maps(net) as full, record_maps(net, reduce=reduce) as small:
        net(x)
    for site in MAP_SITES:
        want = full.maps[site].mean(1, keepdim=True)
        if reduce == "max":
            want = full.maps[site].amax(1, keepdim=True)
        torch.testing.assert_close(small.maps[site], want)
        assert small.maps[site].shape[1] == 1


def test_pop_keep_batches_and_varying_sizes() -> None:
    net = toy_spatial_net().eval()
    with torch.no_grad(), record_maps(net, keep=False, sites=["cbam"]) as rec:
        net(torch.randn(3, 3, 8, 8))
        first = rec.pop()
        net(torch.randn(2, 3, 8, 8))
        assert rec.maps["cbam"].shape == (2, 1, 8, 8)  # popped maps are gone
    assert first["cbam"].shape == (3, 1, 8, 8)
    rec.clear()
    assert rec.maps["cbam"].numel() == 0

    with torch.no_grad(), record_maps(net, sites=["cbam", "g*"], device=None) as rec:
        net(torch.randn(2, 3, 8, 8))
        net(torch.randn(1, 3, 12, 6))
    assert rec.sites == ("cbam", "gc", "ge")  # model order, not selector order
    assert [m.shape for m in rec.batches["cbam"]] == [(2, 1, 8, 8), (1, 1, 12, 6)]
    with pytest.raises(InvalidInputError, match=r"\.batches\['cbam'\]"):
        rec.maps  # noqa: B018


@pytest.mark.parametrize(
    ("model", "sites", "error", "match"),
    [
        ("se-only", None, InvalidArgumentError, "no attention block with a spatial map"),
        ("spatial", ["se"], SelectorError, "matches no attention block with a spatial map"),
        ("spatial", ["c0nv"], SelectorError, "Closest module names"),
        ("spatial", "cbam", SelectorError, "list of selectors"),
        ("spatial", [], SelectorError, "record_maps: sites is empty"),
    ],
)
def test_errors(model: str, sites: object, error: type[Exception], match: str) -> None:
    net = toy_spatial_net()
    if model == "se-only":
        net = nn.Sequential(nn.Conv2d(3, 4, 1), SEBlock(4, reduction=2), GatherExciteBlock(4))
    before = hook_counts(net)
    with pytest.raises(error, match=match), record_maps(net, sites=sites):
        pass
    assert hook_counts(net) == before
    with pytest.raises(InvalidArgumentError, match=r"unknown reduce 'sum'.*'mean', 'max'"):
        record_maps(net, reduce="sum").__enter__()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"torch\.nn\.Module"):
        record_maps("model").__enter__()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="device must be"):
        record_maps(net, device="nope").__enter__()  # type: ignore[arg-type]
