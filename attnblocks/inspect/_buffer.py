"""The per-name store of captured tensors, and the base of the recorders that fill one."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnblocks._errors import InvalidInputError

__all__ = ["ChunkStore", "StoreRecorder"]


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


class StoreRecorder:
    """What the gate, map and feature recorders share: a :class:`ChunkStore` and its reading.

    Subclasses set ``self._store`` and ``self.active`` and add hooks and a property
    returning everything captured.
    """

    _store: ChunkStore
    active: bool

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
