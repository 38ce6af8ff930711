"""The base class shared by every attention block: constructor contract, input check,
gate scaling, the fused path, gate and map hooks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnblocks._errors import InvalidInputError
from attnblocks._validation import check_positive_int
from attnblocks.blocks._fused_gate import try_fused
from attnblocks.blocks._identity import (
    identity_gate_scale,
    require_bias,
    zero_layer_,
    zero_output_mlp_,
)
from attnblocks.blocks._ops import check_block_input, per_channel, scale_gate
from attnblocks.blocks._options import check_init

if TYPE_CHECKING:
    from attnblocks.blocks._fused_gate import PooledGate

__all__ = ["AttentionBlock", "GateHook", "MapHook", "TransientHook"]


class _Unset:
    """The type of the default of :meth:`AttentionBlock.__init__`'s ``channels``: not passed."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()

#: A gate hook is called as ``hook(block, gate)`` with the block and the gate it
#: has just applied, detached: ``(N, C)`` for channel gates.
GateHook = Callable[[nn.Module, torch.Tensor], None]
#: A map hook is called as ``hook(block, attention_map)`` with the block and its
#: spatial attention map, detached: ``(N, 1, *spatial)`` for a map shared by all
#: channels, ``(N, C, *spatial)`` for a map per channel.
MapHook = Callable[[nn.Module, torch.Tensor], None]


def _inert_hook() -> _InertHook:
    return _InertHook()


