"""The one train/eval save-and-restore helper, and its two users: run_probe and eval_mode.

Every module's ``training`` flag must come back exactly, mixed states included, whether
the body returns, the body raises, or ``model.eval()`` itself raises half-way.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnblocks import InvalidArgumentError
from attnblocks._modes import evaluating
from attnblocks.inspect import eval_mode
from attnblocks.surgery._probe import run_probe


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.Sequential(nn.BatchNorm2d(4), nn.Dropout()),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
    )


def _flags(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


def _set_flags(model: nn.Module, flags: list[bool]) -> None:
    for module, flag in zip(model.modules(), flags, strict=True):
        module.training = flag


class _Boom(RuntimeError):
    pass


class _RefusesEval(nn.Module):
    """A module whose ``train(False)`` fails after its children were switched."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2), nn.Dropout())

    def train(self, mode: bool = True) -> _RefusesEval:
        self.inner.train(mode)
        if not mode:
            raise _Boom("train(False) failed half-way")
        return self


class _FailsInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise _Boom("forward failed")


FLAGS = st.lists(st.booleans(), min_size=9, max_size=9)  # _net() has 9 modules


@given(FLAGS)
def test_evaluating_restores_every_flag_after_a_normal_exit(flags: list[bool]) -> None:
    net = _net()
    _set_flags(net, flags)
    with evaluating(net):
        assert not any(_flags(net))
    assert _flags(net) == flags


@given(FLAGS)
def test_evaluating_restores_every_flag_when_the_body_raises(flags: list[bool]) -> None:
    net = _net()
    _set_flags(net, flags)
    with pytest.raises(_Boom), evaluating(net):
        raise _Boom
    assert _flags(net) == flags


def test_evaluating_restores_every_flag_when_eval_itself_raises_half_way() -> None:
    net = nn.Sequential(nn.Linear(2, 2), _RefusesEval())
    net[1].inner[1].eval()  # a mixed state
    before = _flags(net)
    with pytest.raises(_Boom, match="half-way"), evaluating(net):
        pytest.fail("the body must not run when eval() raises")
    assert _flags(net) == before


@given(FLAGS)
def test_eval_mode_restores_exactly_also_on_error_and_is_a_no_op_when_disabled(
    flags: list[bool],
) -> None:
    net = _net()
    _set_flags(net, flags)
    with pytest.raises(_Boom), eval_mode(net) as same:
        assert same is net and not any(_flags(net))
        raise _Boom
    assert _flags(net) == flags
    with eval_mode(net, enabled=False):
        assert _flags(net) == flags
    assert _flags(net) == flags


def test_run_probe_restores_every_flag_when_the_forward_pass_fails_mid_way() -> None:
    net = _net()
    net.append(_FailsInForward())
    net[1][0].eval()
    net[3].eval()
    before = _flags(net)
    seen: list[list[bool]] = []
    net[2].register_forward_hook(lambda *_: seen.append(_flags(net)))
    with pytest.raises(InvalidArgumentError, match="failed with _Boom") as caught:
        run_probe(net, torch.zeros(1, 3, 2, 2), [net[2]], owner="demo")
    assert isinstance(caught.value.__cause__, _Boom)
    assert seen == [[False] * len(before)], "the probe ran in eval mode"
    assert _flags(net) == before


def test_run_probe_restores_every_flag_after_a_normal_probe() -> None:
    net = _net()
    net[1][1].eval()
    before = _flags(net)
    record = run_probe(net, torch.zeros(1, 3, 2, 2), [net[2]], owner="demo").records[0]
    assert record.calls == 1
    assert _flags(net) == before
