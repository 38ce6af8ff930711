"""Squeeze-and-Excitation block.

Paper: Jie Hu, Li Shen, Samuel Albanie, Gang Sun, Enhua Wu, "Squeeze-and-Excitation
Networks", CVPR 2018 / TPAMI 2019, https://arxiv.org/abs/1709.01507
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError
from attnblocks._torch_compat import is_exporting
from attnblocks._validation import check_feature_map, check_positive_int, check_positive_number
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._layers import ACTIVATIONS, GATES, LayerSpec, make_layer
from attnblocks.blocks._ops import global_avg_pool_for
from attnblocks.blocks._registry import register_block
from attnblocks.blocks._se_function import FusedSpec, SEFunction, fused_spec, mlp_dtype

__all__ = ["SEBlock", "se_hidden_channels"]

InitMode = Literal["default", "identity"]
_INIT_MODES = ("default", "identity")


def se_hidden_channels(channels: int, reduction: float) -> int:
    """The bottleneck width of an SE block: ``floor(channels / reduction)``, at least 1.

    The paper's excitation maps ``C`` channels to ``C / r`` hidden units. Flooring
    matches the common ``C // r``; the lower bound of 1 keeps a narrow block a real
    SE block (an 8-channel block with ``r = 16`` gets one hidden unit, not zero).

    >>> from attnblocks.blocks import se_hidden_channels
    >>> se_hidden_channels(64, 16), se_hidden_channels(8, 16), se_hidden_channels(100, 8)
    (4, 1, 12)
    """
    return max(1, int(channels / reduction))


#: ``(fc1.weight, fc1.bias, fc2.weight, fc2.bias)``; the biases are ``None`` with ``bias=False``.
_LinearParams = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def _is_exporting() -> bool:
    return bool(is_exporting())  # on torch < 2.7: any dynamo trace (see _torch_compat)


def _function_transform_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) or forward-mode AD is on."""
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch_active is not None and functorch_active():
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _has_global_module_hooks() -> bool:
    # Hooks registered with torch.nn.modules.module.register_module_forward_hook and
    # friends would be called for fc1/act/fc2/gate on the plain path but not the fused one.
    module_globals = torch.nn.modules.module
    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(getattr(module_globals, name, None) for name in names)


