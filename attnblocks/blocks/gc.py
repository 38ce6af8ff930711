"""Global Context (GC) block.

Paper: Yue Cao, Jiarui Xu, Stephen Lin, Fangyun Wei, Han Hu, "GCNet: Non-local Networks
Meet Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019,
https://arxiv.org/abs/1904.11492
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError
from attnblocks._validation import check_bool, check_choice
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._identity import zero_layer_
from attnblocks.blocks._layers import ACTIVATIONS, GATES, LayerSpec, make_layer
from attnblocks.blocks._ops import (
    accumulation_dtype,
    channel_projection,
    match_memory_format,
    per_channel,
    to_dtype,
)
from attnblocks.blocks._options import hidden_width
from attnblocks.blocks._registry import register_block

__all__ = ["GlobalContextBlock"]

_FUSIONS = ("add", "mul")
_NO_IDENTITY = (
    "the context reaches the output only through the transform, so an output equal to "
    "the input for every input needs a transform that is constant, whose gradient with "
    "respect to the context-modelling weights is then exactly 0. init='zero_last' (the "
    "authors' initialisation) starts fusion='add' as an exact identity, but only the last "
    "layer learns at the first step."
)


@register_block("gc")
class GlobalContextBlock(AttentionBlock):
    r"""Global Context block (Cao et al., ICCV Workshops 2019, arXiv:1904.11492).

    A simplified non-local block that shares one attention map between all query
    positions, followed by an SE-like transform (eq. 3):

    * **context modelling**: :math:`\alpha_j = \text{softmax}_j(W_k x_j)` over all spatial
      positions :math:`j`, with :math:`W_k` a :math:`1 \times 1` convolution from
      :math:`C` channels to one, and the context :math:`c = \sum_j \alpha_j x_j`
      (attention pooling, in float32 for half types). :math:`W_k` has no bias: the
      softmax is invariant to adding a constant, so a bias would never receive
      gradient (the authors' code has one; it is dead weight);
    * **transform**: :math:`t = W_{v2}\,\text{ReLU}(\text{LN}(W_{v1} c))`, a bottleneck
      :math:`C \to C/r \to C` with LayerNorm over the :math:`C/r` hidden units;
    * **fusion**: ``"add"`` (the paper's default), :math:`y = x + t`, broadcast over
      space; or ``"mul"``, :math:`y = x \odot \sigma(t)`.

    Parameters: :math:`C` (:math:`W_k`) + :math:`2 C h + 3 h + C` (the transform with
    biases and LayerNorm's affine), :math:`h = \max(2, \lfloor C/r \rfloor)`: at least
    2 because LayerNorm over a single unit is constant and would cut the gradient.

    Identity init is not available: the context reaches the output only through the
    transform, so an output equal to the input for every input needs a constant
    transform, whose gradient with respect to the context-modelling weights is then
    exactly 0. ``init="zero_last"`` reproduces the authors' initialisation (the last
    layer of the transform at 0): with ``fusion="add"`` the block then starts as an
    exact identity, but only that last layer learns at the first step.

    With ``fusion="mul"`` the block is a channel gate (``has_channel_gate`` is True and
    the :math:`(N, C)` gate :math:`\sigma(t)` goes to the gate hooks and
    :meth:`excitation`); with ``"add"``
    it adds a vector, has no gate and never calls the gate hooks. :meth:`fusion_term`
    returns :math:`t` (``"add"``) or :math:`\sigma(t)` (``"mul"``). The spatial map is
    the attention map :math:`\alpha`, shape :math:`(N, 1, *)`, summing to 1 over the
    positions of each sample: it tells *where* the context is pooled from (it does
    not multiply the input). It goes to the map hooks (``has_spatial_map`` is True,
    for both fusions) and :meth:`context_weights` (alias :meth:`spatial_map`) returns
    it.

    Args:
        channels: :math:`C`, the number of input (and output) channels.
        reduction: :math:`r` of the transform's bottleneck (16 in the paper).
        hidden_channels: explicit bottleneck width (at least 2), overriding ``reduction``.
        divisor: round ``channels / reduction`` to a multiple of ``divisor`` instead of
            flooring it, as :func:`~attnblocks.blocks.se_hidden_channels` describes.
        round_limit: with ``divisor``: the share of the exact width it may not fall below.
        activation: the transform's non-linearity (ReLU in the paper).
        gate: :math:`\sigma` for ``fusion="mul"`` (sigmoid).
        bias: whether the transform's two layers have biases.
        fusion: ``"add"`` or ``"mul"``.
        init: ``"default"`` (PyTorch's initialisation) or ``"zero_last"``.

    Shape:
        - Input: :math:`(N, C, *)` with 1 to 3 spatial dimensions, any floating dtype,
          contiguous or channels_last.
        - Output: same shape, dtype and memory format as the input.

    Example:
        >>> import torch
        >>> from attnblocks import GlobalContextBlock
        >>> gc = GlobalContextBlock(256, reduction=16)
        >>> sum(p.numel() for p in gc.parameters())  # 256 + 2*256*16 + 3*16 + 256
        8752
        >>> x = torch.randn(2, 256, 14, 14)
        >>> gc(x).shape
        torch.Size([2, 256, 14, 14])
        >>> alpha = gc.context_weights(x)  # a softmax over the 14 * 14 positions
        >>> alpha.shape, torch.allclose(alpha.sum(dim=(2, 3)), torch.ones(2, 1))
        (torch.Size([2, 1, 14, 14]), True)
        >>> torch.equal(GlobalContextBlock(256, init="zero_last")(x), x)
        True
    """

    identity_init_unavailable = _NO_IDENTITY
    init_modes = ("default", "zero_last")
    has_channel_gate = False
    has_spatial_map = True

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
        fusion: Literal["add", "mul"] = "add",
        init: Literal["default", "zero_last"] = "default",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.reduction, self.hidden_channels = hidden_width(
            self.channels, reduction, hidden_channels, divisor, round_limit, owner=owner, minimum=2
        )
        check_bool(bias, "bias", owner=owner)
        self.fusion = check_choice(fusion, "fusion", _FUSIONS, owner=owner)
        self.init = self._check_init(init)
        # Per instance: only multiplicative fusion applies a channel gate.
        self.has_channel_gate = self.fusion == "mul"
        h = self.hidden_channels
        #: :math:`W_k`, the 1x1 convolution giving the attention logits, as a
        #: ``(1, C)`` linear map so that it serves every spatial rank.
        self.context_mask = nn.Linear(self.channels, 1, bias=False)
        self.fc1 = nn.Linear(self.channels, h, bias=bias)
        self.norm = nn.LayerNorm(h)
        self.act = make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
        self.fc2 = nn.Linear(h, self.channels, bias=bias)
        self.gate = make_layer(gate, GATES, arg="gate", owner=owner)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters according to ``self.init``."""
        for layer in (self.context_mask, self.fc1, self.norm, self.fc2):
            layer.reset_parameters()
        if self.init == "zero_last":
            zero_layer_(self.fc2)

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        logits = channel_projection(x, self.context_mask.weight)  # (N, 1, *spatial)
        flat = logits.flatten(1).to(accumulation_dtype(x.dtype))
        return flat.softmax(dim=1).view(logits.shape)

    def _term(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # c_n = sum_j alpha_nj x_nj, with the spatial positions j flattened.
        context = torch.einsum("ncj,nj->nc", x.flatten(2).to(weights.dtype), weights.flatten(1))
        context = to_dtype(context, self.fc1.weight.dtype)
        term = self.fc2(self.act(self.norm(self.fc1(context))))
        return self.gate(term) if self.fusion == "mul" else term

    def context_weights(self, x: torch.Tensor) -> torch.Tensor:
        r"""Return the attention map :math:`\alpha`, shape :math:`(N, 1, *)`, summing to 1."""
        self._check_input(x)
        return self._weights(x)

    def fusion_term(self, x: torch.Tensor) -> torch.Tensor:
        r"""Return the :math:`(N, C)` term fused into ``x``: :math:`t` or :math:`\sigma(t)`."""
        self._check_input(x)
        return self._term(x, self._weights(x))

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        r"""Return the :math:`(N, C)` channel gate :math:`\sigma(t)` of ``fusion="mul"``.

        Raises:
            InvalidArgumentError: with ``fusion="add"``, which adds :math:`t` instead of
                gating (``has_channel_gate`` is False): read :meth:`fusion_term`.
        """
        if self.fusion != "mul":
            raise InvalidArgumentError(
                f"{type(self).__name__} with fusion={self.fusion!r} has no channel gate: it "
                "adds the transformed context t to every position (has_channel_gate is "
                "False); read fusion_term(x), or build the block with fusion='mul'."
            )
        return self.fusion_term(x)

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`context_weights`, under the name every spatial block shares."""
        return self.context_weights(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the global context, transform it and fuse it into every position."""
        self._check_input(x)
        weights = self._weights(x)
        self._emit_map(weights)
        term = self._term(x, weights)
        out = self._apply_gate(x, term) if self.fusion == "mul" else x + per_channel(term, x)
        return match_memory_format(out, x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
            f"fusion={self.fusion!r}"
        )
