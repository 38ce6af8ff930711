"""SimAM: a simple, parameter-free attention module.

Paper: Lingxiao Yang, Ru-Yuan Zhang, Lida Li, Xiaohua Xie, "SimAM: A Simple,
Parameter-Free Attention Module for Convolutional Neural Networks", ICML 2021 (PMLR
139:11863-11874), https://proceedings.mlr.press/v139/yang21o.html (the paper has no
arXiv version).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from attnblocks._validation import check_positive_number
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._ops import accumulation_dtype, match_memory_format, spatial_dims_of
from attnblocks.blocks._registry import register_block

__all__ = ["SimAMBlock"]

_NO_IDENTITY = (
    "the block has no parameters and its weights sigmoid(1/E) lie in [sigmoid(1/2), 1], "
    "so it never passes its input through unchanged."
)


@register_block("simam")
class SimAMBlock(AttentionBlock):
    r"""SimAM, parameter-free 3D attention (Yang et al., ICML 2021, PMLR 139:11863-11874).

    Each activation :math:`t` of channel :math:`c` is weighted by how much it stands
    out from the other :math:`M - 1` activations of its channel (:math:`M` the number
    of spatial positions). The minimal energy of the paper's eq. 16,

    .. math::
        e_t^* = \frac{4(\hat\sigma^2 + \lambda)}{(t - \hat\mu)^2 + 2\hat\sigma^2 + 2\lambda},

    with :math:`\hat\mu` the channel's spatial mean and :math:`\hat\sigma^2 = \frac{1}{M-1}
    \sum_i (x_i - \hat\mu)^2`, gives the output (eq. 17)
    :math:`\tilde{X} = \text{sigmoid}(1/E) \odot X`. The block has no parameters.

    For a single spatial position (:math:`M = 1`) there are no other neurons, so
    :math:`\hat\sigma^2` is taken as 0; the formula then gives :math:`1/e^* = 1/2` and
    the output is :math:`\text{sigmoid}(1/2) \cdot x`, the limit of the formula, not a
    division by zero. For half types the block computes in float32 and rounds once.

    Identity init is not available: the block has no parameters, and
    :math:`\text{sigmoid}(1/e^*) \le 1` with :math:`1/e^* \ge 1/2` means it never passes
    its input through unchanged.

    The block has no channel gate (``has_channel_gate`` is False and the gate hooks
    are never called). Its spatial map is the element-wise weights
    :math:`\text{sigmoid}(1/E)`, shape :math:`(N, C, *)`: they go to the map hooks
    (``has_spatial_map`` is True) and :meth:`attention_map` (alias
    :meth:`spatial_map`) returns them.

    Args:
        channels: :math:`C`, the number of input (and output) channels, checked on
            every call.
        lambda_: :math:`\lambda > 0`, the regulariser of the energy (``1e-4`` in the
            paper).
        init: ``"default"`` only; accepted so that every block takes ``init=``.

    Shape:
        - Input: :math:`(N, C, *)` with 1 to 3 spatial dimensions, any floating dtype,
          contiguous or channels_last.
        - Output: same shape, dtype and memory format as the input.

    Example:
        >>> import torch
        >>> from attnblocks import SimAMBlock
        >>> simam = SimAMBlock(64)
        >>> sum(p.numel() for p in simam.parameters())
        0
        >>> x = torch.randn(2, 64, 16, 16)
        >>> simam(x).shape
        torch.Size([2, 64, 16, 16])
        >>> bool(((simam.attention_map(x) > 0.5) & (simam.attention_map(x) <= 1)).all())
        True
    """

    identity_init_unavailable = _NO_IDENTITY
    has_channel_gate = False
    has_spatial_map = True

    def __init__(
        self, channels: int, *, lambda_: float = 1e-4, init: Literal["default"] = "default"
    ) -> None:
        super().__init__(channels)
        self.lambda_ = check_positive_number(lambda_, "lambda_", owner=type(self).__name__)
        self.init = self._check_init(init)

    def _attention(self, xf: torch.Tensor) -> torch.Tensor:
        """``sigmoid(1/E)`` for ``xf``, already in the accumulation dtype."""
        dims = spatial_dims_of(xf)
        neighbours = max(math.prod(xf.shape[2:]) - 1, 1)
        deviation = (xf - xf.mean(dim=dims, keepdim=True)).square()
        variance = deviation.sum(dim=dims, keepdim=True) / neighbours
        inverse_energy = deviation / (4 * (variance + self.lambda_)) + 0.5
        return torch.sigmoid(inverse_energy)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        r"""Return :math:`\text{sigmoid}(1/E)`, the weight of every activation.

        Returns:
            A tensor shaped like ``x``, in float32 for half inputs (else in ``x``'s
            dtype), with values in :math:`[\text{sigmoid}(1/2), 1]`.
        """
        self._check_input(x)
        return self._attention(x.to(accumulation_dtype(x.dtype)))

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`attention_map`, under the name every spatial block shares."""
        return self.attention_map(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weight every activation of ``x`` by :math:`\\text{sigmoid}(1/e_t^*)`."""
        self._check_input(x)
        xf = x.to(accumulation_dtype(x.dtype))  # a float32 copy for half types only
        weights = self._attention(xf)
        self._emit_map(weights)
        return match_memory_format((xf * weights).to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, lambda_={self.lambda_}"
