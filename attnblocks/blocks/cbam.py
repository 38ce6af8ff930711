"""Convolutional Block Attention Module (CBAM).

Paper: Sanghyun Woo, Jongchan Park, Joon-Young Lee, In So Kweon, "CBAM: Convolutional
Block Attention Module", ECCV 2018, https://arxiv.org/abs/1807.06521
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_bool, check_positive_int
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._fused_gate import PooledGate
from attnblocks.blocks._layers import ACTIVATIONS, GATES, LayerSpec, make_layer
from attnblocks.blocks._ops import (
    global_avg_pool,
    global_max_pool,
    has_zero_extent,
    match_memory_format,
    per_channel,
    scale_gate,
    to_dtype,
)
from attnblocks.blocks._options import hidden_width
from attnblocks.blocks._registry import register_block
from attnblocks.blocks._se_function import linear_mlp, linear_params
from attnblocks.blocks._spatial_gate import SpatialGate, channel_pools, try_spatial_fused

__all__ = ["CBAMBlock"]


@register_block("cbam")
class CBAMBlock(AttentionBlock):
    r"""Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv:1807.06521).

    CBAM applies a channel gate, then a spatial gate, in sequence (eq. 1):
    :math:`F' = M_c(F) \otimes F`, :math:`F'' = M_s(F') \otimes F'`.

    * **Channel attention** (eq. 2): :math:`M_c(F) = \sigma(\text{MLP}(\text{AvgPool}(F)) +
      \text{MLP}(\text{MaxPool}(F)))`, one MLP :math:`W_1 \delta(W_0\,\cdot)` with
      :math:`W_0 \in \mathbb{R}^{C/r \times C}`, shared by the average- and max-pooled
      descriptors. Its weights number :math:`2 C^2 / r` (plus :math:`C/r + C` biases).
    * **Spatial attention** (eq. 3): :math:`M_s(F') = \sigma(f^{7 \times 7}(
      [\text{AvgPool}_c(F'); \text{MaxPool}_c(F')]))`, a :math:`7 \times 7` convolution
      (``spatial_kernel_size``) from the channel-wise mean and max maps to one map,
      :math:`2 \cdot 7 \cdot 7 + 1` parameters. The authors' code (and timm's
      ``CbamModule``) follows this convolution with a BatchNorm instead of a bias; by
      default this block keeps the paper's plain convolution with a bias, so it has no
      batch statistics, and ``spatial_norm=True`` builds the authors' version.

    Average pooling (over space and over channels) accumulates in float32 for half
    types.

    Only 2D feature maps :math:`(N, C, H, W)` are accepted: the paper defines the
    spatial step with a 2D convolution, and the block builds it for 2D at
    construction. Other ranks raise :class:`~attnblocks.InvalidInputError`.

    Identity init is available: ``init="identity"`` makes both pre-gates exactly 0
    for every finite input (the MLP as in :class:`~attnblocks.SEBlock`: :math:`W_0 = 0`,
    a constant hidden vector and a last layer whose two opposite weights per row cancel
    exactly; the spatial convolution's weight and bias at 0) and scales both gates by
    :math:`1/\sigma(0) = 2`. The output equals the input bit for bit, in every dtype
    and under autocast, and every
    parameter receives gradient (the spatial weights see the non-zero pooled maps,
    :math:`W_0` sees the non-zero :math:`W_1`).

    Args:
        channels: :math:`C`, the number of input (and output) channels.
        reduction: :math:`r`, the channel MLP's reduction ratio (16 in the paper);
            the hidden width is ``max(1, floor(C / r))``.
        hidden_channels: explicit hidden width, overriding ``reduction``.
        divisor: round ``channels / reduction`` to a multiple of ``divisor`` instead of
            flooring it, as :func:`~attnblocks.blocks.se_hidden_channels` describes.
        round_limit: with ``divisor``: the share of the exact width it may not fall below.
        activation: :math:`\delta` of the MLP (ReLU in the paper).
        gate: :math:`\sigma` of both steps (sigmoid in the paper).
        bias: whether the MLP's layers have biases (the spatial convolution has one
            unless ``spatial_norm``).
        spatial_kernel_size: odd size of the spatial convolution (7 in the paper, which
            also tries 3).
        spatial_norm: a ``BatchNorm2d(1)`` after the spatial convolution, which then has
            no bias, as in the authors' code and timm (with ``bias=False``, timm's
            ``CbamModule`` exactly). Its running statistics make the spatial step
            stateful, so in training it runs through PyTorch's autograd instead of the
            fused node, and needs more than one position per batch. Not available with
            ``init="identity"``.
        init: ``"default"`` (PyTorch's initialisation) or ``"identity"``.

    Shape:
        - Input: :math:`(N, C, H, W)`, any floating dtype, contiguous or channels_last.
        - Output: same shape, dtype and memory format as the input.

    The channel gate :math:`M_c` (shape :math:`(N, C)`) goes to the gate hooks and
    :meth:`excitation`; the spatial map :math:`M_s` (shape :math:`(N, 1, H, W)`) goes
    to the map hooks (``has_spatial_map`` is True) and :meth:`spatial_map`.

    Example:
        >>> import torch
        >>> from attnblocks import CBAMBlock
        >>> cbam = CBAMBlock(256, reduction=16)
        >>> sum(p.numel() for p in cbam.parameters())  # 2*256*16 + 16 + 256 + 2*7*7 + 1
        8563
        >>> x = torch.randn(2, 256, 14, 14)
        >>> cbam(x).shape
        torch.Size([2, 256, 14, 14])
        >>> cbam.excitation(x).shape, cbam.spatial_map(x).shape
        (torch.Size([2, 256]), torch.Size([2, 1, 14, 14]))
        >>> torch.equal(CBAMBlock(256, init="identity")(x), x)
        True
    """

    init_modes = ("default", "identity")
    has_spatial_map = True
    spatial_dims: tuple[int, ...] = (2,)
    spatial_dims_reason = "its spatial attention is a 2D convolution"
    #: Whether ``forward`` may run the channel gate as the fused channel-gating node, and
    #: the spatial step as the fused spatial node (``_spatial_gate``), when there is a
    #: backward pass (as :attr:`SEBlock.fast_path <attnblocks.SEBlock.fast_path>`).
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
        spatial_kernel_size: int = 7,
        spatial_norm: bool = False,
        init: Literal["default", "identity"] = "default",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.reduction, self.hidden_channels = hidden_width(
            self.channels, reduction, hidden_channels, divisor, round_limit, owner=owner
        )
        check_bool(bias, "bias", owner=owner)
        spatial_norm = check_bool(spatial_norm, "spatial_norm", owner=owner)
        self.spatial_kernel_size = check_positive_int(
            spatial_kernel_size, "spatial_kernel_size", owner=owner
        )
        if self.spatial_kernel_size % 2 == 0:
            raise InvalidArgumentError(
                f"{owner}: spatial_kernel_size must be odd (the map keeps its size), "
                f"got {spatial_kernel_size}."
            )
        self.init = self._check_init(init, bias=bias)
        if self.init == "identity" and spatial_norm:
            raise InvalidArgumentError(
                f"{owner}: init='identity' is not available with spatial_norm=True: the "
                "BatchNorm's input would be constant, so its weight would get no gradient "
                "(and the convolution's a 1/sqrt(eps) one); use spatial_norm=False (the "
                "paper's convolution with a bias) for an identity start."
            )
        self.fc1 = nn.Linear(self.channels, self.hidden_channels, bias=bias)
        self.act = make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
        self.fc2 = nn.Linear(self.hidden_channels, self.channels, bias=bias)
        k = self.spatial_kernel_size
        self.spatial_norm: nn.BatchNorm2d | None = None
        if spatial_norm:
            # the authors' code and timm: convolution without bias, then a BatchNorm
            self.spatial_conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
            self.spatial_norm = nn.BatchNorm2d(1)
        else:
            self.spatial_conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=True)
        self.gate = make_layer(gate, GATES, arg="gate", owner=owner)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters according to ``self.init``."""
        for layer in (self.fc1, self.fc2, self.spatial_conv, self.spatial_norm):
            if layer is not None:
                layer.reset_parameters()
        self._init_gates(mlp=(self.fc1, self.act, self.fc2), zero=(self.spatial_conv,))

    def _mlp(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(z)))

    def _channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.fc1.weight.dtype
        avg = to_dtype(global_avg_pool(x), weight_dtype)
        mx = to_dtype(global_max_pool(x), weight_dtype)
        return self._scale(self.gate(self._mlp(avg) + self._mlp(mx)))

    def _spatial_gate(self, refined: torch.Tensor) -> torch.Tensor:
        return self._spatial_gate_of(*channel_pools(refined))

    def _spatial_gate_of(self, avg: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
        """:math:`M_s` from the channel pools of :func:`channel_pools` (both paths call it)."""
        maps = torch.cat([avg, maximum.to(avg.dtype)], dim=1)
        maps = to_dtype(maps, self.spatial_conv.weight.dtype)
        # with no positions there is nothing to convolve: an empty (N, 1, H, W) map
        logits = maps[:, :1] if has_zero_extent(maps) else self.spatial_conv(maps)
        norm = self.spatial_norm
        if norm is not None:
            # in training: an empty batch has no statistics (skipped, nothing moves) and
            # one position too few (BatchNorm's own error, said here with the way out)
            positions = logits.numel() if norm.training else 2
            if positions == 1:
                raise InvalidInputError(
                    f"{type(self).__name__}(spatial_norm=True) in training needs more than "
                    "one position in the batch for its BatchNorm's statistics, got a "
                    f"batch of 1 with a {'x'.join(map(str, logits.shape[2:]))} map; use "
                    "a larger batch or map, or eval mode."
                )
            if positions > 0:
                logits = norm(logits)
        return self._scale(self.gate(logits))

    def _spatial_gate_spec(self) -> SpatialGate | None:
        """The spatial gate as the fused node computes it, or ``None`` (a replaced layer)."""
        conv = self.spatial_conv
        if type(conv) is not nn.Conv2d:
            return None
        # a BatchNorm holds buffers: try_spatial_fused leaves such a gate to autograd
        norm = () if self.spatial_norm is None else (self.spatial_norm,)
        return SpatialGate(
            fn=self._spatial_gate_of, params=tuple(conv.parameters()), modules=(self.gate, *norm)
        )

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """Return the channel gate :math:`M_c(x)` of shape :math:`(N, C)`."""
        self._check_input(x)
        return self._channel_gate(x)

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the spatial gate :math:`M_s(F')` of shape :math:`(N, 1, H, W)`.

        It is computed, as in ``forward``, on :math:`F' = M_c(x) \\otimes x`.
        """
        self._check_input(x)
        return self._spatial_gate(x * per_channel(self._channel_gate(x), x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the channel gate, then the spatial gate (eq. 1)."""
        self._check_input(x)
        refined = self._fused_forward(x)
        if refined is None:
            refined = self._apply_gate(x, self._channel_gate(x))
        fused = try_spatial_fused(self, refined)
        if fused is not None:
            out, spatial = fused
        else:
            spatial = self._spatial_gate(refined)
            out = refined * spatial.to(x.dtype)
        self._emit_map(spatial)
        return match_memory_format(out, x)

    def _pooled_gate(self, x: torch.Tensor) -> PooledGate | None:
        """The channel gate as the fused node computes it (``None``: call the submodules)."""
        modules = self._modules
        params = linear_params(modules["fc1"], modules["fc2"])
        if params is None:
            return None
        act, gate, scale = modules["act"], modules["gate"], self.gate_scale

        def fn(avg: torch.Tensor, mx: torch.Tensor, *weights: torch.Tensor | None) -> torch.Tensor:
            both = linear_mlp(avg, act, weights) + linear_mlp(mx, act, weights)  # type: ignore[arg-type]
            return scale_gate(gate(both), scale)  # type: ignore[misc]

        return PooledGate(fn, params, modules=(act, gate), max_pool=True)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"spatial_kernel_size={self.spatial_kernel_size}, gate_scale={self.gate_scale}"
            + (", spatial_norm=True" if self.spatial_norm is not None else "")
        )
