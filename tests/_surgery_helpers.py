"""Helpers for the surgery tests: snapshots of everything an insertion could change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnblocks import SEBlock


@dataclass
class Snapshot:
    text: str
    state: list[tuple[str, torch.Tensor]]
    training: list[tuple[str, bool]]
    hooks: list[tuple[str, list[object], list[object]]]
    attributes: list[tuple[str, list[str]]]


def snapshot(model: nn.Module) -> Snapshot:
    """Everything about ``model`` that surgery might touch."""
    return Snapshot(
        text=repr(model),
        state=[(k, v.detach().clone()) for k, v in model.state_dict().items()],
        training=[(n, m.training) for n, m in model.named_modules()],
        hooks=[
            (n, list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
            for n, m in model.named_modules()
        ],
        attributes=[(n, sorted(m.__dict__)) for n, m in model.named_modules()],
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert after.text == before.text
    assert [k for k, _ in after.state] == [k for k, _ in before.state]
    for (key, new), (_, old) in zip(after.state, before.state, strict=True):
        assert new.dtype == old.dtype and torch.equal(new, old), key
    assert after.training == before.training
    assert after.hooks == before.hooks
    assert after.attributes == before.attributes


def se_blocks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SEBlock)]
