"""record_features: outputs of chosen modules, captured before in-place changes."""

from __future__ import annotations

import pytest
import torch
from _inspect_toys import hook_counts, modes, toy_se_net
from torch import nn

from attnblocks import InvalidArgumentError, InvalidInputError, SelectorError
from attnblocks.inspect import record_features


def test_features_equal_module_outputs() -> None:
    net = toy_se_net().eval()
    xs = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    layers = ["stem.conv", "stage", r"re:stage\.(bn|relu|se)"]
    with torch.no_grad(), record_features(net, layers) as rec:
        for x in xs:
            net(x)
    assert rec.layers == ("stem.conv", "stage", "stage.bn", "stage.relu", "stage.se")
    with torch.no_grad():
        x = torch.cat(xs)
        conv = net.stem.conv(x)
        stage_in = net.stem(x)
    torch.testing.assert_close(rec.features["stem.conv"], conv)
    # stem.conv is followed by bn and an in-place ReLU; what was recorded has negatives
    assert (rec.features["stem.conv"] < 0).any()
    stage_bn = net.stage.bn(net.stage.conv(stage_in))
    torch.testing.assert_close(rec.features["stage.bn"], stage_bn)  # before the in-place ReLU
    torch.testing.assert_close(rec.features["stage.relu"], stage_bn.clamp(min=0))
    assert [t.shape[0] for t in rec.batches["stage"]] == [2, 3]
    assert rec.features["stage.se"].shape == (5, 16, 4, 4)


def test_hooks_removed_mode_kept_and_errors() -> None:
    net = toy_se_net()
    before, before_modes = hook_counts(net), modes(net)
    with pytest.raises(RuntimeError, match="boom"), record_features(net, [nn.Conv2d]):
        raise RuntimeError("boom")
    assert hook_counts(net) == before and modes(net) == before_modes
    with pytest.raises(SelectorError, match="Closest"), record_features(net, ["stem.cnv"]):
        pass
    tuple_net = nn.Sequential(nn.LSTM(4, 4, batch_first=True))
    with pytest.raises(InvalidInputError, match="not a tensor"), record_features(tuple_net, ["0"]):
        tuple_net(torch.randn(2, 3, 4))
    assert hook_counts(tuple_net)["0"] == (0, 0, 0, 0, 0)
    with pytest.raises(InvalidArgumentError, match="device must be"):
        record_features(net, ["stem.conv"], device="nope").__enter__()
    with pytest.raises(InvalidArgumentError, match="before_hooks must be True or False"):
        record_features(net, ["stem.conv"], before_hooks="yes").__enter__()  # type: ignore[arg-type]
    assert hook_counts(net) == before


def test_mismatched_shapes_point_to_batches() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 1))
    with record_features(net, ["0"]) as rec:
        net(torch.randn(1, 3, 4, 4))
        net(torch.randn(1, 3, 5, 5))
    with pytest.raises(InvalidInputError, match="batches"):
        rec.features  # noqa: B018
    assert [tuple(t.shape) for t in rec.batches["0"]] == [(1, 2, 4, 4), (1, 2, 5, 5)]
    assert not rec.batches["0"][0].requires_grad


def test_before_hooks_records_the_module_own_output() -> None:
    conv = nn.Conv2d(3, 2, 1)
    net = nn.Sequential(conv)
    conv.register_forward_hook(lambda module, args, out: 2 * out)  # like an inserted block
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad(), record_features(net, ["0"]) as seen:
        net(x)
    with torch.no_grad(), record_features(net, ["0"], before_hooks=True) as own:
        net(x)
    torch.testing.assert_close(seen.features["0"], 2 * own.features["0"])
    torch.testing.assert_close(own.features["0"], conv.forward(x).detach())  # no hooks
