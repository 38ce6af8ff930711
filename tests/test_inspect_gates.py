"""record_gates: what is captured, and what is left behind (nothing)."""

from __future__ import annotations

import pytest
import torch
from _inspect_toys import hook_counts, modes, toy_se_net
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import InvalidArgumentError, InvalidInputError, SEBlock, SelectorError
from attnblocks.inspect import record_gates


def _expected_gates(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gates recomputed directly with block.excitation on the block's real input."""
    h = net.stem[:3](x)
    g1 = net.stem.se.excitation(h)
    h = net.stage[:3](net.stem.se(h))
    g2 = net.stage.se.excitation(h)
    return {"stem.se": g1, "stage.se": g2}


@settings(deadline=None, max_examples=10)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_recorded_gates_equal_recomputed_gates(sizes: list[int], seed: int) -> None:
    net = toy_se_net().eval()
    torch.manual_seed(seed)
    batches = [torch.randn(n, 3, 8, 8) for n in sizes]
    with torch.no_grad(), record_gates(net) as rec:
        for x in batches:
            net(x)
    assert rec.sites == ("stem.se", "stage.se")
    with torch.no_grad():
        expected = [_expected_gates(net, x) for x in batches]
    for site, channels in (("stem.se", 8), ("stage.se", 16)):
        want = torch.cat([e[site] for e in expected])
        assert rec.gates[site].shape == (sum(sizes), channels)
        torch.testing.assert_close(rec.gates[site], want, rtol=0, atol=0)


def test_hooks_removed_after_exit_and_after_exception() -> None:
    net = toy_se_net()
    before = hook_counts(net)
    with record_gates(net) as rec:
        assert rec.active
        assert hook_counts(net) != before
        net(torch.randn(2, 3, 8, 8))
    assert not rec.active
    assert hook_counts(net) == before
    with pytest.raises(RuntimeError, match="boom"), record_gates(net):
        net(torch.randn(2, 3, 8, 8))
        raise RuntimeError("boom")
    assert hook_counts(net) == before
    # a forward pass after the context records nothing
    rows = rec.gates["stem.se"].shape[0]
    net(torch.randn(3, 3, 8, 8))
    assert rec.gates["stem.se"].shape[0] == rows == 2


def test_hooks_removed_when_forward_raises_inside() -> None:
    net = toy_se_net()
    before = hook_counts(net)
    with pytest.raises(RuntimeError), record_gates(net):
        net(torch.randn(2, 4, 8, 8))  # wrong channel count: the first conv raises
    assert hook_counts(net) == before


@pytest.mark.parametrize("training", [True, False])
def test_mode_and_grads_untouched(training: bool) -> None:
    net = toy_se_net().train(training)
    net.stage.bn.eval()  # a mixed state must survive too
    loss = net(torch.randn(4, 3, 8, 8)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before_modes = modes(net)
    with record_gates(net) as rec:
        out = net(torch.randn(4, 3, 8, 8))
    assert modes(net) == before_modes
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    assert out.requires_grad  # recording does not disable autograd for the model
    assert all(not g.requires_grad for g in rec.gates.values())


def test_pop_and_keep() -> None:
    net = toy_se_net().eval()
    with torch.no_grad(), record_gates(net, keep=False) as rec:
        net(torch.randn(3, 3, 8, 8))
        first = rec.pop()
        net(torch.randn(2, 3, 8, 8))
        assert rec.gates["stem.se"].shape == (2, 8)  # popped rows are gone
        second = rec.pop()
    assert first["stem.se"].shape == (3, 8) and second["stage.se"].shape == (2, 16)
    assert rec.gates["stem.se"].shape == (0, 8)

    with torch.no_grad(), record_gates(net) as rec:
        net(torch.randn(3, 3, 8, 8))
        assert rec.pop()["stem.se"].shape == (3, 8)
        net(torch.randn(2, 3, 8, 8))
        assert rec.pop()["stem.se"].shape == (2, 8)
    assert rec.gates["stem.se"].shape == (5, 8)  # keep=True keeps everything
    rec.clear()
    assert rec.gates["stem.se"].shape == (0, 8)


def test_sites_selection_and_device_none() -> None:
    net = toy_se_net().eval()
    with torch.no_grad(), record_gates(net, sites=["stage.*"], device=None) as rec:
        net(torch.randn(2, 3, 8, 8))
    assert list(rec.gates) == ["stage.se"]
    with torch.no_grad(), record_gates(net, sites=[SEBlock]) as rec:
        net(torch.randn(2, 3, 8, 8))
    assert list(rec.gates) == ["stem.se", "stage.se"]


def test_shared_block_called_twice_records_both_calls() -> None:
    se = SEBlock(4, reduction=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), se, se)
    with torch.no_grad(), record_gates(net) as rec:
        net(torch.randn(3, 3, 4, 4))
    assert list(rec.gates) == ["1"]
    assert rec.gates["1"].shape == (6, 4)


@pytest.mark.parametrize(
    ("model_sites", "error", "match"),
    [
        ("plain", InvalidArgumentError, "contains no channel attention block"),
        (["stem.conv"], SelectorError, "matches no attention block"),
        (["stem.s\u0435"], SelectorError, "Closest module names"),  # Cyrillic e
        ("stem.se", SelectorError, "list of selectors"),
        ([], SelectorError, "record_gates: sites is empty; pass None"),
    ],
)
def test_errors(model_sites: object, error: type[Exception], match: str) -> None:
    net = toy_se_net()
    model = nn.Sequential(nn.Conv2d(3, 3, 1)) if model_sites == "plain" else net
    sites = None if model_sites == "plain" else model_sites
    with pytest.raises(error, match=match), record_gates(model, sites=sites):
        pass
    assert hook_counts(net) == hook_counts(toy_se_net())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "nope"}, "device must be None .* got 'nope'"),
        ({"device": 42}, "device must be"),
        ({"keep": 2}, "keep must be True or False"),
    ],
)
def test_bad_options_are_refused_before_any_hook(kwargs: dict, match: str) -> None:
    net = toy_se_net()
    before = hook_counts(net)
    with pytest.raises(InvalidArgumentError, match=match), record_gates(net, **kwargs):
        pass
    assert hook_counts(net) == before


def test_meta_gates_cannot_be_stored_on_a_real_device() -> None:
    net = toy_se_net().to("meta")
    x = torch.randn(2, 3, 8, 8, device="meta")
    with pytest.raises(InvalidInputError, match="meta device"), record_gates(net):
        net(x)
    with record_gates(net, device=None) as rec:  # kept where they were computed
        net(x)
    assert rec.gates["stem.se"].is_meta and rec.gates["stem.se"].shape == (2, 8)