@register_block("se")
class SEBlock(AttentionBlock):
    r"""Squeeze-and-Excitation block (Hu et al., 2018, arXiv:1709.01507).

    With input :math:`X \in \mathbb{R}^{N \times C \times *}` the block computes

    * **squeeze** (eq. 2): :math:`z_c = \text{mean}_{\text{spatial}}(x_c)`, global average
      pooling over every spatial dimension, accumulated in float32 for half types (and
      rounded to bfloat16 once when the excitation itself runs in bfloat16);
    * **excitation** (eq. 3): :math:`s = \sigma(W_2\,\delta(W_1 z))` with
      :math:`W_1 \in \mathbb{R}^{\frac{C}{r} \times C}`, :math:`W_2 \in \mathbb{R}^{C
      \times \frac{C}{r}}`, :math:`\delta` the activation (``act``, ReLU in the paper)
      and :math:`\sigma` the gate (``gate``, sigmoid in the paper);
    * **scale** (eq. 4): :math:`\tilde{x}_c = s_c \cdot x_c`.

    In training the block is one autograd node with a hand-written backward that
    reads and writes the feature map fewer times than PyTorch's default graph (no
    separate pooling gradient to add, no ``grad * x`` product in the contiguous
    layout, two full-size allocations per step instead of five), and matches
    the plain modules to floating-point rounding; see :attr:`fast_path`.

    Args:
        channels: :math:`C`, the number of input (and output) channels.
        reduction: :math:`r`, the reduction ratio; the hidden width is
            :func:`se_hidden_channels` ``(channels, reduction)``. Ignored when
            ``hidden_channels`` is given.
        hidden_channels: explicit hidden width :math:`C / r`, overriding ``reduction``.
        activation: :math:`\delta`: a name (``"relu"``, ``"silu"``, ``"gelu"``, ...), an
            ``nn.Module`` class or factory, or a module instance.
        gate: :math:`\sigma`: ``"sigmoid"``, ``"hard_sigmoid"``, an ``nn.Module`` class
            or factory, a module instance or a tensor function such as ``torch.sigmoid``.
        bias: whether :math:`W_1` and :math:`W_2` have biases (the paper's figures omit
            them; torchvision and timm use them).
        init: ``"default"`` uses PyTorch's standard ``nn.Linear`` initialisation.
            ``"identity"`` makes the block an exact identity map at initialisation while
            every parameter still receives gradient: :math:`W_1 = 0`, :math:`b_1 = 1`,
            :math:`W_2 = \pm 2^{-3}`, :math:`b_2 = -W_2\,\delta(b_1)` so that the
            pre-gate is exactly 0, and the gate is scaled by :math:`1 / \sigma(0)` (2 for
            sigmoid, as in the NF-Net SE variant), so :math:`2\sigma(0) = 1`. Use it to
            add SE to a trained model without changing its predictions. Needs
            ``bias=True``.

    Shape:
        - Input: :math:`(N, C, *)` with 1 to 3 spatial dimensions, any floating dtype,
          contiguous or channels_last.
        - Output: same shape, dtype and memory format as the input.

    Example:
        >>> import torch
        >>> from attnblocks import SEBlock
        >>> se = SEBlock(64, reduction=16)
        >>> se
        SEBlock(
          channels=64, hidden_channels=4, gate_scale=1.0
          (fc1): Linear(in_features=64, out_features=4, bias=True)
          (act): ReLU(inplace=True)
          (fc2): Linear(in_features=4, out_features=64, bias=True)
          (gate): Sigmoid()
        )
        >>> x = torch.randn(8, 64, 32, 32)
        >>> se(x).shape
        torch.Size([8, 64, 32, 32])
        >>> se.excitation(x).shape  # the gate s, one value per (sample, channel)
        torch.Size([8, 64])
        >>> ident = SEBlock(64, init="identity")
        >>> torch.equal(ident(x), x)
        True
    """

    supports_identity_init = True

    #: Whether ``forward`` may use the fused implementation
    #: (``attnblocks.blocks._se_function``) when there is something to differentiate: a
    #: custom autograd function whose hand-written backward makes fewer passes over the
    #: feature map. Without gradients (``torch.no_grad``, ``torch.inference_mode``, or
    #: nothing requiring grad) the submodules are called either way. The fused function
    #: is used only when it computes exactly what the submodules would: an activation
    #: and gate whose derivatives it knows (ReLU, ReLU6, SiLU, GELU, LeakyReLU,
    #: Hardswish, Mish, Tanh, Identity; sigmoid, hard sigmoid), plain ``nn.Linear``
    #: layers, no hooks on the submodules, and not while ``torch.jit`` traces,
    #: ``torch.export`` exports, or a ``torch.func`` transform or forward-mode AD is
    #: active. Set it to ``False`` on an instance to always call the submodules.
    fast_path: bool = True

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden_channels: int | None = None,
        activation: LayerSpec = "relu",
        gate: LayerSpec = "sigmoid",
        bias: bool = True,
        init: InitMode = "default",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.channels = check_positive_int(channels, "channels", owner=owner)
        self.reduction = check_positive_number(reduction, "reduction", owner=owner)
        if hidden_channels is None:
            self.hidden_channels = se_hidden_channels(self.channels, self.reduction)
        else:
            self.hidden_channels = check_positive_int(
                hidden_channels, "hidden_channels", owner=owner
            )
        if not isinstance(bias, bool):
            raise InvalidArgumentError(f"{owner}: bias must be True or False, got {bias!r}.")
        if init not in _INIT_MODES:
            raise InvalidArgumentError(
                f"{owner}: unknown init {init!r}; valid values are {list(_INIT_MODES)}."
            )
        if init == "identity" and not bias:
            raise InvalidArgumentError(
                f"{owner}: init='identity' needs bias=True (the identity start is built "
                "from the biases); got bias=False."
            )
        self.init = init
        self.fc1 = nn.Linear(self.channels, self.hidden_channels, bias=bias)
        self.act = make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
        self.fc2 = nn.Linear(self.hidden_channels, self.channels, bias=bias)
        self.gate = make_layer(gate, GATES, arg="gate", owner=owner)
        self.gate_scale = 1.0
        if init == "identity":  # the Linear layers already hold PyTorch's default init
            self._identity_init()

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters according to ``self.init``."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        self.gate_scale = 1.0
        if self.init == "identity":
            self._identity_init()

    @torch.no_grad()
    def _identity_init(self) -> None:
        owner = type(self).__name__
        probe = self.fc1.weight.new_zeros(1)
        gate_at_zero = float(self.gate(probe).item())
        if not 0.0 < gate_at_zero < float("inf"):
            raise InvalidArgumentError(
                f"{owner}: init='identity' needs a gate with a finite, positive value at 0; "
                f"the gate {self.gate} gives {gate_at_zero} there."
            )
        scale = 1.0 / gate_at_zero
        if scale * gate_at_zero != 1.0:
            raise InvalidArgumentError(
                f"{owner}: init='identity' needs 1 / gate(0) to be exact in floating point; "
                f"gate(0) = {gate_at_zero!r} is not. Use 'sigmoid' or 'hard_sigmoid'."
            )
        bias1, bias2 = self.fc1.bias, self.fc2.bias
        if bias1 is None or bias2 is None:  # unreachable: bias=True is checked in __init__
            raise InvalidArgumentError(f"{owner}: init='identity' needs bias=True.")
        self.fc1.weight.zero_()
        bias1.fill_(1.0)
        hidden = self.act(bias1.detach().clone()[None]).to(torch.float64)
        signs = torch.randint(0, 2, self.fc2.weight.shape, device=self.fc2.weight.device)
        self.fc2.weight.copy_((signs * 2 - 1).to(self.fc2.weight.dtype) * 2.0**-3)
        pre_gate = hidden @ self.fc2.weight.to(torch.float64).T
        bias2.copy_(-pre_gate[0])
        self.gate_scale = scale

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """Return the gate :math:`s` (eq. 3) the block would apply to ``x``.

        Args:
            x: input of shape :math:`(N, C, *)`.

        Returns:
            A tensor of shape :math:`(N, C)` (times ``gate_scale``, 1 unless
            ``init="identity"``).
        """
        check_feature_map(x, self.channels, owner=type(self).__name__)
        return self._excitation(x)

    def _excitation(self, x: torch.Tensor) -> torch.Tensor:
        # ``_modules`` directly: each ``nn.Module.__getattr__`` costs about a microsecond,
        # a few percent of a small block's forward.
        modules = self._modules
        fc1: nn.Linear = modules["fc1"]  # type: ignore[assignment]
        weight_dtype = fc1.weight.dtype
        # The dtype fc1 computes in: its weights', or autocast's for an nn.Linear.
        compute = mlp_dtype(weight_dtype, x.device.type) if type(fc1) is nn.Linear else weight_dtype
        squeezed = global_avg_pool_for(x, compute)
        if squeezed.dtype != weight_dtype:  # autocast, if on, casts inside the Linear
            squeezed = squeezed.to(weight_dtype)
        gate = modules["gate"](modules["fc2"](modules["act"](fc1(squeezed))))  # type: ignore[misc]
        if self.gate_scale != 1.0:
            gate = gate * self.gate_scale
        return gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Re-weight the channels of ``x`` by the excitation gate (eq. 4)."""
        check_feature_map(x, self.channels, owner=type(self).__name__)
        # The fused function only pays off in the backward pass. With nothing to
        # differentiate the submodules run as they are: the same tensor operations, and
        # measured about 20 us per call faster than the fused forward with cold caches,
        # as inside a network, at every map size (bench_se.py --cache cold).
        fused = self._fused_arguments() if torch.is_grad_enabled() else None
        if fused is not None:
            spec, (w1, b1, w2, b2) = fused
            if x.requires_grad or any(p is not None and p.requires_grad for p in (w1, b1, w2, b2)):
                out, gate = SEFunction.apply(x, w1, b1, w2, b2, spec, self.gate_scale)
                self._emit_gate(gate)
                return out
        gate = self._excitation(x)
        self._emit_gate(gate)
        if gate.dtype != x.dtype:
            gate = gate.to(x.dtype)
        return x * gate.view(gate.shape + (1,) * (x.dim() - 2))

    def _fused_arguments(self) -> tuple[FusedSpec, _LinearParams] | None:
        """The fused path's spec and ``(w1, b1, w2, b2)``, or ``None`` to call the submodules.

        Reads ``_modules``/``_parameters`` directly: this runs on every forward, and
        each ``nn.Module.__getattr__`` costs about a microsecond.
        """
        if not self.fast_path or torch.jit.is_scripting() or torch.jit.is_tracing():
            return None
        if _is_exporting():  # export records the plain modules, as users expect
            return None
        if _function_transform_active():  # SEFunction has no vmap or jvp rule
            return None
        modules = self._modules
        fc1, act, fc2, gate = modules["fc1"], modules["act"], modules["fc2"], modules["gate"]
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            return None
        for module in (fc1, act, fc2, gate):
            if (
                module._forward_hooks  # type: ignore[union-attr]
                or module._forward_pre_hooks  # type: ignore[union-attr]
                or module._backward_hooks  # type: ignore[union-attr]
                or module._backward_pre_hooks  # type: ignore[union-attr]
            ):
                return None  # the fused path would skip them
        if _has_global_module_hooks():
            return None
        spec = fused_spec(act, gate)  # type: ignore[arg-type]
        if spec is None:
            return None
        p1, p2 = fc1._parameters, fc2._parameters
        w1, w2 = p1["weight"], p2["weight"]
        if w1 is None or w2 is None:
            return None
        return spec, (w1, p1.get("bias"), w2, p2.get("bias"))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"gate_scale={self.gate_scale}"
        )
