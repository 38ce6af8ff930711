"""Record the excitation gates of every attention block while a model runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from attnblocks._validation import check_bool
from attnblocks.blocks import AttentionBlock
from attnblocks.inspect._buffer import SiteRecorder, check_store_device
from attnblocks.inspect._sites import Selectors, find_gate_sites

__all__ = ["GateRecorder", "record_gates"]


class GateRecorder(SiteRecorder):
    """The gates captured by :func:`record_gates`, one entry per attention block.

    Attributes:
        sites: the qualified module names of the recorded blocks, in model order.
        active: ``True`` inside the ``with`` block, while hooks are registered.
    """

    def _empty(self, name: str) -> torch.Tensor:
        return torch.empty(0, self._channels[name], device=self._store.device)

    def _prepare(self, name: str, block: nn.Module, gate: torch.Tensor) -> torch.Tensor:
        return gate

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        """``{site: gates}``, each gate tensor ``(total N, C)``: every row captured so far.

        Rows are in call order: a block run on three batches of 8 gives 24 rows. With
        ``keep=False`` the rows already returned by :meth:`pop` are gone.
        """
        return self._store.all()


@contextmanager
def record_gates(
    model: nn.Module,
    *,
    sites: Selectors | None = None,
    device: torch.device | str | None = "cpu",
    keep: bool = True,
) -> Iterator[GateRecorder]:
    """Capture the gate of every attention block over the forward passes run inside.

    The gates are the ones the blocks really applied (read through
    :meth:`~attnblocks.blocks.AttentionBlock.register_gate_hook`, never recomputed),
    detached, so recording neither builds autograd graphs nor touches ``.grad``. The
    model's train/eval mode is not changed: call ``model.eval()`` yourself, or use
    :func:`gate_statistics`, which restores the mode afterwards. The hooks are removed
    on exit, also when the body raises.

    Args:
        model: a model containing attention blocks (found by type).
        sites: record only these blocks (selectors as in :func:`attnblocks.insert_se`);
            ``None`` records every channel attention block.
        device: where to store the gates (``"cpu"`` by default, to spare accelerator
            memory); ``None`` keeps them where they were computed.
        keep: keep every row until the end; with ``False``, :meth:`GateRecorder.pop`
            hands rows out and forgets them (for streaming statistics).

    Yields:
        A :class:`GateRecorder`; ``rec.gates`` maps each block's qualified name to a
        ``(total N, C)`` tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks import SEBlock
        >>> from attnblocks.inspect import record_gates
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), SEBlock(8, reduction=2), nn.ReLU())
        >>> with record_gates(net) as rec:
        ...     for _ in range(3):
        ...         _ = net(torch.randn(4, 3, 16, 16))
        >>> {name: tuple(g.shape) for name, g in rec.gates.items()}
        {'1': (12, 8)}
        >>> net[1]._gate_hooks  # nothing left behind
        OrderedDict()
    """
    device = check_store_device(device, owner="record_gates")
    check_bool(keep, "keep", owner="record_gates")
    blocks = find_gate_sites(model, sites, owner="record_gates")
    recorder = GateRecorder(blocks, device=device, keep=keep)
    with recorder._attached(blocks, AttentionBlock.register_gate_hook):
        yield recorder
