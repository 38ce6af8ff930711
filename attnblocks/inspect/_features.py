"""Record the outputs of chosen modules (feature maps) while a model runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnblocks._errors import InvalidInputError
from attnblocks._validation import check_bool
from attnblocks.inspect._buffer import StoreHook, StoreRecorder, check_store_device
from attnblocks.inspect._sites import Selectors, resolve_modules

__all__ = ["FeatureRecorder", "record_features"]


class FeatureRecorder(StoreRecorder):
    """The outputs captured by :func:`record_features`, one entry per module.

    Attributes:
        layers: the qualified names of the recorded modules, in model order.
        active: ``True`` inside the ``with`` block, while hooks are registered.
    """

    def __init__(
        self, layers: tuple[str, ...], *, device: torch.device | str | None, keep: bool
    ) -> None:
        self.layers = layers
        super().__init__(layers, device=device, keep=keep, owner="FeatureRecorder")

    def _prepare(self, name: str, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise InvalidInputError(
                f"record_features: module {name!r} ({type(module).__name__}) returned "
                f"{type(output).__name__}, not a tensor; record one of its submodules "
                "that returns a tensor instead."
            )
        return output

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """``{layer: outputs}``, every captured output concatenated along dim 0 (batch)."""
        return self._store.all()

    @property
    def batches(self) -> dict[str, list[torch.Tensor]]:
        """``{layer: [output of call 1, call 2, ...]}``, for outputs of varying shape."""
        return self._batches()


@contextmanager
def record_features(
    model: nn.Module,
    layers: Selectors,
    *,
    device: torch.device | str | None = "cpu",
    keep: bool = True,
    before_hooks: bool = False,
) -> Iterator[FeatureRecorder]:
    """Capture the outputs of the chosen modules over the forward passes run inside.

    Outputs are stored as detached copies taken when the module returns, so a later
    in-place operation (``ReLU(inplace=True)``) does not change what was recorded,
    and no autograd graph is kept alive. The model's mode and gradients are left
    alone; the hooks are removed on exit, also when the body raises.

    Args:
        model: any ``nn.Module``.
        layers: which modules to record, with the selector syntax of
            :func:`attnblocks.insert_se` (exact names, globs, ``"re:"`` regexes,
            module classes, predicates). Every selector must match something.
        device: where to store the outputs (``"cpu"`` by default); ``None`` keeps them
            where they were computed.
        keep: as for :func:`record_gates`.
        before_hooks: record each module's own output, before the forward hooks
            already registered on it run. By default the output is recorded as the
            rest of the model sees it, which for a module carrying a block inserted
            by :func:`attnblocks.insert_se` (applied by a forward hook) is *after*
            the block; ``True`` gives the feature map the block re-weights.

    Yields:
        A :class:`FeatureRecorder`; ``rec.features`` maps each module's qualified name
        to its outputs concatenated along the batch dimension.

    Example:
        >>> from attnblocks.inspect import record_features
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3))
        >>> with record_features(net, ["0", "2"]) as rec:
        ...     _ = net(torch.randn(2, 3, 16, 16))
        >>> {name: tuple(f.shape) for name, f in rec.features.items()}
        {'0': (2, 8, 14, 14), '2': (2, 4, 12, 12)}
        >>> bool((rec.features["0"] < 0).any())  # recorded before the in-place ReLU
        True
    """
    device = check_store_device(device, owner="record_features")
    check_bool(keep, "keep", owner="record_features")
    check_bool(before_hooks, "before_hooks", owner="record_features")
    modules = resolve_modules(model, layers, owner="record_features")
    recorder = FeatureRecorder(tuple(name for name, _ in modules), device=device, keep=keep)

    def register(module: nn.Module, hook: StoreHook) -> RemovableHandle:
        return module.register_forward_hook(hook, prepend=before_hooks)

    with recorder._attached(modules, register):
        yield recorder
