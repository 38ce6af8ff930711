"""knockout: blocks become identities while active, the model is bit-identical after."""

from __future__ import annotations

import io

import pytest
import torch
from _inspect_toys import hook_counts, toy_se_net
from torch import nn

from attnblocks import InvalidArgumentError, SelectorError
from attnblocks.inspect import eval_mode, knockout, knockout_scan, record_gates


def _snapshot(net: nn.Module) -> tuple[bytes, str, dict, list]:
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    dicts = [sorted(m.__dict__) for m in net.modules()]
    return buffer.getvalue(), repr(net), hook_counts(net), dicts


def _without_se(net: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(net.stem[:3], net.stage[:3], net.head)


def test_knockout_is_identity_while_active_and_restores_exactly() -> None:
    net = toy_se_net().eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        base = net(x)
        plain = _without_se(net)(x)
    before = _snapshot(net)
    with torch.no_grad(), knockout(net) as names:
        knocked = net(x)
    assert names == ["stem.se", "stage.se"]
    torch.testing.assert_close(knocked, plain, rtol=0, atol=0)
    assert not torch.allclose(knocked, base)
    assert _snapshot(net) == before
    with torch.no_grad():
        torch.testing.assert_close(net(x), base, rtol=0, atol=0)


def test_knockout_one_site_and_restores_after_exception() -> None:
    net = toy_se_net().eval()
    x = torch.randn(2, 3, 8, 8)
    before = _snapshot(net)
    with torch.no_grad(), knockout(net, ["stage.se"]):
        out = net(x)
        ref = net.head(net.stage[:3](net.stem(x)))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), knockout(net):
        raise RuntimeError("boom")
    assert _snapshot(net) == before
    assert "forward" not in net.stem.se.__dict__
    with pytest.raises(SelectorError), knockout(net, ["head"]):
        pass
    assert _snapshot(net) == before


def test_recorded_gates_are_ones_under_knockout_and_grads_flow() -> None:
    net = toy_se_net().eval()
    with record_gates(net) as rec, knockout(net, ["stem.se"]):
        net(torch.randn(3, 3, 8, 8)).sum().backward()
    torch.testing.assert_close(rec.gates["stem.se"], torch.ones(3, 8))
    assert not torch.equal(rec.gates["stage.se"], torch.ones(3, 16))
    assert net.stem.se.fc1.weight.grad is None  # a knocked-out block is not used
    assert net.stage.se.fc1.weight.grad is not None


def test_knockout_scan() -> None:
    net = toy_se_net().eval()
    x = torch.randn(4, 3, 8, 8)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> torch.Tensor:
        return model(x)

    baseline, scores = knockout_scan(net, evaluate)
    assert list(scores) == ["stem.se", "stage.se"]
    torch.testing.assert_close(baseline, evaluate(net))
    with knockout(net, ["stem.se"]):
        torch.testing.assert_close(scores["stem.se"], evaluate(net))
    assert not torch.equal(scores["stem.se"], baseline)


def test_knockout_errors_leave_the_model_alone() -> None:
    net = toy_se_net()
    before = _snapshot(net)
    with pytest.raises(InvalidArgumentError, match="evaluate must be a function"):
        knockout_scan(net, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"torch\.nn\.Module, got int"):
        knockout_scan(42, lambda m: 0.0)  # type: ignore[arg-type]
    with pytest.raises(SelectorError, match="knockout: sites is empty"), knockout(net, []):
        pass
    with pytest.raises(RuntimeError, match="mid-scan"):
        knockout_scan(net, lambda m: (_ for _ in ()).throw(RuntimeError("mid-scan")))
    assert _snapshot(net) == before
    with pytest.raises(InvalidArgumentError, match=r"eval_mode: model must be a torch\.nn"):
        eval_mode(42).__enter__()  # type: ignore[arg-type]
