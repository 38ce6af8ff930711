"""Put a model in eval mode for a while and give every module its own mode back.

``model.train(flag)`` sets one flag on every submodule, so calling ``model.train()``
afterwards would not undo ``model.eval()`` for a model in a mixed state (a frozen,
eval-mode backbone inside a training model). Here the ``training`` flag of every
submodule is saved first and restored one by one, also when the body raises.

Shared by the surgery's probe (:func:`attnblocks.surgery._probe.run_probe`) and
:func:`attnblocks.inspect.eval_mode`, so it sits below both layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluating"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Context manager: ``model.eval()`` inside, each module's own ``training`` flag after.

    The flags are saved before ``model.eval()`` runs, so they are restored exactly
    even if ``eval()`` itself (a module overriding ``train``) or the body raises.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> _ = net[1].eval()
        >>> with evaluating(net):
        ...     net.training, net[0].training
        (False, False)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in saved:
            module.training = flag
