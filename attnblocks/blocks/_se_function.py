"""The fused Squeeze-and-Excitation function: fewer passes over the feature map.

An SE block is a few thousand FLOPs of MLP wrapped around three memory-bound
passes over the feature map :math:`x`. Its cost is memory traffic and per-op
overhead, and PyTorch's default autograd graph spends most of it in the backward
pass: it materialises ``grad * x`` before summing it, builds the pooling's
gradient as a separate full-size tensor (``expand(ds) / HW``, a slow broadcast
division) and then adds the two gradients of :math:`x` in one more pass.

:class:`SEFunction` computes the same thing with one
:class:`torch.autograd.Function` and a hand-written backward through the small
``(N, C)`` MLP:

* forward: read :math:`x` once for the mean, read it and write the output once
  for :math:`x \\cdot s` (the minimum, 3 passes);
* backward: :math:`\\partial L / \\partial s = \\sum_{\\text{spatial}} g \\cdot x`
  accumulated in float32 for half types (a float16 sum of 4096 values of 3000
  would overflow; for bfloat16 on CPU, PyTorch's sum accumulates in float32 and rounds
  the result to bfloat16 once, which its range allows), and the MLP's backward in
  float32 too when it ran in a half type;
  without materialising the product on CPU in contiguous layout
  (a batch-norm backward kernel computes exactly these per-row dot products); back
  through the MLP on ``(N, C)`` tensors; then
  :math:`\\partial L / \\partial x = g \\cdot s + \\text{broadcast}(\\partial L /
  \\partial z) / HW`, in one fused pass when the channels are the innermost
  dimension (channels_last) and as a multiply plus an in-place add otherwise,
  written into the product's buffer when there is one. Two full-size tensors are
  allocated per step (the output and the gradient of :math:`x`), against five for
  the default graph; on CPU each fresh allocation also costs page faults.

Only activations and gates whose derivatives are written here take this path
(:func:`fused_spec` returns ``None`` for anything else, and the block falls back
to plain autograd). The derivatives are PyTorch's own backward kernels
(``aten::threshold_backward``, ``aten::sigmoid_backward``, ...), the ones
autograd itself calls, so both paths agree to floating-point rounding.

The fused backward is not itself differentiable; when a second derivative is
asked for (``create_graph=True``, e.g. a gradient penalty), the backward instead
recomputes the forward with differentiable ops and differentiates that, so double
backward gives the same result as plain autograd, at plain autograd's speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

from attnblocks._torch_compat import autocast_dtype
from attnblocks.blocks._layers import LambdaLayer
from attnblocks.blocks._ops import global_avg_pool_for, spatial_dot

__all__ = ["FusedSpec", "SEFunction", "fused_spec", "mlp_dtype", "se_forward"]

_aten = torch.ops.aten

# Activation forward and backward, by kind. ``arg`` carries the one option some
# activations have (GELU's ``approximate``, LeakyReLU's slope); backward gets the
# pre-activation ``h`` and the activation ``a`` and uses whichever autograd uses.
_ActForward = Callable[[torch.Tensor, Any], torch.Tensor]
_ActBackward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]

_ACT_FORWARD: dict[str, _ActForward] = {
    "relu": lambda h, arg: torch.relu(h),
    "relu6": lambda h, arg: F.hardtanh(h, 0.0, 6.0),
    "silu": lambda h, arg: F.silu(h),
    "gelu": lambda h, arg: F.gelu(h, approximate=arg),
    "leaky_relu": lambda h, arg: F.leaky_relu(h, arg),
    "hardswish": lambda h, arg: F.hardswish(h),
    "mish": lambda h, arg: F.mish(h),
    "tanh": lambda h, arg: torch.tanh(h),
    "identity": lambda h, arg: h,
}

_ACT_BACKWARD: dict[str, _ActBackward] = {
    "relu": lambda g, h, a, arg: _aten.threshold_backward.default(g, a, 0),
    "relu6": lambda g, h, a, arg: _aten.hardtanh_backward.default(g, h, 0.0, 6.0),
    "silu": lambda g, h, a, arg: _aten.silu_backward.default(g, h),
    "gelu": lambda g, h, a, arg: _aten.gelu_backward.default(g, h, approximate=arg),
    "leaky_relu": lambda g, h, a, arg: _aten.leaky_relu_backward.default(g, h, arg, False),
    "hardswish": lambda g, h, a, arg: _aten.hardswish_backward.default(g, h),
    "mish": lambda g, h, a, arg: _aten.mish_backward.default(g, h),
    "tanh": lambda g, h, a, arg: _aten.tanh_backward.default(g, a),
    "identity": lambda g, h, a, arg: g,
}

# Gate forward (pre-gate p -> gate) and backward (grad, p, gate -> grad of p).
_GATE_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}

_GATE_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sigmoid": lambda g, p, s: _aten.sigmoid_backward.default(g, s),
    "hardsigmoid": lambda g, p, s: _aten.hardsigmoid_backward.default(g, p),
}


class FusedSpec(NamedTuple):
    """Which activation and gate the fused path computes, with the activation's option."""

    act: str
    act_arg: Any
    gate: str


