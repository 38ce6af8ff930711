"""The excitation MLP of SE (and scSE's cSE, CBAM's) as a gate of the fused channel-gating node.

For SE's two-layer MLP, ``gate(fc2(act(fc1(z)))) * scale``, this module gives the
fused node (:mod:`attnblocks.blocks._fused_gate`) a hand-written derivative,
:class:`MLPRule`: it saves the autograd call on the small tensors and lets
``torch.compile`` trace the node (``benchmarks/README.md`` has the measurements).

Only activations and gates whose derivatives are written here take the rule
(:func:`fused_spec` returns ``None`` for anything else, and :func:`mlp_gate` leaves the
MLP to autograd). The derivatives are PyTorch's own backward kernels
(``aten::threshold_backward``, ``aten::sigmoid_backward``, ...; listed in
:data:`attnblocks._torch_compat.ATEN_KERNELS`), the ones autograd itself calls, so
both agree to floating-point rounding. The MLP backward runs in float32 when the MLP
ran in a half type: ``dL/ds`` of a large map overflows float16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnblocks._torch_compat import autocast_dtype
from attnblocks.blocks._fused_gate import PooledGate
from attnblocks.blocks._layers import LambdaLayer
from attnblocks.blocks._ops import accumulation_dtype, scale_gate, to_dtype

__all__ = [
    "FusedSpec",
    "MLPRule",
    "fused_spec",
    "linear_mlp",
    "linear_params",
    "mlp_dtype",
    "mlp_gate",
]

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
    """Return what :class:`MLPRule` needs to compute ``gate(fc2(act(fc1(z))))``, or ``None``.

    ``None`` means the activation or the gate is not one whose derivative
    :class:`MLPRule` knows, so autograd must differentiate the MLP.

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
    autocast = autocast_dtype(device_type)
    if autocast is None or weight_dtype == torch.float64:
        return weight_dtype
    return autocast


