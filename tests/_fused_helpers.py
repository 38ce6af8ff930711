"""Helpers shared by the tests of the fused nodes (test_fused_gate.py, test_fused_coord.py):
a block's plain twin, which node is in a graph, memory formats, and the tolerances."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def plain_twin(block: ModuleT) -> ModuleT:
    """A copy of ``block`` that always runs its plain modules (``fast_path = False``)."""
    twin = copy.deepcopy(block)
    twin.fast_path = False  # type: ignore[assignment]
    return twin


def has_node(out: torch.Tensor, node: str) -> bool:
    """Whether an autograd node whose type name contains ``node`` is in the graph of ``out``.

    The node may sit under other ops, so the whole graph is walked.
    """
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if node in type(fn).__name__:
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def to_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` contiguous, or channels-last of any rank (``fmt="channels_last"``)."""
    if fmt == "contiguous":
        return x.contiguous()
    perm = (0, *range(2, x.dim()), 1)
    inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.permute(perm).contiguous().permute(inverse)


def has_format(t: torch.Tensor, fmt: str) -> bool:
    if fmt == "contiguous":
        return t.is_contiguous()
    return t.permute(0, *range(2, t.dim()), 1).is_contiguous()


def gradients(
    module: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: list[torch.Tensor],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``module(x)`` and the gradients of ``x`` and of ``params`` for ``grad_out``."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
    return out, list(grads)


def assert_close_f32(actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    assert actual is not None and expected is not None
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def assert_close_bf16(actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    assert actual is not None and expected is not None
    scale = float(expected.detach().abs().max().float())
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * scale)


def module_gradients(
    module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``module(x)`` and the gradients of ``x`` and of every parameter of ``module``."""
    return gradients(module, x, list(module.parameters()), grad_out)


def compare_with_plain_twin(
    block: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    node: str,
    check: Callable[[torch.Tensor | None, torch.Tensor | None], None] = assert_close_f32,
) -> None:
    """``block`` against its plain twin: the node ``node`` ran on the fused side only, and
    the output, every gradient and every buffer (BatchNorm's statistics, bitwise) agree."""
    plain = plain_twin(block)
    out, grads = module_gradients(block, x, grad_out)
    ref, ref_grads = module_gradients(plain, x, grad_out)
    assert has_node(out, node) and not has_node(ref, node)
    check(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        check(got, expected)
    for got, expected in zip(block.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