# Exact types only (a subclass may override forward).
_ACT_KINDS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardswish: "hardswish",
    nn.Mish: "mish",
    nn.Tanh: "tanh",
    nn.Identity: "identity",
}

_GATE_KINDS: dict[type[nn.Module], str] = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


def _act_arg(act: nn.Module) -> Any:
    if isinstance(act, nn.GELU):
        return act.approximate
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    return None


def _gate_kind(gate: nn.Module) -> str | None:
    if type(gate) is LambdaLayer and gate.fn is torch.sigmoid:
        return "sigmoid"
    return _GATE_KINDS.get(type(gate))


def fused_spec(act: nn.Module, gate: nn.Module) -> FusedSpec | None:
    """Return what the fused path needs to compute ``gate(fc2(act(fc1(z))))``, or ``None``.

    ``None`` means the activation or the gate is not one whose derivative
    :class:`SEFunction` knows, so the caller must use plain autograd.

    >>> fused_spec(nn.ReLU(inplace=True), nn.Sigmoid())
    FusedSpec(act='relu', act_arg=None, gate='sigmoid')
    >>> fused_spec(nn.ELU(), nn.Sigmoid()) is None
    True
    """
    act_kind = _ACT_KINDS.get(type(act))
    gate_kind = _gate_kind(gate)
    if act_kind is None or gate_kind is None:
        return None
    return FusedSpec(act_kind, _act_arg(act), gate_kind)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or ``None`` when autocast is off."""
    return autocast_dtype(device_type)  # the torch-version-dependent part: _torch_compat


def mlp_dtype(weight_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in for weights of ``weight_dtype``.

    That is the weight dtype, or the autocast dtype when autocast is enabled for
    ``device_type`` (autocast leaves float64 alone), so the fused path computes
    the MLP exactly as the plain modules would.

    >>> mlp_dtype(torch.float32, "cpu")
    torch.float32
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     mlp_dtype(torch.float32, "cpu")
    torch.bfloat16
    """
    autocast = _autocast_dtype(device_type)
    if autocast is None or weight_dtype == torch.float64:
        return weight_dtype
    return autocast


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to is a no-op for the same dtype, but the call alone costs a microsecond.
    return t if t.dtype == dtype else t.to(dtype)


