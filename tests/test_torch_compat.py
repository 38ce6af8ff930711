"""attnblocks._torch_compat answers the same on every supported torch (2.2 to current)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from attnblocks._torch_compat import (
    EXPORT_DETECTABLE,
    RMS_NORMS,
    TORCH_VERSION,
    autocast_dtype,
    is_compiling,
    is_exporting,
    parse_release,
    torch_at_least,
)


@pytest.mark.parametrize(
    ("version", "release"),
    [
        ("2.2.2", (2, 2, 2)),
        ("2.2.2+cu121", (2, 2, 2)),
        ("2.15.0a0+git1234abc", (2, 15, 0)),
        ("2.4", (2, 4, 0)),
        ("10.1.3.post1", (10, 1, 3)),
    ],
)
def test_parse_release_reads_major_minor_patch(version: str, release: tuple[int, int, int]) -> None:
    assert parse_release(version) == release


def test_parse_release_refuses_what_is_not_a_version() -> None:
    with pytest.raises(ValueError, match="'nightly'"):
        parse_release("nightly")


def test_torch_at_least_compares_with_the_installed_release() -> None:
    assert parse_release(torch.__version__) == TORCH_VERSION
    assert torch_at_least(*TORCH_VERSION)
    assert torch_at_least(2, 2)  # the floor in pyproject.toml
    assert not torch_at_least(TORCH_VERSION[0], TORCH_VERSION[1] + 1)
    assert not torch_at_least(TORCH_VERSION[0] + 1, 0)


def test_rms_norm_is_listed_exactly_where_torch_has_it() -> None:
    assert ((nn.RMSNorm,) if torch_at_least(2, 4) else ()) == RMS_NORMS


def _plus_one_when(flag: Callable[[], bool]) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if flag() else x - 1

    return f


def test_is_compiling_is_false_eagerly_and_true_under_torch_compile() -> None:
    f = _plus_one_when(is_compiling)
    x = torch.zeros(2)
    assert torch.equal(f(x), x - 1)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x + 1)


def test_is_exporting_is_true_under_torch_export_only() -> None:
    class Module(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1 if is_exporting() else x - 1

    x = torch.zeros(2)
    assert torch.equal(Module()(x), x - 1)
    assert torch.equal(torch.export.export(Module(), (x,)).module()(x), x + 1)
    torch._dynamo.reset()
    compiled = torch.compile(Module(), backend="eager", fullgraph=True)
    # Before torch 2.7 an export cannot be told from a compile: every trace counts as one.
    assert torch.equal(compiled(x), x - 1 if EXPORT_DETECTABLE else x + 1)
    assert torch_at_least(2, 7) == EXPORT_DETECTABLE


def test_autocast_dtype_follows_the_autocast_context() -> None:
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
    assert autocast_dtype("cpu") is None
    assert autocast_dtype("meta") is None
