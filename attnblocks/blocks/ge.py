"""Gather-Excite (GE) block.

Paper: Jie Hu, Li Shen, Samuel Albanie, Gang Sun, Andrea Vedaldi, "Gather-Excite:
Exploiting Feature Context in Convolutional Neural Networks", NeurIPS 2018,
https://arxiv.org/abs/1810.12348
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_bool, check_choice, check_positive_int
from attnblocks.blocks._base import AttentionBlock
from attnblocks.blocks._fused_gate import PooledGate
from attnblocks.blocks._layers import ACTIVATIONS, GATES, LayerSpec, make_layer
from attnblocks.blocks._ops import (
    accumulation_dtype,
    global_avg_pool,
    match_memory_format,
    to_dtype,
)
from attnblocks.blocks._options import hidden_width
from attnblocks.blocks._registry import register_block

__all__ = ["GatherExciteBlock"]

Variant = Literal["theta_minus", "theta", "theta_plus"]
_VARIANTS: tuple[str, ...] = ("theta_minus", "theta", "theta_plus")
_NO_IDENTITY = (
    "GE-theta-minus has no parameters and its gate sigmoid(gathered context) is not "
    "exactly 1 for every input; in the parametric variants a gate equal to 1 for every "
    "input makes the input of the gather's last BatchNorm constant, which training-mode "
    "BatchNorm normalises to 0, so that BatchNorm's weight would get no gradient."
)
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register_block("ge")
class GatherExciteBlock(AttentionBlock):
    r"""Gather-Excite (Hu et al., NeurIPS 2018, arXiv:1810.12348).

    A **gather** operator :math:`\xi_G` aggregates each channel over a spatial extent;
    an **excite** operator redistributes it: :math:`y = x \odot \sigma(\text{interp}(
    \xi_G(x)))`, with :math:`\text{interp}` nearest-neighbour upsampling back to the
    input size. Three variants of the paper (``variant``):

    * ``"theta_minus"`` (GE-:math:`\theta^-`, the default): parameter-free; the gather
      is average pooling. With ``extent=None`` (global extent) the block is a channel
      gate :math:`\sigma(\text{mean}_{\text{spatial}}(x_c))`; with ``extent=e`` it
      averages non-overlapping windows of :math:`e` positions per axis (stride
      :math:`e`, windows clipped at the border, so the gathered map has
      :math:`\lceil H/e \rceil` rows) and each position is excited by the window it
      fell in. Any spatial rank from 1 to 3. Some implementations use overlapping
      windows of size :math:`2e - 1` instead.
    * ``"theta"`` (GE-:math:`\theta`): the gather is learned. With ``extent=e`` (a power
      of two) it is :math:`\log_2 e` depthwise :math:`3 \times 3` convolutions of stride
      2, each followed by BatchNorm, with ``activation`` between them; with
      ``extent=None`` (global) it is one depthwise convolution whose kernel covers the
      whole map, which needs the map size up front (``spatial_size``), followed by
      BatchNorm. 2D only. Parameters: :math:`\log_2 e \cdot (9C + 2C)`, or
      :math:`HWC + 2C` for global extent.
    * ``"theta_plus"`` (GE-:math:`\theta^+`): GE-:math:`\theta` followed by an SE-style
      MLP of :math:`1 \times 1` convolutions (:math:`C \to C/r \to C`, ``activation``
      between) before the gate: :math:`2C^2/r + C/r + C` more parameters with biases.

    Average pooling accumulates in float32 for half types; the learned gather runs in
    the parameters' dtype. The parametric variants use BatchNorm, so in training mode
    the output depends on the rest of the batch, and a batch of one with a one-cell
    gathered map is refused (BatchNorm needs more than one value per channel).

    Identity init is not available: GE-:math:`\theta^-` has no parameters and
    :math:`\sigma(\cdot)` of its context is not exactly 1 for every input. In the
    parametric variants a gate equal to 1 for every input makes the input of the
    gather's last BatchNorm constant, which training-mode BatchNorm normalises to 0,
    so that BatchNorm's weight would get no gradient.

    With global extent the block is a channel gate (``has_channel_gate`` is True and
    the :math:`(N, C)` gate goes to the gate hooks); with a local extent its gate
    varies over space: ``has_channel_gate`` is False, ``has_spatial_map`` is True, and
    the full gate, :math:`(N, C, *)` after the nearest-neighbour excite, goes to the
    map hooks and is returned by :meth:`excitation` and :meth:`spatial_map`.

    Args:
        channels: :math:`C`, the number of input (and output) channels.
        variant: ``"theta_minus"``, ``"theta"`` or ``"theta_plus"``.
        extent: the extent ratio :math:`e`, or ``None`` for global extent (the paper's
            best setting). Any positive int for ``"theta_minus"``, a power of two >= 2
            for the parametric variants.
        spatial_size: ``(H, W)`` (or one int for a square map) of the inputs; needed
            by, and only accepted by, the parametric variants with global extent.
        reduction: :math:`r` of GE-:math:`\theta^+`'s MLP; the hidden width is
            ``max(1, floor(C / r))``. Other variants ignore it, like
            ``hidden_channels``, so that the same options can build any block.
        hidden_channels: explicit hidden width of GE-:math:`\theta^+`'s MLP.
        divisor: round ``channels / reduction`` to a multiple of ``divisor`` instead of
            flooring it, as :func:`~attnblocks.blocks.se_hidden_channels` describes.
        round_limit: with ``divisor``: the share of the exact width it may not fall below.
        activation: the non-linearity between the gather convolutions and inside the
            MLP (ReLU); checked, but unused, by ``"theta_minus"``.
        gate: :math:`\sigma` (sigmoid in the paper).
        bias: whether GE-:math:`\theta^+`'s MLP has biases (the gather convolutions,
            followed by BatchNorm, have none).
        init: ``"default"`` only (PyTorch's initialisation).

    Shape:
        - Input: :math:`(N, C, *)`, 1 to 3 spatial dimensions for ``"theta_minus"``,
          :math:`(N, C, H, W)` for the parametric variants; any floating dtype,
          contiguous or channels_last.
        - Output: same shape, dtype and memory format as the input.

    Example:
        >>> import torch
        >>> from attnblocks import GatherExciteBlock
        >>> x = torch.randn(2, 64, 16, 16)
        >>> ge = GatherExciteBlock(64)  # GE-theta-minus, global extent: no parameters
        >>> torch.allclose(ge(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True)))
        True
        >>> GatherExciteBlock(64, extent=4).excitation(x).shape
        torch.Size([2, 64, 16, 16])
        >>> ge8 = GatherExciteBlock(64, variant="theta", extent=8)
        >>> sum(p.numel() for p in ge8.parameters())  # 3 * (9 * 64 + 2 * 64)
        2112
        >>> ge8(x).shape
        torch.Size([2, 64, 16, 16])
    """

    identity_init_unavailable = _NO_IDENTITY
    #: The numbers of spatial dimensions the block accepts (set per instance).
    spatial_dims: tuple[int, ...] = (1, 2, 3)
    spatial_dims_reason = "its learned gather is made of 2D depthwise convolutions"

    #: Whether ``forward`` may use the fused channel-gating node (GE-theta-minus with
    #: global extent, with a backward pass; as :attr:`SEBlock.fast_path
    #: <attnblocks.SEBlock.fast_path>`).
    fast_path: bool = True

    def __init__(
        self,
        channels: int,
        *,
        variant: Variant = "theta_minus",
        extent: int | None = None,
        spatial_size: int | Sequence[int] | None = None,
        reduction: float = 16,
        hidden_channels: int | None = None,
        divisor: int | None = None,
        round_limit: float = 0.0,
        activation: LayerSpec = "relu",
        gate: LayerSpec = "sigmoid",
        bias: bool = True,
        init: Literal["default"] = "default",
    ) -> None:
        super().__init__(channels)
        owner = type(self).__name__
        self.variant: str = check_choice(variant, "variant", _VARIANTS, owner=owner)
        parametric = self.variant != "theta_minus"
        self.extent = None if extent is None else check_positive_int(extent, "extent", owner=owner)
        if (
            parametric
            and self.extent is not None
            and (self.extent < 2 or self.extent & (self.extent - 1))
        ):
            raise InvalidArgumentError(
                f"{owner}: variant={self.variant!r} gathers with stride-2 convolutions, so "
                f"extent must be a power of two >= 2 (or None for global extent), got {extent}."
            )
        self.spatial_size = self._check_spatial_size(spatial_size, parametric, owner)
        self.reduction, self.hidden_channels = hidden_width(
            self.channels, reduction, hidden_channels, divisor, round_limit, owner=owner
        )
        check_bool(bias, "bias", owner=owner)
        self.init = self._check_init(init)
        # Per instance: a global gather gives a channel gate, a local one a spatial gate.
        self.has_channel_gate = self.extent is None
        self.has_spatial_map = self.extent is not None
        self.spatial_dims = (2,) if parametric else (1, 2, 3)

        self.gather: nn.Sequential | None = None
        self.mlp: nn.Sequential | None = None
        # Checked in every variant (GE-theta-minus does not use it), like reduction, so
        # that a typo is never silently ignored.
        make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
        if parametric:
            self.gather = self._build_gather(activation, owner)
        if self.variant == "theta_plus":
            self.mlp = nn.Sequential(
                nn.Conv2d(self.channels, self.hidden_channels, 1, bias=bias),
                make_layer(activation, ACTIVATIONS, arg="activation", owner=owner),
                nn.Conv2d(self.hidden_channels, self.channels, 1, bias=bias),
            )
        self.gate = make_layer(gate, GATES, arg="gate", owner=owner)
        self.gate_scale = 1.0

    def _check_spatial_size(
        self, spatial_size: object, parametric: bool, owner: str
    ) -> tuple[int, int] | None:
        needed = parametric and self.extent is None
        if spatial_size is None:
            if needed:
                raise InvalidArgumentError(
                    f"{owner}: variant={self.variant!r} with global extent (extent=None) "
                    "gathers with a depthwise convolution as large as the feature map, so it "
                    "needs spatial_size=(H, W); pass it, or a power-of-two extent."
                )
            return None
        if not needed:
            raise InvalidArgumentError(
                f"{owner}: spatial_size is only used by the parametric variants with global "
                f"extent; got spatial_size={spatial_size!r} with variant={self.variant!r}, "
                f"extent={self.extent!r}."
            )
        if isinstance(spatial_size, Sequence) and not isinstance(spatial_size, str):
            sizes = tuple(spatial_size)
        else:
            sizes = (spatial_size, spatial_size)
        if len(sizes) != 2:
            raise InvalidArgumentError(
                f"{owner}: spatial_size must be an int or a pair (H, W), got {spatial_size!r}."
            )
        height = check_positive_int(sizes[0], "spatial_size[0]", owner=owner)
        width = check_positive_int(sizes[1], "spatial_size[1]", owner=owner)
        return height, width

    def _build_gather(self, activation: LayerSpec, owner: str) -> nn.Sequential:
        c = self.channels
        gather = nn.Sequential()
        if self.extent is None:
            kernel = self.spatial_size or (1, 1)  # always set here: see _check_spatial_size
            gather.add_module("conv1", nn.Conv2d(c, c, kernel, groups=c, bias=False))
            gather.add_module("norm1", nn.BatchNorm2d(c))
            return gather
        steps = int(math.log2(self.extent))
        for i in range(1, steps + 1):
            conv = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False)
            gather.add_module(f"conv{i}", conv)
            gather.add_module(f"norm{i}", nn.BatchNorm2d(c))
            if i < steps:
                act = make_layer(activation, ACTIVATIONS, arg="activation", owner=owner)
                gather.add_module(f"act{i}", act)
        return gather

    def reset_parameters(self) -> None:
        """(Re)initialise the parameters and BatchNorm statistics."""
        for module in self.modules():
            if module is not self and isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                module.reset_parameters()

    def _check_input(self, x: torch.Tensor) -> None:
        super()._check_input(x)
        owner = type(self).__name__
        if self.spatial_size is not None and tuple(x.shape[2:]) != self.spatial_size:
            raise InvalidInputError(
                f"{owner} was built for {self.spatial_size[0]}x{self.spatial_size[1]} maps "
                f"(spatial_size, for its global depthwise gather) but got a tensor of shape "
                f"{tuple(x.shape)}."
            )
        if self.gather is not None and self.training:
            cells = x.shape[0] * math.prod(self._gathered_size(tuple(x.shape[2:])))
            if cells == 1:
                raise InvalidInputError(
                    f"{owner} (variant={self.variant!r}) uses BatchNorm, which needs more "
                    f"than one value per channel in training mode; a batch of shape "
                    f"{tuple(x.shape)} gathers to a single cell. Use a larger batch or eval()."
                )

    def _gathered_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        if self.extent is None:
            return (1,) * len(size)
        return tuple(-(-s // self.extent) for s in size)

    def _gathered_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate at the gathered resolution: ``(N, C)`` if global, else ``(N, C, *g)``."""
        if x.numel() == 0 and (self.extent is not None or self.gather is not None):
            # No positions (or no samples): nothing to gather, an empty gate. Pooling and
            # the gather's convolutions refuse empty maps, and BatchNorm must not count
            # an empty batch. (A global mean over no positions is NaN, as for SE.)
            dtype = accumulation_dtype(x.dtype)
            if self.gather is not None:
                dtype = next(self.parameters()).dtype
            cells = self._gathered_size(tuple(x.shape[2:]))
            shape = x.shape[:2] if self.extent is None else (*x.shape[:2], *cells)
            return self.gate(x.new_empty(shape, dtype=dtype))
        if self.gather is None:
            if self.extent is None:
                context = global_avg_pool(x)
            else:
                kernel = [min(self.extent, s) for s in x.shape[2:]]
                context = _AVG_POOL[x.dim() - 2](
                    x.to(accumulation_dtype(x.dtype)), kernel, self.extent, ceil_mode=True
                )
            return self.gate(context)
        weight = next(self.gather.parameters())
        context = self.gather(to_dtype(x, weight.dtype))
        if self.mlp is not None:
            context = self.mlp(context)
        if self.extent is None:
            context = context.flatten(1)
        return self.gate(context)

    @staticmethod
    def _upsample(gate: torch.Tensor, extent: int, size: torch.Size) -> torch.Tensor:
        # Nearest-neighbour excite: each position takes the value of the cell it was
        # gathered from (cell i covers positions i*e .. i*e + e - 1).
        for dim, length in enumerate(size, start=2):
            gate = gate.repeat_interleave(extent, dim=dim).narrow(dim, 0, length)
        return gate

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        r"""Return the gate the block applies to ``x``.

        Returns:
            :math:`(N, C)` for global extent; :math:`(N, C, *)` (the size of ``x``,
            after the nearest-neighbour excite) for a local extent.
        """
        self._check_input(x)
        gate = self._gathered_gate(x)
        if self.extent is None:
            return gate
        return self._upsample(gate, self.extent, x.shape[2:])

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the full gate :math:`(N, C, *)` of a local extent (as :meth:`excitation`).

        Raises:
            InvalidArgumentError: with global extent, whose gate is one value per
                channel (``has_spatial_map`` is False): read :meth:`excitation` instead.
        """
        if self.extent is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} with global extent (extent=None) has no spatial "
                "map: its gate is one value per channel (has_spatial_map is False); read "
                "excitation(x), or build the block with a local extent, e.g. extent=4."
            )
        return self.excitation(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gather context, excite ``x`` with it."""
        self._check_input(x)
        fused = self._fused_forward(x)
        if fused is not None:
            return fused
        gate = self._gathered_gate(x)
        if self.extent is None:
            return match_memory_format(self._apply_gate(x, gate), x)
        if self.has_map_hooks:
            gate = self._upsample(gate, self.extent, x.shape[2:])
            self._emit_map(gate)
            gate = gate.to(x.dtype)
        else:
            gate = self._upsample(gate.to(x.dtype), self.extent, x.shape[2:])
        return match_memory_format(x * gate, x)

    def _pooled_gate(self, x: torch.Tensor) -> PooledGate | None:
        """GE-theta-minus with global extent for the fused node (``None`` otherwise)."""
        if self.gather is not None or self.extent is not None:
            return None
        gate = self._modules["gate"]
        return PooledGate(gate, (), modules=(gate,))  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        extent = "global" if self.extent is None else self.extent
        size = "" if self.spatial_size is None else f", spatial_size={self.spatial_size}"
        return f"channels={self.channels}, variant={self.variant!r}, extent={extent}{size}"
