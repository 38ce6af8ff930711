"""Coordinate Attention block.

Paper: Qibin Hou, Daquan Zhou, Jiashi Feng, "Coordinate Attention for Efficient Mobile
Network Design", CVPR 2021, https://arxiv.org/abs/2103.02907
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attnblocks._validation import check_bool
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._layers import ACTIVATIONS, GATES, LayerSpec, make_layer
from attnblocks.blocks._ops import match_memory_format, to_dtype
from attnblocks.blocks._options import hidden_width
from attnblocks.blocks._registry import register_block
from attnblocks.blocks._strip_gate import StripGate, strip_pools, try_strip_fused

__all__ = ["CoordAttentionBlock"]

_NO_IDENTITY = (
    "an exact identity needs gates g_h(i) * g_w(j) = 1 for every input, which (each gate "
    "seeing only its own row or column) means gates that do not depend on the input; "
    "the BatchNorm after the shared convolution then sees a constant, which "
    "training-mode BatchNorm normalises to 0, so its weight would get no gradient."
)


@register_block("coord")
class CoordAttentionBlock(AttentionBlock):
    r"""Coordinate Attention (Hou et al., CVPR 2021, arXiv:2103.02907).

    Coordinate attention factorises global pooling into two 1D poolings, so the gates
    keep the position along each axis (eqs. 4-9):

    * **coordinate information embedding**: :math:`z^h_c(h) = \text{mean}_w\, x_c(h, w)`
      and :math:`z^w_c(w) = \text{mean}_h\, x_c(h, w)` (float32 accumulation for half
      types);
    * **coordinate attention generation**: :math:`f = \delta(\text{BN}(F_1([z^h, z^w])))`,
      a shared :math:`1 \times 1` convolution :math:`F_1` from :math:`C` to
      :math:`C/r` channels over the concatenated :math:`H + W` positions, BatchNorm and
      h-swish :math:`\delta`; :math:`f` is split back into :math:`f^h, f^w` and
      :math:`g^h = \sigma(F_h(f^h))`, :math:`g^w = \sigma(F_w(f^w))`, two
      :math:`1 \times 1` convolutions back to :math:`C` channels;
    * :math:`y_c(i, j) = x_c(i, j) \cdot g^h_c(i) \cdot g^w_c(j)`.

    The hidden width is ``max(8, floor(C / r))`` with :math:`r = 32`, as in the
    authors' code. Parameters: :math:`C m + m` (:math:`F_1`) + :math:`2m` (BN) +
    :math:`2(m C + C)` (:math:`F_h, F_w`), with :math:`m` the hidden width.

    Only 2D feature maps :math:`(N, C, H, W)` are accepted: the block is defined by its
    two axes, height and width. Other ranks raise :class:`~attnblocks.InvalidInputError`.
    BatchNorm makes the output depend on the rest of the batch in training mode (as
    in the paper); in eval mode every sample is processed independently.

    Identity init is not available: an exact identity needs
    :math:`g^h_c(i) \cdot g^w_c(j) = 1` for every input, and since each gate sees only
    its own row or column, gates that do not depend on the input. The BatchNorm after
    :math:`F_1` then sees a constant, which training-mode BatchNorm normalises to 0, so
    its weight would get no gradient.

    The block has no per-channel gate (``has_channel_gate`` is False): its gates vary
    along :math:`H` and :math:`W`. :meth:`coordinate_maps` returns the two factors
    :math:`g^h` and :math:`g^w`. Its spatial map is their product
    :math:`g^h_c(i) \cdot g^w_c(j)`, shape :math:`(N, C, H, W)`, the weight each
    activation is multiplied by: it goes to the map hooks (``has_spatial_map`` is
    True; the product is built only while a map hook is registered) and
    :meth:`spatial_map` returns it.

    With a backward pass, the block runs as one autograd node (``fast_path``): the
    strip pools, the gates and :math:`x \cdot g^h \cdot g^w` in a forward that makes
    the plain path's operations (the same output, bitwise), and a backward that makes
    about half of plain autograd's passes over the map; the small layers between the
    strips and the gates are differentiated by autograd, BatchNorm's running statistics
    are updated once per forward as on the plain path. Without gradients, under
    ``torch.jit``, ``torch.export``, ``torch.compile``, ``torch.func`` transforms, with
    module hooks on a submodule or with layers replaced by others, the plain modules
    run. Set ``fast_path = False`` to always run them.

    Args:
        channels: :math:`C`, the number of input (and output) channels.
        reduction: :math:`r` (32 in the paper).
        hidden_channels: explicit hidden width :math:`m`, overriding ``reduction``.
        divisor: round ``channels / reduction`` to a multiple of ``divisor`` instead of
            flooring it, as :func:`~attnblocks.blocks.se_hidden_channels` describes.
        round_limit: with ``divisor``: the share of the exact width it may not fall below.
        activation: :math:`\delta` (h-swish in the paper: ``"hard_swish"``).
        gate: :math:`\sigma` of both directions (sigmoid in the paper).
        bias: whether the three convolutions have biases.
        init: ``"default"`` only (PyTorch's initialisation).

    Shape:
        - Input: :math:`(N, C, H, W)`, any floating dtype, contiguous or channels_last.
        - Output: same shape, dtype and memory format as the input.

    Example:
        >>> import torch
        >>> from attnblocks import CoordAttentionBlock
        >>> ca = CoordAttentionBlock(256)
        >>> ca.hidden_channels, sum(p.numel() for p in ca.parameters())
        (8, 6680)
        >>> x = torch.randn(2, 256, 14, 10)
        >>> ca(x).shape
        torch.Size([2, 256, 14, 10])
        >>> [g.shape for g in ca.coordinate_maps(x)]
        [torch.Size([2, 256, 14, 1]), torch.Size([2, 256, 1, 10])]
    """

    identity_init_unavailable = _NO_IDENTITY
    has_channel_gate = False
    has_spatial_map = True
    spatial_dims: tuple[int, ...] = (2,)
    spatial_dims_reason = "its gates are defined along height and width"
    #: Whether to run the fused node (strip pools, gates and scaling in one autograd
    #: node, fewer passes over the map in the backward) when there is a backward pass
    #: (as :attr:`SEBlock.fast_path <attnblocks.SEBlock.fast_path>`).
    fast_path: bool = True

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 32,
        hidden_channels: int | None = None,
        divisor: int | None = None,
        round_limit: float = 0.0,
        activation: LayerSpec = "hard_swish",
        gate: LayerSpec = "sigmoid",
        bias: bool = True,
        init: Literal["default"] = "default",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.reduction, self.hidden_channels = hidden_width(
            self.channels, reduction, hidden_channels, divisor, round_limit, owner=owner
        )
        if hidden_channels is None:
            self.hidden_channels = max(8, self.hidden_channels)
        check_bool(bias, "bias", owner=owner)
        self.init = self._check_init(init)
        m = self.hidden_channels
        self.conv1 = nn.Conv2d(self.channels, m, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(m)
        self.act = make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
        self.conv_h = nn.Conv2d(m, self.channels, 1, bias=bias)
        self.conv_w = nn.Conv2d(m, self.channels, 1, bias=bias)
        self.gate = make_layer(gate, GATES, arg="gate", owner=owner)

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters and BatchNorm statistics."""
        for layer in (self.conv1, self.bn1, self.conv_h, self.conv_w):
            layer.reset_parameters()

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[2], x.shape[3]
        if x.numel() == 0:
            # No positions (or no samples): a gate is empty, the other one a mean over
            # nothing (NaN), which must not reach BatchNorm's statistics or its counter.
            n, c, dtype = x.shape[0], self.channels, self.conv1.weight.dtype
            nan = float("nan")
            g_h = x.new_full((n, c, height, 1), nan, dtype=dtype)
            return g_h, x.new_full((n, c, 1, width), nan, dtype=dtype)
        return self._strip_gates(*strip_pools(x))

    def _strip_gates(
        self, along_h: torch.Tensor, along_w: torch.Tensor, *, update_stats: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gates from the strips ``(N, C, H, 1)`` and ``(N, C, 1, W)``.

        With ``update_stats=False`` BatchNorm normalises as it would but leaves its
        running statistics alone (the fused node's double-backward path recomputes).
        """
        height = along_h.shape[2]
        joint = torch.cat([along_h, along_w.transpose(2, 3)], dim=2)  # (N, C, H + W, 1)
        joint = self.conv1(to_dtype(joint, self.conv1.weight.dtype))
        bn = self.bn1 if update_stats else partial(_batch_norm_without_update, self.bn1)
        joint = bn(joint)
        f_h, f_w = torch.split(self.act(joint), [height, joint.shape[2] - height], dim=2)
        g_h = self.gate(self.conv_h(f_h))  # (N, C, H, 1)
        g_w = self.gate(self.conv_w(f_w.transpose(2, 3)))  # (N, C, 1, W)
        return g_h, g_w

    def _strip_gate(self) -> StripGate | None:
        """The gates as the fused node computes them, or ``None`` (layers of other types)."""
        layers = (self.conv1, self.bn1, self.conv_h, self.conv_w)
        if tuple(type(m) for m in layers) != (nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.Conv2d):
            return None
        return StripGate(
            fn=self._strip_gates,
            recompute=partial(self._strip_gates, update_stats=False),
            params=tuple(self.parameters()),
            modules=(self.act, self.gate),
        )

    def coordinate_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the height and width gates :math:`(g^h, g^w)` that ``forward`` applies.

        Their shapes are :math:`(N, C, H, 1)` and :math:`(N, C, 1, W)`; their dtype is
        the parameters'.
        """
        self._check_input(x)
        return self._gates(x)

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return :math:`g^h \\otimes g^w`, shape :math:`(N, C, H, W)`: each activation's weight.

        The dtype is the parameters'.
        """
        g_h, g_w = self.coordinate_maps(x)
        return g_h * g_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weight ``x`` by its height gate and its width gate."""
        self._check_input(x)
        fused = try_strip_fused(self, x)
        if fused is not None:
            out, g_h, g_w = fused
            if self.has_map_hooks:
                self._emit_map(g_h * g_w)
            return match_memory_format(out, x)
        g_h, g_w = self._gates(x)
        if self.has_map_hooks:
            self._emit_map(g_h * g_w)
        out = x * to_dtype(g_h, x.dtype)
        # Without a graph to record, the second product goes into the first's buffer
        # (not while tracing: a trace must not depend on requires_grad).
        g_w = to_dtype(g_w, x.dtype)
        if out.requires_grad or g_w.requires_grad or torch.jit.is_tracing():
            out = out * g_w
        else:
            out = out.mul_(g_w)
        return match_memory_format(out, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden_channels={self.hidden_channels}"


def _batch_norm_without_update(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` as the module normalises it now, without updating its statistics."""
    batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(
        x,
        None if batch_stats else bn.running_mean,
        None if batch_stats else bn.running_var,
        bn.weight,
        bn.bias,
        batch_stats,
        0.0,
        bn.eps,
    )
