"""attnblocks._torch_compat answers the same on every supported torch (2.2 to current)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from attnblocks._torch_compat import (
    ATEN_KERNELS,
    EXPORT_DETECTABLE,
    PRIVATE_NAMES,
    RMS_NORMS,
    TORCH_VERSION,
    autocast_dtype,
    forward_hooks,
    function_transform_active,
    has_global_module_hooks,
    has_own_hooks,
    is_compiling,
    is_exporting,
    missing_internals,
    parse_release,
    remove_forward_hook,
    rowwise_dot,
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


def test_every_private_torch_name_attnblocks_reads_exists() -> None:
    # A torch release that drops one of these fails here (and only here): the code
    # that reads it has a fallback or must be adapted in attnblocks/_torch_compat.py.
    assert missing_internals() == []
    assert len(PRIVATE_NAMES) >= 12 and "native_batch_norm_backward" in ATEN_KERNELS


def test_function_transform_active_sees_vmap_and_forward_ad() -> None:
    seen: list[bool] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(function_transform_active())
        return x * 2

    assert not function_transform_active()
    torch.func.vmap(f)(torch.ones(3, 2))
    with fwAD.dual_level():
        seen.append(function_transform_active())
    assert seen == [True, True]
    assert not function_transform_active()


def test_global_and_own_module_hooks_are_seen_and_forgotten() -> None:
    module = nn.Linear(2, 2)
    assert not has_global_module_hooks() and not has_own_hooks(module)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert has_global_module_hooks()
    finally:
        handle.remove()
    assert not has_global_module_hooks()
    for register in (
        module.register_forward_hook,
        module.register_forward_pre_hook,
        module.register_full_backward_hook,
        module.register_full_backward_pre_hook,
    ):
        handle = register(lambda *args: None)
        assert has_own_hooks(module)
        handle.remove()
        assert not has_own_hooks(module)


def test_remove_forward_hook_clears_every_table_as_the_handle_would() -> None:
    module = nn.Linear(2, 2)

    def hook(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        return None

    handle = module.register_forward_hook(hook, with_kwargs=True, always_call=True)
    seen = forward_hooks(module)
    assert seen == {handle.id: hook}
    seen.clear()  # a copy: the module keeps its hook
    assert forward_hooks(module) == {handle.id: hook}
    remove_forward_hook(module, handle.id)
    assert not module._forward_hooks
    assert not module._forward_hooks_with_kwargs
    assert not module._forward_hooks_always_called


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rowwise_dot_is_the_per_row_dot_product(dtype: torch.dtype) -> None:
    a = torch.randn(6, 37, dtype=dtype, generator=torch.Generator().manual_seed(0))
    b = torch.randn(6, 37, dtype=dtype, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rowwise_dot(a, b, 6), (a * b).sum(dim=1))
