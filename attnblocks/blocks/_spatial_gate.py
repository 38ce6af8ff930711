"""One fused autograd node for a spatial gate of channel pools: CBAM's spatial step.

CBAM's spatial attention (:class:`~attnblocks.CBAMBlock`, eq. 3) pools the map ``x``
over its channels (the mean and the maximum, ``(N, 1, H, W)`` each), computes a
``(N, 1, H, W)`` gate ``s`` from the two maps with a small convolution and returns
``x * s``. PyTorch's default graph for it sends three full-size gradients to ``x``
(from the product, the mean and the maximum) and adds them up, and the maximum's
backward divides and multiplies full-size tensors of its own. With channels
innermost (channels_last, the usual layout for speed) every one of these broadcasts
runs along a short inner dimension, where the elementwise kernels are slow.
:class:`SpatialGateFunction` saves ``x``, the gate and the maximum and computes

* ``dL/ds = sum_c grad * x`` (one product, one reduction);
* the gradients of the two pools, by ordinary autograd on the small graph the
  forward recorded on detached copies of the pools (as :mod:`._fused_gate` does for
  pooled gates);
* ``dL/dx = grad * s + dL/davg / C`` plus the maximum's gradient, split evenly between
  tied channels as autograd's ``amax`` does (ReLU maps often tie at 0), in two passes
  written into the product's buffer.

The rules for when a fused node may run are :func:`~._fused_gate.fused_allowed`'s, the
same as for every pooled gate; :func:`try_spatial_fused` adds what is particular to this
node. When a second derivative is asked for (``create_graph=True``), the backward
recomputes the forward with differentiable ops and differentiates that, so double
backward matches plain autograd, at its speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.autograd.function import FunctionCtx

from attnblocks._torch_compat import is_compiling
from attnblocks.blocks._fused_gate import (
    fused_allowed,
    grads_where,
    is_stateless,
    record_gate,
    recorded_backward,
)
from attnblocks.blocks._ops import accumulation_dtype, count_true, to_dtype

__all__ = [
    "HasSpatialGate",
    "SpatialGate",
    "SpatialGateFunction",
    "channel_pools",
    "try_spatial_fused",
]


class SpatialGate(NamedTuple):
    """A block's spatial gate as the fused node computes it: ``s = fn(avg, maximum)``.

    Attributes:
        fn: ``(avg, maximum) -> s``, the ``(N, 1, H, W)`` gate from the two channel pools
            of :func:`channel_pools`, through the block's modules exactly as its plain
            path calls them. It must depend on nothing but its arguments, ``params`` and
            the stateless ``modules``: the double-backward path calls it again.
        params: every parameter ``fn`` uses (the node's inputs after ``x``).
        modules: the parameter-free modules ``fn`` calls (the gate); each must hold no
            state, or the block takes its plain path.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: tuple[torch.Tensor, ...]
    modules: tuple[nn.Module, ...] = ()


def channel_pools(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, max)`` of ``(N, C, *spatial)`` over the channels, keepdim.

    The mean accumulates in float32 for half types (and is returned in it); the maximum
    keeps ``x``'s dtype (it is exact). Both paths of the block pool with this function,
    so they agree bitwise.
    """
    avg = x.mean(dim=1, keepdim=True, dtype=accumulation_dtype(x.dtype))
    return avg, x.amax(dim=1, keepdim=True)


class HasSpatialGate(Protocol):
    """A block with a spatial gate of channel pools (``None``: no node)."""

    def _spatial_gate_spec(self) -> SpatialGate | None: ...


def try_spatial_fused(
    block: HasSpatialGate, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x * s, s)`` from the fused node, or ``None``: take the plain path.

    The node runs when :func:`~._fused_gate.fused_allowed` allows it for ``block``,
    ``x`` is not empty, ``block._spatial_gate_spec()`` is not ``None`` (the block found
    its layers of the types it built), the modules the gate calls are stateless,
    something needs a gradient (without a backward pass it saves nothing), and
    ``torch.compile`` is not tracing (dynamo cannot trace the autograd call inside the
    backward). The returned gate ``s`` is detached (for the block's map hooks).
    """
    if not fused_allowed(block) or x.dim() < 3 or x.numel() == 0:  # type: ignore[arg-type]
        return None
    gate = block._spatial_gate_spec()
    if gate is None:
        return None
    if not (x.requires_grad or any(p.requires_grad for p in gate.params)):
        return None
    if is_compiling() or not all(is_stateless(m) for m in gate.modules):
        return None
    out, s = SpatialGateFunction.apply(x, gate, *gate.params)
    return out, s


class SpatialGateFunction(torch.autograd.Function):
    """``x * s`` with ``s`` computed from ``x``'s channel pools; fused backward.

    ``apply(x, gate, *gate.params)`` returns ``(out, s)``; ``s`` is not differentiable
    (it is for the block's map hooks).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: torch.Tensor, gate: SpatialGate, *params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        avg, maximum = channel_pools(x)
        # Record the gate on detached pools: the backward differentiates this small
        # graph with torch.autograd.grad. The maximum's leaf is in the mean's dtype
        # (exact), so that its gradient, a sum over the kernel's taps, is float32 for
        # half types and does not overflow float16.
        inner = record_gate(gate.fn, (avg, to_dtype(maximum, avg.dtype)), params)
        s = inner[2].detach()  # type: ignore[union-attr]
        s_x = to_dtype(s, x.dtype)
        out = x * s_x  # as the plain path: the same rounding
        ctx.save_for_backward(x, s_x, maximum, *params)
        ctx.gate = gate  # type: ignore[attr-defined]
        ctx.inner = inner  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(s)
        return out, s

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor, *unused: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, s_x, maximum, *params = ctx.saved_tensors
        need_x, *need_params = ctx.needs_input_grad[0:1] + ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():
            # create_graph=True: the fused backward is not differentiable, so
            # differentiate a recomputed forward.
            return _backward_by_autograd(x, ctx.gate, params, (need_x, *need_params), grad_out)
        grad_out = grad_out.expand_as(x)  # a broadcast gradient (sum().backward())
        product = grad_out * x
        grad_s = _channel_sum(product)
        (grad_avg, grad_max), grad_params = recorded_backward(
            ctx.inner, grad_s, (need_x, need_x, *need_params)
        )
        grad_x = None
        if need_x:
            grad_x = _grad_input(grad_out, x, s_x, maximum, grad_avg, grad_max, product)
        return (grad_x, None, *grad_params)


def _backward_by_autograd(
    x: torch.Tensor,
    gate: SpatialGate,
    params: list[torch.Tensor],
    needs: tuple[bool, ...],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    with torch.enable_grad():
        out = x * to_dtype(gate.fn(*channel_pools(x)), x.dtype)
    grad_x, *grad_params = grads_where(out, (x, *params), needs, grad_out, create_graph=True)
    return (grad_x, None, *grad_params)


def _channel_sum(product: torch.Tensor) -> torch.Tensor:
    """``product.sum(dim=1, keepdim=True)``, float32 for half types."""
    if product.dtype == torch.bfloat16 and product.device.type == "cpu":
        # PyTorch's CPU sum of bfloat16 accumulates in float32 and rounds once; asking
        # for a float32 result would make a float32 copy of the product first.
        return product.sum(dim=1, keepdim=True).float()
    return product.sum(dim=1, keepdim=True, dtype=accumulation_dtype(product.dtype))


def _grad_input(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    s_x: torch.Tensor,
    maximum: torch.Tensor,
    grad_avg: torch.Tensor | None,
    grad_max: torch.Tensor | None,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """``grad * s + dL/davg / C + dL/dmax / ties`` (the last at the maxima), into ``buffer``.

    As autograd's ``amax`` backward, the maximum's gradient is split evenly between the
    channels that hold the maximum. Two passes over the map after the comparison: the
    pools' gradients (a ``where``), then ``grad * s`` added in place; with channels
    innermost every broadcast operand makes a pass as slow as a whole ``addcmul``.
    """
    acc = accumulation_dtype(x.dtype)
    shift = None if grad_avg is None else to_dtype(grad_avg, acc) / x.shape[1]
    if grad_max is None:
        base = torch.mul(grad_out, s_x, out=buffer)
        return base if shift is None else base.add_(to_dtype(shift, x.dtype))
    hits = x == maximum
    share = to_dtype(grad_max, acc) / count_true(hits, (1,))
    at_max = share if shift is None else shift + share
    at_max = to_dtype(at_max, x.dtype)
    elsewhere = at_max.new_zeros(()) if shift is None else to_dtype(shift, x.dtype)
    base = torch.where(hits, at_max, elsewhere, out=buffer)
    return base.addcmul_(grad_out, s_x)
