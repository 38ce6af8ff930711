"""Put a model in eval mode for a while and give every module its own mode back.

Interpretability tools often call ``model.eval()`` and never undo it, so a model
that was training silently stops updating its batch-norm statistics. Here the
``training`` flag of every submodule is saved and restored one by one (by
:func:`attnblocks._modes.evaluating`, which the surgery's probe uses too), which also
keeps mixed states (a frozen, eval-mode backbone inside a training model) intact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from attnblocks._errors import InvalidArgumentError
from attnblocks._modes import evaluating
from attnblocks._validation import check_bool

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Context manager: ``model.eval()`` inside, each module's own mode restored on exit.

    Args:
        model: the model.
        enabled: when ``False`` the model is left exactly as it is (convenient for
            functions with an ``eval_mode=`` switch).

    Example:
        >>> from attnblocks.inspect import eval_mode
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()  # a mixed state: the model trains, its batch norm does not
        >>> with eval_mode(net):
        ...     net.training, net[0].training
        (False, False)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"eval_mode: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    check_bool(enabled, "enabled", owner="eval_mode")
    if not enabled:
        yield model
        return
    with evaluating(model):
        yield model