class _InertHook:
    """What a copy or a pickle holds in place of a :class:`TransientHook`: does nothing."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[[], _InertHook], tuple[()]]:
        return _inert_hook, ()


class TransientHook:
    """Base class of the hooks that a temporary context (a recorder, a knockout) installs.

    They belong to the context, not to the model, so copies of the model never carry
    them: :class:`AttentionBlock` leaves them (and a knocked-out ``forward``) out of its
    ``deepcopy``, pickle and ``torch.save`` state, and where one sits on another
    module's own hook table (a forward hook of :func:`attnblocks.inspect.record_features`)
    the copy holds an inert hook in its place. A copy made inside the context is thus a
    normal, picklable model that feeds nothing, while the original keeps recording.
    """

    def __reduce__(self) -> tuple[Callable[[], _InertHook], tuple[()]]:
        return _inert_hook, ()


class AttentionBlock(nn.Module):
    """Base class of attnblocks' attention blocks.

    Every block takes its channel count as the first positional argument and
    everything else as keyword-only arguments, maps ``(N, C, *spatial)`` to a
    tensor of the same shape, dtype and memory format, and calls its gate hooks
    with the gate it applied, so tools such as :func:`attnblocks.inspect.record_gates`
    can read gates without recomputing them.

    Blocks whose attention varies over space (``has_spatial_map``) also call their
    map hooks with that spatial attention map, read by
    :func:`attnblocks.inspect.record_maps`, and return the same map from their
    ``spatial_map(x)`` method. The map has shape ``(N, 1, *spatial)`` when one map
    weights every channel (CBAM, scSE, Global Context) and ``(N, C, *spatial)`` when
    each channel has its own (SimAM, Coordinate Attention, Gather-Excite with a local
    extent); each block's docstring says what its map is.

    Subclasses pass their channel count to ``super().__init__(channels)`` (it is
    checked and stored as :attr:`channels`), validate ``init=`` with
    :meth:`_check_init` against :attr:`init_modes` (with :attr:`supports_identity_init`
    saying whether ``init="identity"`` is available), check their input with
    :meth:`_check_input` (:attr:`spatial_dims`), multiply their gates by
    :attr:`gate_scale` with :meth:`_scale`, call :meth:`_emit_gate` from ``forward``
    (:meth:`_apply_gate` does both for a channel gate), and, if they set
    ``has_spatial_map``, :meth:`_emit_map` (only when :attr:`has_map_hooks`, so that
    a map that costs memory is built only for the hooks). A block whose gate is a
    function of global pools describes it in :meth:`_pooled_gate` and tries
    :meth:`_fused_forward` first (see :mod:`attnblocks.blocks._fused_gate`).
    """

    #: Whether ``init="identity"`` makes the block an exact identity map (for a
    #: subclass that does not set it: whether :attr:`init_modes` has ``"identity"``).
    supports_identity_init: ClassVar[bool] = False
    #: For a block without identity init, one sentence saying why (quoted in errors).
    identity_init_unavailable: ClassVar[str] = ""
    #: Whether the block applies a per-(sample, channel) gate (some blocks decide
    #: per instance, so read it from the instance).
    has_channel_gate: bool = True
    #: Whether the block has a spatial attention map, passed to its map hooks and
    #: returned by ``spatial_map(x)`` (read it from the instance, as for
    #: :attr:`has_channel_gate`).
    has_spatial_map: bool = False
    #: The numbers of spatial dimensions the block accepts (1: Conv1d features, ...).
    spatial_dims: tuple[int, ...] = (1, 2, 3)
    #: For a block defined for one spatial rank only, a short clause saying why
    #: (quoted in the error for other ranks).
    spatial_dims_reason: ClassVar[str] = ""
    #: The values of ``init=`` the block accepts (``"identity"`` among them exactly
    #: when :attr:`supports_identity_init`).
    init_modes: ClassVar[tuple[str, ...]] = ("default",)
    #: The factor the block's gates are multiplied by: 1, or ``1 / gate(0)`` after
    #: ``init="identity"``.
    gate_scale: float = 1.0

    channels: int

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "supports_identity_init" not in vars(cls):
            cls.supports_identity_init = "identity" in cls.init_modes

    def __init__(self, channels: int | _Unset = _UNSET) -> None:
        super().__init__()
        self._gate_hooks: OrderedDict[int, GateHook] = OrderedDict()
        self._map_hooks: OrderedDict[int, MapHook] = OrderedDict()
        # Only a subclass that passes nothing sets ``channels`` itself; whatever a user
        # passed (None included) is checked, so ``SEBlock(None)`` is refused by name.
        if not isinstance(channels, _Unset):
            self.channels = check_positive_int(channels, "channels", owner=type(self).__name__)

    def _check_init(self, init: object, *, bias: bool = True) -> str:
        """Validate ``init=`` against :attr:`init_modes`; ``"identity"`` also needs ``bias``."""
        owner = type(self).__name__
        mode = check_init(
            init, self.init_modes, owner=owner, identity_unavailable=self.identity_init_unavailable
        )
        if mode == "identity":
            require_bias(bias, owner=owner)
        return mode

    def _init_gates(
        self,
        *,
        mlp: tuple[nn.Linear, nn.Module, nn.Linear] | None = None,
        zero: Sequence[nn.Module] = (),
        terms: int = 1,
    ) -> None:
        """Set :attr:`gate_scale` for ``self.init`` after the layers got PyTorch's initialisation.

        With ``init="identity"`` every pre-gate becomes exactly 0 (``mlp``, an excitation
        MLP ``(fc1, act, fc2)``, by :func:`~attnblocks.blocks._identity.zero_output_mlp_`;
        the ``zero`` layers by zeroing them) and the gates, of which ``terms`` are added
        together, are scaled by ``1 / (terms * gate(0))``; otherwise the scale is 1.
        """
        self.gate_scale = 1.0
        if self.init != "identity":
            return
        owner = type(self).__name__
        if mlp is not None:
            zero_output_mlp_(*mlp, owner=owner)
        for layer in zero:
            zero_layer_(layer)
        like = (mlp[0] if mlp is not None else zero[0]).weight
        self.gate_scale = identity_gate_scale(self.gate, like, owner=owner, terms=terms)  # type: ignore[arg-type]

    def _check_input(self, x: torch.Tensor) -> None:
        """Check that ``x`` is a floating ``(N, C, *spatial)`` tensor the block accepts,
        on the device of the block's parameters."""
        owner = type(self).__name__
        check_block_input(
            x,
            self.channels,
            owner=owner,
            spatial_dims=self.spatial_dims,
            reason=self.spatial_dims_reason,
        )
        device = _parameter_device(self)
        if device is not None and x.device != device:
            raise InvalidInputError(
                f"{owner} has its parameters on {device}, but the input is on {x.device}; "
                f"move the block (block.to({str(x.device)!r})) or the input "
                f"(x.to({str(device)!r})) so that both are on one device."
            )

    def _scale(self, gate: torch.Tensor) -> torch.Tensor:
        """``gate`` times :attr:`gate_scale` (no multiplication when the scale is 1)."""
        return scale_gate(gate, self.gate_scale)

    def _apply_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Call the gate hooks with the ``(N, C)`` gate and return ``x`` scaled by it."""
        self._emit_gate(gate)
        return x * per_channel(gate, x)

    def _pooled_gate(self, x: torch.Tensor) -> PooledGate | None:
        """The block's gate as the fused node computes it, or ``None``: no fused path.

        Blocks whose gate is a function of global pools override it (see
        :class:`~attnblocks.blocks._fused_gate.PooledGate`).
        """
        return None

    def _fused_forward(self, x: torch.Tensor, *, inference: bool = False) -> torch.Tensor | None:
        """``x`` scaled by the fused node's gate (gate hooks called), or ``None``: plain path.

        See :func:`~attnblocks.blocks._fused_gate.try_fused` for when the node runs and
        for ``inference``.
        """
        fused = try_fused(self, x, inference=inference)
        if fused is None:
            return None
        out, gate = fused
        self._emit_gate(gate)
        return out

    def register_gate_hook(self, hook: GateHook) -> RemovableHandle:
        """Register ``hook(block, gate)``, called on every forward with the detached gate.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._gate_hooks)
        self._gate_hooks[handle.id] = hook
        return handle

    def register_map_hook(self, hook: MapHook) -> RemovableHandle:
        """Register ``hook(block, attention_map)``, called on every forward with the detached map.

        Only blocks with ``has_spatial_map`` call their map hooks; the map is the one
        ``spatial_map(x)`` returns, ``(N, 1, *spatial)`` or ``(N, C, *spatial)``.

        Returns:
            A handle whose ``remove()`` unregisters the hook.

        Example:
            >>> import torch
            >>> from attnblocks import CBAMBlock
            >>> cbam, maps = CBAMBlock(16, reduction=4), []
            >>> handle = cbam.register_map_hook(lambda block, m: maps.append(m))
            >>> _ = cbam(torch.randn(2, 16, 7, 7))
            >>> handle.remove()
            >>> maps[0].shape
            torch.Size([2, 1, 7, 7])
        """
        handle = RemovableHandle(self._map_hooks)
        self._map_hooks[handle.id] = hook
        return handle

    @property
    def has_map_hooks(self) -> bool:
        """Whether any map hook is registered (blocks build costly maps only then)."""
        return bool(self._map_hooks)

    def _emit_gate(self, gate: torch.Tensor) -> None:
        if self._gate_hooks:
            detached = gate.detach()
            for hook in list(self._gate_hooks.values()):
                hook(self, detached)

    def _emit_map(self, attention_map: torch.Tensor) -> None:
        if self._map_hooks:
            detached = attention_map.detach()
            for hook in list(self._map_hooks.values()):
                hook(self, detached)

    def __getstate__(self) -> dict[str, object]:
        # Hooks and a knocked-out forward installed by a temporary context (TransientHook)
        # stay with the original: copies and pickles are the plain block.
        state = dict(super().__getstate__())
        for table in ("_gate_hooks", "_map_hooks"):
            hooks = state.get(table)
            if isinstance(hooks, dict) and any(
                isinstance(h, TransientHook) for h in hooks.values()
            ):
                state[table] = OrderedDict(
                    (k, h) for k, h in hooks.items() if not isinstance(h, TransientHook)
                )
        if isinstance(state.get("forward"), TransientHook):
            del state["forward"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        # objects pickled before a hook table existed get an empty one
        if "_gate_hooks" not in self.__dict__:
            self._gate_hooks = OrderedDict()
        if "_map_hooks" not in self.__dict__:
            self._map_hooks = OrderedDict()


def _parameter_device(module: nn.Module) -> torch.device | None:
    """The device of the first parameter found in ``module`` or below it, if any.

    Every block keeps its parameters on one device (``.to`` moves them together). The
    search stops at the first parameter, so for every block of the family it costs well
    under a microsecond, unlike ``next(module.parameters())``.
    """
    for param in module._parameters.values():
        if param is not None:
            return param.device
    for child in module._modules.values():
        if child is not None:
            device = _parameter_device(child)
            if device is not None:
                return device
    return None
