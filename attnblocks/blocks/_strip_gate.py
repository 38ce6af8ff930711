"""One fused autograd node for Coordinate Attention: strip pools, gates, ``x * g_h * g_w``.

Coordinate Attention (:class:`~attnblocks.CoordAttentionBlock`) pools ``x`` along each
axis (``z_h``, the mean over the width, ``(N, C, H, 1)``; ``z_w``, the mean over the
height, ``(N, C, 1, W)``), computes two gates from these strips with small layers and
returns ``x * g_h * g_w``. PyTorch's default graph for it makes about twenty passes
over the map in the backward: each broadcast multiplication saves its own product and
reduces a full-size product for the gate's gradient, and the two means and the
product each send a full-size gradient to ``x`` that is then added up.
:class:`StripGateFunction` saves only ``x`` and the two gates and computes

* ``p = grad * x``, once;
* ``dL/dg_h = sum_w p * g_w`` (on a contiguous float32 or float64 map a batched
  matrix-vector product, which reads ``p`` without writing anything full-size) and
  ``dL/dg_w = sum_h p * g_h`` (multiplying ``p`` in place);
* the gradients of the strips, by ordinary autograd on the small graph the forward
  recorded on detached copies of the strips (as :mod:`._fused_gate` does for pooled
  gates);
* ``dL/dx = grad * g_h * g_w + dL/dz_h / W + dL/dz_w / H``, written into ``p``'s
  buffer.

The rules for when a fused node may run are :func:`~._fused_gate.fused_allowed`'s, the
same as for every pooled gate; :func:`try_strip_fused` adds what is particular to this
node. When a second derivative is asked for (``create_graph=True``), the backward
recomputes the forward with differentiable ops (and without touching BatchNorm's
running statistics again) and differentiates that, so double backward matches plain
autograd, at its speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.autograd.function import FunctionCtx

from attnblocks._torch_compat import autocast_dtype, is_compiling
from attnblocks.blocks._fused_gate import (
    fused_allowed,
    grads_where,
    is_stateless,
    record_gate,
    recorded_backward,
)
from attnblocks.blocks._ops import accumulation_dtype, to_dtype

__all__ = ["HasStripGate", "StripGate", "StripGateFunction", "strip_pools", "try_strip_fused"]

#: ``(z_h, z_w) -> (g_h, g_w)``: the gates of the two strips.
StripGateFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StripGate(NamedTuple):
    """A block's two axis gates as the fused node computes them.

    Attributes:
        fn: ``(z_h, z_w) -> (g_h, g_w)`` through the block's modules, exactly as its
            plain path calls them (BatchNorm updates its running statistics here, once
            per forward).
        recompute: the same function without side effects (BatchNorm's statistics
            are not updated again), for the double-backward path.
        params: every parameter ``fn`` uses (the node's inputs after ``x``).
        modules: the parameter-free modules ``fn`` calls (activation, gate); each must
            hold no state, or the block takes its plain path.
    """

    fn: StripGateFn
    recompute: StripGateFn
    params: tuple[torch.Tensor, ...]
    modules: tuple[nn.Module, ...] = ()


def strip_pools(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over W, mean over H)`` of ``(N, C, H, W)``, keepdim, float32 for half types.

    Both paths of the block pool with this function, so they agree bitwise.
    """
    acc = accumulation_dtype(x.dtype)
    n, c, height, width = x.shape
    if _matmul_applies(x) and x.numel() > 0:
        # The rows of a contiguous map are short (W values): a matrix-vector product
        # with ones sums them about twice as fast as the reduction kernel (measured on
        # one CPU thread at (64, 256, 14, 14): 0.73 ms against 1.64 ms).
        ones = torch.ones(width, dtype=x.dtype, device=x.device)
        rows = torch.mv(x.view(-1, width), ones)
        along_h = rows.div_(width).view(n, c, height, 1)
    else:
        along_h = x.mean(dim=3, keepdim=True, dtype=acc)
    return along_h, x.mean(dim=2, keepdim=True, dtype=acc)


def _matmul_applies(t: torch.Tensor) -> bool:
    """Whether a sum over ``t``'s rows may be a matrix product: contiguous float32 or float64
    and no autocast on its device (which would run the product in a half type)."""
    return (
        t.dtype in (torch.float32, torch.float64)
        and t.is_contiguous()
        and autocast_dtype(t.device.type) is None
    )


class HasStripGate(Protocol):
    """A block with two axis gates: its ``_strip_gate()`` describes them (``None``: no node)."""

    def _strip_gate(self) -> StripGate | None: ...


def try_strip_fused(
    block: HasStripGate, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(x * g_h * g_w, g_h, g_w)`` from the fused node, or ``None``: take the plain path.

    The node runs when :func:`~._fused_gate.fused_allowed` allows it for ``block``,
    ``x`` is a non-empty 4-D map, ``block._strip_gate()`` is not ``None`` (the block
    found its layers of the types it built), the modules the gate calls are
    stateless, something needs a gradient (without a backward pass it saves
    nothing), and ``torch.compile`` is not tracing (dynamo cannot trace the autograd
    call inside the backward). The returned gates are detached (for the block's map
    hooks).
    """
    if not fused_allowed(block) or x.dim() != 4 or x.numel() == 0:  # type: ignore[arg-type]
        return None
    gate = block._strip_gate()
    if gate is None:
        return None
    if not (x.requires_grad or any(p.requires_grad for p in gate.params)):
        return None
    if is_compiling() or not all(is_stateless(m) for m in gate.modules):
        return None
    out, g_h, g_w = StripGateFunction.apply(x, gate, *gate.params)
    return out, g_h, g_w


class StripGateFunction(torch.autograd.Function):
    """``x * g_h * g_w`` with the gates computed from ``x``'s strip pools; fused backward.

    ``apply(x, gate, *gate.params)`` returns ``(out, g_h, g_w)``; the gates are not
    differentiable (they are for the block's map hooks).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: torch.Tensor, gate: StripGate, *params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_h, z_w = strip_pools(x)
        # Record the gates on detached strips: the backward differentiates this small
        # graph with torch.autograd.grad.
        inner = record_gate(gate.fn, (z_h, z_w), params)
        g_h, g_w = (g.detach() for g in inner[2])
        g_h_x, g_w_x = to_dtype(g_h, x.dtype), to_dtype(g_w, x.dtype)
        # As the plain path: (x * g_h) * g_w, the same roundings, one buffer.
        out = torch.mul(x, g_h_x).mul_(g_w_x)
        ctx.save_for_backward(x, g_h_x, g_w_x, *params)
        ctx.gate = gate  # type: ignore[attr-defined]
        ctx.inner = inner  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(g_h, g_w)
        return out, g_h, g_w

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor, *unused: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, g_h, g_w, *params = ctx.saved_tensors
        need_x, *need_params = ctx.needs_input_grad[0:1] + ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():
            # create_graph=True: the fused backward is not differentiable, so
            # differentiate a recomputed forward.
            return _backward_by_autograd(x, ctx.gate, params, (need_x, *need_params), grad_out)
        grad_out = grad_out.expand_as(x)  # a broadcast gradient (sum().backward())
        product, grad_g_h, grad_g_w = _gate_grads(grad_out, x, g_h, g_w)
        (grad_z_h, grad_z_w), grad_params = recorded_backward(
            ctx.inner, (grad_g_h, grad_g_w), (need_x, need_x, *need_params)
        )
        grad_x = None
        if need_x:
            grad_x = _grad_input(grad_out, x, g_h, g_w, grad_z_h, grad_z_w, product)
        return (grad_x, None, *grad_params)


def _backward_by_autograd(
    x: torch.Tensor,
    gate: StripGate,
    params: list[torch.Tensor],
    needs: tuple[bool, ...],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    with torch.enable_grad():
        g_h, g_w = gate.recompute(*strip_pools(x))
        out = x * to_dtype(g_h, x.dtype) * to_dtype(g_w, x.dtype)
    grad_x, *grad_params = grads_where(out, (x, *params), needs, grad_out, create_graph=True)
    return (grad_x, None, *grad_params)


def _gate_grads(
    grad_out: torch.Tensor, x: torch.Tensor, g_h: torch.Tensor, g_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad * x, sum_w grad * x * g_w, sum_h grad * x * g_h)``; sums float32 for half types.

    The product buffer is returned for the caller to reuse.
    """
    n, c, height, width = x.shape
    product = grad_out * x
    acc = accumulation_dtype(x.dtype)
    if _matmul_applies(product):
        # A batched matrix-vector product over the (H, W) planes reads the product once
        # and writes nothing full-size (measured on one CPU thread at (64, 256, 14, 14):
        # 1.6 ms against 5.4 ms for the multiply and sum). For the other sum the
        # (1, H) x (H, W) products were slower than multiplying in place and summing.
        planes = product.view(n * c, height, width)
        grad_g_h = torch.bmm(planes, g_w.reshape(n * c, width, 1)).view(n, c, height, 1)
    else:
        grad_g_h = (product * g_w).sum(dim=3, keepdim=True, dtype=acc)
    grad_g_w = product.mul_(g_h).sum(dim=2, keepdim=True, dtype=acc)  # product is spent
    return product, grad_g_h, grad_g_w


def _grad_input(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    g_h: torch.Tensor,
    g_w: torch.Tensor,
    grad_z_h: torch.Tensor | None,
    grad_z_w: torch.Tensor | None,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """``grad * g_h * g_w + dL/dz_h / W + dL/dz_w / H``, written into ``buffer``."""
    grad_x = torch.mul(grad_out, g_w, out=buffer).mul_(g_h)
    height, width = x.shape[2], x.shape[3]
    if grad_z_h is not None:
        grad_x.add_(to_dtype(grad_z_h / width, x.dtype))
    if grad_z_w is not None:
        grad_x.add_(to_dtype(grad_z_w / height, x.dtype))
    return grad_x
