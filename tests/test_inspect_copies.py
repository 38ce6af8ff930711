"""Copies and checkpoints made inside the temporary contexts of attnblocks.inspect.

A deepcopy, pickle or ``torch.save`` of the model taken inside ``knockout``,
``record_gates``, ``record_maps`` or ``record_features`` is the plain model: it is not
knocked out, feeds no recorder, and pickles; the original keeps recording (or stays
knocked out) until the context ends and is restored after.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from _inspect_toys import hook_counts, toy_se_net
from torch import nn

from attnblocks import CBAMBlock
from attnblocks.inspect import knockout, record_features, record_gates, record_maps

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save,
}


def _map_net() -> nn.Sequential:
    net = toy_se_net()
    net.stage.add_module("cbam", CBAMBlock(16, reduction=4))
    return net.eval()


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_made_under_knockout_is_the_normal_model(how: str) -> None:
    net = toy_se_net().eval()
    with torch.no_grad():
        normal = net(X)
        with knockout(net):
            knocked = net(X)
            clone = COPIES[how](net)
            torch.testing.assert_close(clone(X), normal, rtol=0, atol=0)
            torch.testing.assert_close(net(X), knocked, rtol=0, atol=0)  # still knocked out
        torch.testing.assert_close(net(X), normal, rtol=0, atol=0)
        torch.testing.assert_close(clone(X), normal, rtol=0, atol=0)
    assert not torch.equal(knocked, normal)
    assert all("forward" not in m.__dict__ for m in clone.modules())
    # the copy can itself be knocked out, independently of the original
    with torch.no_grad(), knockout(clone):
        torch.testing.assert_close(clone(X), knocked, rtol=0, atol=0)
        torch.testing.assert_close(net(X), normal, rtol=0, atol=0)


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_made_while_recording_feeds_no_recorder(how: str) -> None:
    net = _map_net()
    with torch.no_grad():
        with (
            record_gates(net) as gates,
            record_maps(net) as maps,
            record_features(net, ["stem.conv"]) as feats,
        ):
            net(X)
            clone = COPIES[how](net)
            clone(X)
            clone(X)
            net(X)
            rows = (gates.gates["stem.se"].shape[0], maps.maps["stage.cbam"].shape[0])
            assert rows == (4, 4), "only the original's two calls are recorded"
            assert feats.features["stem.conv"].shape[0] == 4
        clone(X)
        net(X)
    assert gates.gates["stem.se"].shape[0] == 4 and maps.maps["stage.cbam"].shape[0] == 4
    assert feats.features["stem.conv"].shape[0] == 4
    # the original is left exactly as before; the copy carries no recorder hook
    assert hook_counts(net) == hook_counts(_map_net())
    assert all(len(getattr(m, "_gate_hooks", ())) == 0 for m in clone.modules())
    assert all(len(getattr(m, "_map_hooks", ())) == 0 for m in clone.modules())
    with torch.no_grad():
        torch.testing.assert_close(clone(X), net(X), rtol=0, atol=0)
    # and the copy records normally in a context of its own
    with torch.no_grad(), record_gates(clone) as own:
        clone(X)
    assert own.gates["stem.se"].shape == (2, 8)


def test_a_checkpoint_inside_a_gate_recording_loop() -> None:
    net = toy_se_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    saved = []
    with record_gates(net) as rec:
        for _ in range(2):
            loss = net(X).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            buffer = io.BytesIO()
            torch.save({"model": net, "optimizer": optimizer.state_dict()}, buffer)
            saved.append(buffer.getvalue())
    assert rec.gates["stem.se"].shape == (4, 8)
    restored = torch.load(io.BytesIO(saved[-1]), weights_only=False)["model"]
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(X), net.eval()(X), rtol=0, atol=0)


def test_user_hooks_are_still_copied() -> None:
    """Only the contexts' own hooks are left out: a hook the user registered is kept."""
    net = toy_se_net().eval()
    calls: list[int] = []
    net.stem.se.register_gate_hook(lambda block, gate: calls.append(gate.shape[0]))
    clone = copy.deepcopy(net)
    with torch.no_grad():
        clone(X)
    assert calls == [2]