def _cast_optional(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else to_dtype(t, dtype)


_Params = tuple[torch.Tensor | None, ...]


class MLPRule(NamedTuple):
    """``gate(fc2(act(fc1(z)))) * gate_scale`` with its derivative written out.

    A :class:`~attnblocks.blocks._fused_gate.GateRule`; its parameters are
    ``(fc1.weight, fc1.bias, fc2.weight, fc2.bias)``, the biases possibly ``None``.
    """

    spec: FusedSpec
    gate_scale: float

    def __call__(
        self,
        z: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor,
        b2: torch.Tensor | None,
    ) -> torch.Tensor:
        """The gate with differentiable ops (the node's double-backward path)."""
        return self.forward((z,), (w1, b1, w2, b2))[0]

    def forward(
        self, pooled: tuple[torch.Tensor, ...], params: _Params
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The gate, computed as the plain modules compute it (autocast included)."""
        w1, b1, w2, b2 = params  # mlp_gate checked that the weights exist
        compute = mlp_dtype(w1.dtype, pooled[0].device.type)  # type: ignore[union-attr]
        # The mean as on the plain path: to the weights' dtype, and by autocast (if on)
        # to its dtype.
        z = to_dtype(to_dtype(pooled[0], w1.dtype), compute)  # type: ignore[union-attr]
        w1c, w2c = to_dtype(w1, compute), to_dtype(w2, compute)  # type: ignore[arg-type]
        h = F.linear(z, w1c, _cast_optional(b1, compute))
        a = _ACT_FORWARD[self.spec.act](h, self.spec.act_arg)
        p = F.linear(a, w2c, _cast_optional(b2, compute))
        s = _GATE_FORWARD[self.spec.gate](p)
        return scale_gate(s, self.gate_scale), (z, h, a, p, s, w1c, w2c)

    def backward(
        self,
        saved: tuple[torch.Tensor, ...],
        params: _Params,
        grad_gate: torch.Tensor,
        needs: tuple[bool, ...],
    ) -> tuple[_Params, _Params]:
        """Gradients of the mean and of ``(w1, b1, w2, b2)`` from ``dL/dgate``."""
        z, h, a, p, s, w1, w2 = saved
        need_z, need_w1, need_b1, need_w2, need_b2 = needs
        dtypes = [None if t is None else t.dtype for t in params]
        # The MLP backward runs on (N, C)-sized tensors, in float32 when the MLP itself
        # ran in a half type: dL/ds of a large feature map overflows float16 otherwise.
        acc = accumulation_dtype(z.dtype)
        if acc != z.dtype:
            z, h, a, p, s, w1, w2 = (t.to(acc) for t in (z, h, a, p, s, w1, w2))
        grad_s = scale_gate(to_dtype(grad_gate, acc), self.gate_scale)
        grad_p = _GATE_BACKWARD[self.spec.gate](grad_s, p, s)
        grad_w2 = to_dtype(grad_p.t().mm(a), dtypes[2]) if need_w2 else None  # type: ignore[arg-type]
        grad_b2 = to_dtype(grad_p.sum(0), dtypes[3]) if need_b2 else None  # type: ignore[arg-type]
        grad_w1 = grad_b1 = grad_z = None
        if need_z or need_w1 or need_b1:
            grad_h = _ACT_BACKWARD[self.spec.act](grad_p.mm(w2), h, a, self.spec.act_arg)
            if need_w1:
                grad_w1 = to_dtype(grad_h.t().mm(z), dtypes[0])  # type: ignore[arg-type]
            if need_b1:
                grad_b1 = to_dtype(grad_h.sum(0), dtypes[1])  # type: ignore[arg-type]
            if need_z:
                grad_z = grad_h.mm(w1)
        return (grad_z,), (grad_w1, grad_b1, grad_w2, grad_b2)


def mlp_gate(
    fc1: nn.Module | None,
    act: nn.Module | None,
    fc2: nn.Module | None,
    gate: nn.Module | None,
    gate_scale: float,
    *,
    pool_dtype: torch.dtype | None,
) -> PooledGate | None:
    """``gate(fc2(act(fc1(mean))))`` as a :class:`~attnblocks.blocks._fused_gate.PooledGate`.

    ``None`` unless ``fc1`` and ``fc2`` are plain ``nn.Linear`` layers. With an
    activation and gate :func:`fused_spec` knows, the gate carries :class:`MLPRule`;
    with any other (stateless) modules, autograd differentiates them.

    Args:
        fc1, act, fc2, gate: the block's excitation layers.
        gate_scale: the factor the gate is multiplied by (``init="identity"``).
        pool_dtype: passed on to the node's average pooling (see
            :class:`~attnblocks.blocks._fused_gate.PooledGate`).
    """
    params = linear_params(fc1, fc2)
    if params is None or act is None or gate is None:
        return None

    spec = fused_spec(act, gate)
    if spec is not None:  # the activation and gate are stateless built-in modules
        rule = MLPRule(spec, gate_scale)
        return PooledGate(rule, params, pool_dtype=pool_dtype, rule=rule)  # type: ignore[arg-type]

    def fn(z: torch.Tensor, *params: torch.Tensor | None) -> torch.Tensor:
        return scale_gate(gate(linear_mlp(z, act, params)), gate_scale)

    return PooledGate(fn, params, modules=(act, gate), pool_dtype=pool_dtype)


def linear_params(fc1: nn.Module | None, fc2: nn.Module | None) -> _Params | None:
    """``(fc1.weight, fc1.bias, fc2.weight, fc2.bias)`` of two plain ``nn.Linear`` layers.

    ``None`` when a layer is not exactly an ``nn.Linear`` or has lost its weight; a
    missing bias is ``None`` in the tuple.
    """
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
        return None
    # _parameters directly: this runs on every forward, and each nn.Module.__getattr__
    # costs about a microsecond.
    p1, p2 = fc1._parameters, fc2._parameters
    params = (p1["weight"], p1.get("bias"), p2["weight"], p2.get("bias"))
    return None if params[0] is None or params[2] is None else params


def linear_mlp(z: torch.Tensor, act: nn.Module, params: _Params) -> torch.Tensor:
    """``fc2(act(fc1(z)))`` from :func:`linear_params`, as the modules compute it.

    ``z`` is first cast to the dtype of ``fc1``'s weight.
    """
    w1, b1, w2, b2 = params
    h = F.linear(to_dtype(z, w1.dtype), w1, b1)  # type: ignore[union-attr, arg-type]
    return F.linear(act(h), w2, b2)  # type: ignore[arg-type]
