"""The per-name store of captured tensors, and the base of the recorders that fill one."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks.blocks._base import AttentionBlock, TransientHook

__all__ = ["ChunkStore", "SiteRecorder", "StoreHook", "StoreRecorder", "check_store_device"]

M = TypeVar("M", bound=nn.Module)


def check_store_device(device: object, *, owner: str) -> torch.device | None:
    """Return ``device`` as a :class:`torch.device` (``None`` stays ``None``), else raise.

    >>> check_store_device("cpu", owner="demo")
    device(type='cpu')
    """
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError:
            pass
    raise InvalidArgumentError(
        f"{owner}: device must be None (keep each tensor where it was computed), a "
        f"torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}."
    )


class ChunkStore:
    """Detached copies of tensors captured under several names, one list per name.

    Args:
        names: the names, in the order results are returned.
        device: where copies are stored; ``None`` keeps the source device.
        keep: keep popped chunks (``True``) or drop them once :meth:`pop` returns them.
        empty: builds the tensor returned for a name that captured nothing yet.
        owner: the recorder's class name, for error messages.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        *,
        device: torch.device | str | None,
        keep: bool,
        empty: Callable[[str], torch.Tensor],
        owner: str,
    ) -> None:
        self.names = names
        self.device = None if device is None else torch.device(device)
        self.keep = keep
        self.chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._popped: dict[str, int] = dict.fromkeys(names, 0)
        self._empty = empty
        self._owner = owner
        self._cache: dict[str, torch.Tensor] | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Store a detached copy of ``tensor`` under ``name``."""
        if tensor.is_meta and self.device is not None and self.device.type != "meta":
            raise InvalidInputError(
                f"{self._owner}: the tensor captured at {name!r} is on the meta device, "
                f"which holds no values, so it cannot be stored on {self.device}; run the "
                "model on a real device, or record with device=None to keep meta tensors."
            )
        copy = tensor.detach().to(device=self.device or tensor.device, copy=True)
        self.chunks[name].append(copy)
        self._cache = None

    def _cat(self, name: str, chunks: list[torch.Tensor]) -> torch.Tensor:
        if not chunks:
            return self._empty(name)
        try:
            return torch.cat(chunks, dim=0)
        except RuntimeError:
            shapes = sorted({tuple(c.shape[1:]) for c in chunks})
            raise InvalidInputError(
                f"{self._owner}: the tensors captured at {name!r} have different shapes "
                f"after the batch dimension ({shapes}), so they cannot be stacked; read "
                f"the per-call list in .batches[{name!r}] instead."
            ) from None

    def all(self) -> dict[str, torch.Tensor]:
        """Every stored chunk, concatenated along dim 0, per name."""
        if self._cache is None:
            self._cache = {name: self._cat(name, self.chunks[name]) for name in self.names}
        return dict(self._cache)

    def pop(self) -> dict[str, torch.Tensor]:
        """The chunks stored since the previous ``pop``, concatenated, per name."""
        out = {}
        for name in self.names:
            chunks = self.chunks[name]
            out[name] = self._cat(name, chunks[self._popped[name] :])
            if self.keep:
                self._popped[name] = len(chunks)
            else:
                chunks.clear()
        self._cache = None
        return out

    def clear(self) -> None:
        """Drop everything."""
        for name in self.names:
            self.chunks[name].clear()
            self._popped[name] = 0
        self._cache = None

    def rows(self) -> dict[str, int]:
        """The number of rows stored per name."""
        return {name: sum(c.shape[0] for c in self.chunks[name]) for name in self.names}


class StoreHook(TransientHook):
    """A recorder's hook: stores what it is given in a :class:`ChunkStore` under one name.

    Being a :class:`~attnblocks.blocks._base.TransientHook`, it stays out of copies and
    pickles of the model, so a copy made while recording never feeds the recorder.

    Args:
        store: where to store.
        name: the site or layer name to store under.
        prepare: turns the hook's arguments ``(module, *rest)`` into the tensor to store.
    """

    def __init__(self, store: ChunkStore, name: str, prepare: Callable[..., torch.Tensor]) -> None:
        self.store = store
        self.name = name
        self.prepare = prepare

    def __call__(self, module: torch.nn.Module, *rest: object) -> None:
        self.store.add(self.name, self.prepare(self.name, module, *rest))


class StoreRecorder:
    """What the gate, map and feature recorders share: a :class:`ChunkStore`, its hooks
    and their lifetime.

    Subclasses define :meth:`_prepare` (what a hook stores) and a property returning
    everything captured; their ``record_*`` function attaches the hooks with
    :meth:`_attached`.

    Args:
        names: the site or layer names, in the order results are returned.
        device: where to store; ``None`` keeps each tensor where it was computed.
        keep: as for :class:`ChunkStore`.
        owner: the recorder's class name, for error messages.

    Attributes:
        active: ``True`` inside the ``with`` block, while hooks are registered.
    """

    #: Turns a hook's arguments ``(name, module, *rest)`` into the tensor to store.
    _prepare: Callable[..., torch.Tensor]

    def __init__(
        self,
        names: tuple[str, ...],
        *,
        device: torch.device | str | None,
        keep: bool,
        owner: str,
    ) -> None:
        self._store = ChunkStore(names, device=device, keep=keep, empty=self._empty, owner=owner)
        self.active = False

    def _empty(self, name: str) -> torch.Tensor:
        """The tensor returned for ``name`` before anything was captured there."""
        return torch.empty(0, device=self._store.device)

    def _hook(self, name: str) -> StoreHook:
        return StoreHook(self._store, name, self._prepare)

    @contextmanager
    def _attached(
        self, modules: Sequence[tuple[str, M]], register: Callable[[M, StoreHook], RemovableHandle]
    ) -> Iterator[None]:
        """Register one hook per ``(name, module)`` with ``register(module, hook)`` and
        remove them all on exit, also when the body (or a registration) raises."""
        handles: list[RemovableHandle] = []
        try:
            for name, module in modules:
                handles.append(register(module, self._hook(name)))
            self.active = True
            yield
        finally:
            self.active = False
            for handle in handles:
                handle.remove()

    def _batches(self) -> dict[str, list[torch.Tensor]]:
        """``{name: [tensor of call 1, call 2, ...]}``, for tensors of varying shape."""
        return {name: list(chunks) for name, chunks in self._store.chunks.items()}

    def pop(self) -> dict[str, torch.Tensor]:
        """Return what was captured since the previous ``pop`` (or since the start).

        Use it to feed a :class:`~attnblocks.inspect.GateStats` or any other running
        statistic batch by batch; with ``keep=False`` the returned rows are dropped from
        the recorder, so memory stays flat however many batches run.
        """
        return self._store.pop()

    def clear(self) -> None:
        """Forget everything captured."""
        self._store.clear()

    def __repr__(self) -> str:
        state = "active" if self.active else "closed"
        return f"{type(self).__name__}({state}, rows={self._store.rows()})"


class SiteRecorder(StoreRecorder):
    """A recorder of attention blocks (sites): the base of the gate and map recorders.

    Args:
        blocks: ``(qualified name, block)`` pairs, in model order.
        device: where to store; ``None`` keeps each tensor where it was computed.
        keep: as for :class:`ChunkStore`.
    """

    def __init__(
        self,
        blocks: Sequence[tuple[str, AttentionBlock]],
        *,
        device: torch.device | str | None,
        keep: bool,
    ) -> None:
        self.sites: tuple[str, ...] = tuple(name for name, _ in blocks)
        self._channels = {name: int(block.channels) for name, block in blocks}
        super().__init__(self.sites, device=device, keep=keep, owner=type(self).__name__)