def _cast_optional(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else _cast(t, dtype)


def se_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    spec: FusedSpec,
    gate_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The SE forward pass with plain tensor functions (no module calls, no autograd node).

    Computes exactly what ``SEBlock``'s modules compute, autocast included.

    Returns:
        ``(out, gate, intermediates)``: the output ``x * gate``, the ``(N, C)`` gate
        (times ``gate_scale``) and what :class:`SEFunction` saves for backward.
    """
    spatial = tuple(range(2, x.dim()))
    compute = mlp_dtype(w1.dtype, x.device.type)
    # Squeeze, accumulated in float32 for half types, then cast as on the plain path:
    # to the weights' dtype, and by autocast (if on) to its dtype.
    z = global_avg_pool_for(x, compute)
    z = _cast(_cast(z, w1.dtype), compute)
    w1c, w2c = _cast(w1, compute), _cast(w2, compute)
    h = F.linear(z, w1c, _cast_optional(b1, compute))
    a = _ACT_FORWARD[spec.act](h, spec.act_arg)
    p = F.linear(a, w2c, _cast_optional(b2, compute))
    s = _GATE_FORWARD[spec.gate](p)
    gate = s * gate_scale if gate_scale != 1.0 else s
    gate_x = _cast(gate, x.dtype).view(gate.shape + (1,) * len(spatial))
    return x * gate_x, gate, (z, h, a, p, s, gate_x, w1c, w2c)


class SEFunction(torch.autograd.Function):
    """``x * gate(fc2(act(fc1(mean(x))))) * scale`` with a hand-written, fused backward.

    ``apply(x, w1, b1, w2, b2, spec, gate_scale)`` returns ``(out, gate)``: the
    re-weighted feature map and the ``(N, C)`` gate (not differentiable; the block
    passes it to its gate hooks). ``b1``/``b2`` may be ``None``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor,
        b2: torch.Tensor | None,
        spec: FusedSpec,
        gate_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, gate, saved = se_forward(x, w1, b1, w2, b2, spec, gate_scale)
        ctx.save_for_backward(x, w1, b1, w2, b2, *saved)  # type: ignore[arg-type]  # None is fine
        ctx.spec = spec  # type: ignore[attr-defined]
        ctx.gate_scale = gate_scale  # type: ignore[attr-defined]
        ctx.param_dtypes = (  # type: ignore[attr-defined]
            w1.dtype,
            None if b1 is None else b1.dtype,
            w2.dtype,
            None if b2 is None else b2.dtype,
        )
        ctx.mark_non_differentiable(gate)
        return out, gate

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor, grad_gate: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, w1_in, b1_in, w2_in, b2_in, z, h, a, p, s, gate_x, w1, w2 = ctx.saved_tensors
        spec: FusedSpec = ctx.spec
        if torch.is_grad_enabled():
            # create_graph=True (double backward, e.g. a gradient penalty): the fused
            # backward is not differentiable, so differentiate a recomputed forward.
            inputs = (x, w1_in, b1_in, w2_in, b2_in)
            return _backward_by_autograd(inputs, ctx.needs_input_grad[:5], spec, ctx, grad_out)
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.param_dtypes
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]

        # The MLP backward runs on (N, C)-sized tensors, in float32 when the MLP itself
        # ran in a half type: dL/ds of a large feature map overflows float16 otherwise.
        acc = _accumulate_dtype(z.dtype)
        if acc != z.dtype:
            z, h, a, p, s, w1, w2 = (t.to(acc) for t in (z, h, a, p, s, w1, w2))
        dot, buffer = _spatial_dot(grad_out, x)
        grad_s = _cast(dot, acc)  # dL/d(gate), (N, C)
        if ctx.gate_scale != 1.0:
            grad_s = grad_s * ctx.gate_scale
        grad_p = _GATE_BACKWARD[spec.gate](grad_s, p, s)

        grad_w2 = _cast(grad_p.t().mm(a), w2_dtype) if need_w2 else None
        grad_b2 = _cast(grad_p.sum(0), b2_dtype) if need_b2 else None
        grad_w1 = grad_b1 = grad_x = None
        if need_x or need_w1 or need_b1:
            grad_h = _ACT_BACKWARD[spec.act](grad_p.mm(w2), h, a, spec.act_arg)
            if need_w1:
                grad_w1 = _cast(grad_h.t().mm(z), w1_dtype)
            if need_b1:
                grad_b1 = _cast(grad_h.sum(0), b1_dtype)
            if need_x:
                grad_x = _grad_input(grad_out, x, gate_x, grad_h.mm(w1), buffer)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def _backward_by_autograd(
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    spec: FusedSpec,
    ctx: Any,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    x, w1, b1, w2, b2 = inputs
    with torch.enable_grad():
        out, _, _ = se_forward(x, w1, b1, w2, b2, spec, ctx.gate_scale)  # type: ignore[arg-type]
    wanted = [need and t is not None for t, need in zip(inputs, needs, strict=True)]
    targets = [t for t, want in zip(inputs, wanted, strict=True) if want and t is not None]
    grads = iter(torch.autograd.grad(out, targets, grad_out, create_graph=True))
    return (*(next(grads) if want else None for want in wanted), None, None)


# Below this many spatial positions, the batch-norm kernel's per-channel overhead
# outweighs the saved pass (measured on CPU, float32: slower at 4x4, faster at 8x8).
_MIN_DOT_SPATIAL = 64


def _spatial_dot(
    grad_out: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum over spatial dims of grad_out * x``, shape ``(N, C)``, float32 for half types.

    Also returns the full-size buffer it used, if any, for the caller to reuse.
    """
    n, c = x.shape[:2]
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.numel() >= _MIN_DOT_SPATIAL * n * c > 0
        and x.is_contiguous()
        and grad_out.is_contiguous()
    ):
        # One read of each operand, no (N, C, *spatial) product: viewed as (1, N*C, HW),
        # the batch-norm backward's per-channel sum(grad * (input - mean) * invstd) with
        # mean 0 and invstd 1 is exactly the per-(sample, channel) dot product we need.
        rows = n * c
        zeros, ones = x.new_zeros(rows), x.new_ones(rows)
        dot = _aten.native_batch_norm_backward.default(
            grad_out.view(1, rows, -1),
            x.view(1, rows, -1),
            None,
            None,
            None,
            zeros,
            ones,
            True,
            0.0,
            [False, True, False],
        )[1]
        return dot.view(n, c), None
    cpu = x.device.type == "cpu"
    if x.dtype == torch.float16 and cpu:
        # float16 sums can overflow, so float32 sums, chunked: a full-size float32
        # temporary costs more than the saved buffer.
        return spatial_dot(grad_out, x), None
    product = grad_out * x
    spatial = tuple(range(2, x.dim()))
    if x.dtype == torch.bfloat16 and cpu:
        # PyTorch's CPU sum of bfloat16 accumulates in float32 and rounds once at the end,
        # and bfloat16 has float32's range, so the sum can stay in bfloat16: asking for a
        # float32 result instead makes a float32 copy of the whole product first (measured
        # at (256, 32, 32, 32), channels_last: 1.05 ms against 2.7 ms chunked).
        return product.sum(dim=spatial).float(), product
    return product.sum(dim=spatial, dtype=_accumulate_dtype(x.dtype)), product


def _grad_input(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_x: torch.Tensor,
    grad_z: torch.Tensor,
    buffer: torch.Tensor | None,
) -> torch.Tensor:
    """``grad_out * gate + broadcast(grad_z) / HW``: both gradients of ``x`` at once.

    Written into ``buffer`` (a free tensor shaped like ``grad_out``) when one is given,
    which saves an allocation: on CPU a fresh large tensor costs a page fault per page.
    """
    shift = _cast(_cast(grad_z, _accumulate_dtype(x.dtype)) / math.prod(x.shape[2:]), x.dtype)
    shift = shift.view(gate_x.shape)
    if grad_out.dim() > 2 and grad_out.stride(1) == 1 and grad_out.shape[1] > 1:
        # Channels are innermost: every operand is contiguous along the inner loop,
        # and addcmul does it all in one vectorised pass.
        return torch.addcmul(shift.expand_as(grad_out), grad_out, gate_x, out=buffer)
    # Spatial dims are innermost: with two broadcast operands addcmul would fall back to
    # a scalar loop, so multiply (one broadcast operand, vectorised) and add in place.
    return torch.mul(grad_out, gate_x, out=buffer).add_(shift)
