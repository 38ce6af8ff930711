"""Record the spatial attention maps of every attention block while a model runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from attnblocks._validation import check_bool, check_choice
from attnblocks.blocks import AttentionBlock
from attnblocks.inspect._buffer import SiteRecorder, check_store_device
from attnblocks.inspect._sites import Selectors, find_map_sites

__all__ = ["MapRecorder", "MapReduction", "record_maps"]

#: How :func:`record_maps` treats a map with one value per channel, ``(N, C, *spatial)``:
#: ``None`` keeps it; ``"mean"`` / ``"max"`` reduce it over the channels to
#: ``(N, 1, *spatial)`` before it is stored.
MapReduction = Literal["mean", "max"] | None

_REDUCTIONS = (None, "mean", "max")


class MapRecorder(SiteRecorder):
    """The spatial maps captured by :func:`record_maps`, one entry per attention block.

    Attributes:
        sites: the qualified module names of the recorded blocks, in model order.
        active: ``True`` inside the ``with`` block, while hooks are registered.
    """

    def __init__(
        self,
        blocks: list[tuple[str, AttentionBlock]],
        *,
        device: torch.device | str | None,
        keep: bool,
        reduce: MapReduction,
    ) -> None:
        self._reduce = reduce
        super().__init__(blocks, device=device, keep=keep)

    def _prepare(self, name: str, block: nn.Module, attention_map: torch.Tensor) -> torch.Tensor:
        if self._reduce == "mean":
            return attention_map.mean(dim=1, keepdim=True)
        if self._reduce == "max":
            return attention_map.amax(dim=1, keepdim=True)
        return attention_map

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """``{site: maps}``, each ``(total N, 1 or C, *spatial)``: every map captured so far.

        Maps are in call order, concatenated along the batch dimension; when the calls
        had inputs of different spatial sizes, read :attr:`batches` instead.
        """
        return self._store.all()

    @property
    def batches(self) -> dict[str, list[torch.Tensor]]:
        """``{site: [maps of call 1, call 2, ...]}``, for inputs of varying size."""
        return self._batches()


@contextmanager
def record_maps(
    model: nn.Module,
    *,
    sites: Selectors | None = None,
    device: torch.device | str | None = "cpu",
    keep: bool = True,
    reduce: MapReduction = None,
) -> Iterator[MapRecorder]:
    """Capture the spatial attention map of every attention block over the passes run inside.

    The spatial counterpart of :func:`record_gates`, for the blocks with
    ``has_spatial_map``. Each block's map is the one its ``spatial_map(x)`` method
    returns, read through :meth:`~attnblocks.blocks.AttentionBlock.register_map_hook`
    (never recomputed) and detached:

    * ``(N, 1, *spatial)``, one map for all channels: CBAM's spatial gate
      :math:`M_s`, scSE's sSE gate, Global Context's softmax pooling weights
      :math:`\\alpha` (where the context comes from; they sum to 1 per sample);
    * ``(N, C, *spatial)``, one map per channel: SimAM's weights, Coordinate
      Attention's :math:`g^h \\otimes g^w`, Gather-Excite's gate with a local extent.

    Per-channel maps are as large as the feature map; ``reduce="mean"`` (or
    ``"max"``) stores their channel mean (or maximum) instead, ``(N, 1, *spatial)``.
    As with :func:`record_gates`, the model's train/eval mode and gradients are left
    alone, and the hooks are removed on exit, also when the body raises.

    Args:
        model: a model containing attention blocks with a spatial map (found by type).
        sites: record only these blocks (selectors as in :func:`attnblocks.insert_se`);
            ``None`` records every block with a spatial map.
        device: where to store the maps (``"cpu"`` by default); ``None`` keeps them
            where they were computed.
        keep: keep every map until the end; with ``False``, :meth:`MapRecorder.pop`
            hands maps out and forgets them.
        reduce: ``None``, ``"mean"`` or ``"max"``: see above.

    Yields:
        A :class:`MapRecorder`; ``rec.maps`` maps each block's qualified name to its
        maps concatenated along the batch dimension.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks import CBAMBlock, SimAMBlock
        >>> from attnblocks.inspect import record_maps
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), CBAMBlock(8, reduction=2), SimAMBlock(8))
        >>> with torch.no_grad(), record_maps(net) as rec:
        ...     _ = net(torch.randn(4, 3, 16, 16))
        >>> {name: tuple(m.shape) for name, m in rec.maps.items()}
        {'1': (4, 1, 14, 14), '2': (4, 8, 14, 14)}
        >>> with torch.no_grad(), record_maps(net, sites=["2"], reduce="mean") as rec:
        ...     _ = net(torch.randn(4, 3, 16, 16))
        >>> tuple(rec.maps["2"].shape)
        (4, 1, 14, 14)
    """
    check_choice(reduce, "reduce", _REDUCTIONS, owner="record_maps")
    device = check_store_device(device, owner="record_maps")
    check_bool(keep, "keep", owner="record_maps")
    blocks = find_map_sites(model, sites, owner="record_maps")
    recorder = MapRecorder(blocks, device=device, keep=keep, reduce=reduce)
    with recorder._attached(blocks, AttentionBlock.register_map_hook):
        yield recorder
