"""Squeeze-and-Excitation block.

Paper: Jie Hu, Li Shen, Samuel Albanie, Gang Sun, Enhua Wu, "Squeeze-and-Excitation
Networks", CVPR 2018 / TPAMI 2019, https://arxiv.org/abs/1709.01507
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from attnblocks._validation import check_bool
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._fused_gate import PooledGate
from attnblocks.blocks._layers import ACTIVATIONS, GATES, LayerSpec, make_layer
from attnblocks.blocks._ops import global_avg_pool_for, to_dtype
from attnblocks.blocks._options import hidden_width
from attnblocks.blocks._registry import register_block
from attnblocks.blocks._se_function import mlp_dtype, mlp_gate

__all__ = ["SEBlock", "se_hidden_channels"]

InitMode = Literal["default", "identity"]


def se_hidden_channels(
    channels: int, reduction: float, *, divisor: int | None = None, round_limit: float = 0.0
) -> int:
    """The bottleneck width of an SE block: ``floor(channels / reduction)``, at least 1.

    The paper's excitation maps ``C`` channels to ``C / r`` hidden units. Flooring
    matches the common ``C // r``; the lower bound of 1 keeps a narrow block a real
    SE block (an 8-channel block with ``r = 16`` gets one hidden unit, not zero).
    With ``divisor``, ``channels / reduction`` is rounded to the nearest multiple of
    ``divisor`` instead (halves up, at least ``divisor``), plus one more ``divisor`` if
    that fell below ``round_limit`` times the exact width: timm's ``rd_divisor`` rule
    (its SE modules: ``divisor=8``, round limit 0, the widths of ``seresnet*``) and
    torchvision's ``_make_divisible`` (``divisor=8, round_limit=0.9``). Every block with
    a hidden width takes the same two options.

    >>> from attnblocks.blocks import se_hidden_channels
    >>> se_hidden_channels(64, 16), se_hidden_channels(8, 16), se_hidden_channels(100, 8)
    (4, 1, 12)
    >>> se_hidden_channels(64, 16, divisor=8), se_hidden_channels(100, 8, divisor=8)
    (8, 16)

    ``reduction`` must be at least ``1 / 64`` (a hidden layer at most 64 times as wide).
    """
    return hidden_width(channels, reduction, None, divisor, round_limit, owner="SEBlock")[1]


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
        divisor: round ``channels / reduction`` to a multiple of ``divisor`` instead of
            flooring it, as :func:`~attnblocks.blocks.se_hidden_channels` describes.
        round_limit: with ``divisor``: the share of the exact width it may not fall below.
        activation: :math:`\delta`: a name (``"relu"``, ``"silu"``, ``"gelu"``, ...), an
            ``nn.Module`` class or factory, or a module instance.
        gate: :math:`\sigma`: ``"sigmoid"``, ``"hard_sigmoid"``, an ``nn.Module`` class
            or factory, a module instance or a tensor function such as ``torch.sigmoid``.
        bias: whether :math:`W_1` and :math:`W_2` have biases (the paper's figures omit
            them; torchvision and timm use them).
        init: ``"default"`` uses PyTorch's standard ``nn.Linear`` initialisation.
            ``"identity"`` makes the block an exact identity map at initialisation while
            every parameter still receives gradient: :math:`W_1 = 0`, :math:`b_1 = 1`
            (every hidden unit holds :math:`h = \delta(1)`), each row of :math:`W_2`
            holds :math:`+2^{-3}` and :math:`-2^{-3}` on two hidden units and
            :math:`b_2 = 0`, so the pre-gate is :math:`h/8 - h/8 = 0` exactly, and the
            gate is scaled by :math:`1 / \sigma(0)` (2 for sigmoid, as in the NF-Net SE
            variant), so :math:`2\sigma(0) = 1`. ``block(x)`` then equals ``x`` bit for
            bit (``torch.equal``) for every finite input, in every floating dtype, in
            either memory format and under autocast, also after ``.to(dtype)``; with a
            single hidden unit the cancellation goes through :math:`b_2 = -h/8` and is
            exact in the dtype the block was initialised in (call
            :meth:`reset_parameters` after changing it). Use it to add SE to a trained
            model without changing its predictions. Needs ``bias=True``.

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

    init_modes = ("default", "identity")

    #: Whether ``forward`` may use the fused implementation
    #: (``attnblocks.blocks._fused_gate``) when there is something to differentiate: one
    #: autograd node whose backward makes fewer passes over the feature map. Without
    #: gradients (``torch.no_grad``, ``torch.inference_mode``, or nothing requiring grad)
    #: the submodules are called either way. The fused node is used only when it
    #: computes exactly what the submodules would: plain ``nn.Linear`` layers, an
    #: activation and gate without parameters (ReLU, ReLU6, SiLU, GELU, LeakyReLU,
    #: Hardswish, Mish, Tanh, Identity with sigmoid or hard sigmoid have hand-written
    #: derivatives; others are differentiated by autograd on the ``(N, C)`` tensors), no
    #: hooks on the submodules, and not while ``torch.jit`` traces, ``torch.export``
    #: exports, or a ``torch.func`` transform or forward-mode AD is active. Set it to
    #: ``False`` on an instance to always call the submodules.
    fast_path: bool = True

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden_channels: int | None = None,
        divisor: int | None = None,
        round_limit: float = 0.0,
        activation: LayerSpec = "relu",
        gate: LayerSpec = "sigmoid",
        bias: bool = True,
        init: InitMode = "default",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.reduction, self.hidden_channels = hidden_width(
            self.channels, reduction, hidden_channels, divisor, round_limit, owner=owner
        )
        self.init = self._check_init(init, bias=check_bool(bias, "bias", owner=owner))
        self.fc1 = nn.Linear(self.channels, self.hidden_channels, bias=bias)
        self.act = make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
        self.fc2 = nn.Linear(self.hidden_channels, self.channels, bias=bias)
        self.gate = make_layer(gate, GATES, arg="gate", owner=owner)
        # The Linear layers already hold PyTorch's default initialisation.
        self._init_gates(mlp=(self.fc1, self.act, self.fc2))

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters according to ``self.init``."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        self._init_gates(mlp=(self.fc1, self.act, self.fc2))

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """Return the gate :math:`s` (eq. 3) the block would apply to ``x``.

        Args:
            x: input of shape :math:`(N, C, *)`.

        Returns:
            A tensor of shape :math:`(N, C)` (times ``gate_scale``, 1 unless
            ``init="identity"``).
        """
        self._check_input(x)
        return self._excitation(x)

    def _excitation(self, x: torch.Tensor) -> torch.Tensor:
        # ``_modules`` directly: each ``nn.Module.__getattr__`` costs about a microsecond,
        # a few percent of a small block's forward.
        modules = self._modules
        fc1: nn.Linear = modules["fc1"]  # type: ignore[assignment]
        weight_dtype = fc1.weight.dtype
        # The dtype fc1 computes in: its weights', or autocast's for an nn.Linear.
        compute = mlp_dtype(weight_dtype, x.device.type) if type(fc1) is nn.Linear else weight_dtype
        # To the weights' dtype: autocast, if on, casts inside the Linear.
        squeezed = to_dtype(global_avg_pool_for(x, compute), weight_dtype)
        gate = modules["gate"](modules["fc2"](modules["act"](fc1(squeezed))))  # type: ignore[misc]
        return self._scale(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Re-weight the channels of ``x`` by the excitation gate (eq. 4)."""
        self._check_input(x)
        # The fused node only pays off in the backward pass (it is not used without
        # one). With nothing to differentiate the submodules run as they are: the same
        # tensor operations, and measured about 20 us per call faster than the fused
        # forward with cold caches, as inside a network (bench_se.py --cache cold).
        fused = self._fused_forward(x)
        return self._apply_gate(x, self._excitation(x)) if fused is None else fused

    def _pooled_gate(self, x: torch.Tensor) -> PooledGate | None:
        """The excitation as the fused node computes it (``None``: call the submodules)."""
        modules = self._modules
        fc1, fc2 = modules["fc1"], modules["fc2"]
        weight = fc1._parameters.get("weight") if fc1 is not None else None
        if weight is None:
            return None
        pool_dtype = mlp_dtype(weight.dtype, x.device.type)
        act, gate = modules["act"], modules["gate"]
        return mlp_gate(fc1, act, fc2, gate, self.gate_scale, pool_dtype=pool_dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"gate_scale={self.gate_scale}"
        )
