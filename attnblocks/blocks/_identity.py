"""Helpers for ``init="identity"``: start a block as an exact identity map that still learns.

A gated block is an exact identity when every gate it applies equals exactly 1.
The recipe, shared by :class:`~attnblocks.SEBlock`, CBAM, scSE and ECA:

* make every pre-gate exactly 0 for every finite input, without zeroing a layer
  whose inputs come from other parameters (a zero layer would cut their gradient);
* scale the gate by ``1 / gate(0)`` (2 for a sigmoid), which must be exact in
  floating point.

For a two-layer excitation MLP ``fc2(act(fc1(z)))`` :func:`zero_output_mlp_`
sets ``fc1.weight = 0`` and ``fc1.bias = 1``, so every hidden unit holds the
same constant ``h = act(1)`` for every input, and gives each output ``c`` two
non-zero weights of opposite sign on two different hidden units,
``fc2.weight[c, c % hidden] = 1/8`` and ``fc2.weight[c, (c + 1) % hidden] = -1/8``,
with ``fc2.bias = 0``. The pre-gate is then ``h/8 - h/8 = 0`` whatever order the
sum is taken in: scaling by a power of two is exact, and every partial sum of
``{h/8, -h/8, 0, ...}`` is exactly representable. Nothing here depends on the
dtype, so the block stays an exact identity after ``.to(dtype)`` and under
autocast. Every weight of ``fc2`` sees the non-zero ``h``, and ``fc1`` receives
gradient through the non-zero ``fc2``.

With a single hidden unit there is no pair to cancel against, so the bias does
it: ``fc2.weight[c, 0] = 1/8`` and ``fc2.bias[c] = -h/8``, with ``h`` computed in
the parameters' dtype. That cancellation is exact only in the dtype the block
was initialised in: after changing the dtype call ``reset_parameters()``
(:func:`~attnblocks.insert_attention` does it after placing each block).
"""

from __future__ import annotations

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError

__all__ = ["identity_gate_scale", "require_bias", "zero_layer_", "zero_output_mlp_"]


def require_bias(bias: bool, *, owner: str) -> None:
    """Refuse ``init="identity"`` without biases: the identity start is built from them."""
    if not bias:
        raise InvalidArgumentError(
            f"{owner}: init='identity' needs bias=True (the identity start is built from "
            "the biases); got bias=False."
        )


@torch.no_grad()
def zero_layer_(layer: nn.Module) -> None:
    """Set a layer's own weight and bias (if it has one) to zero, in place."""
    for param in layer.parameters(recurse=False):
        param.zero_()


def identity_gate_scale(
    gate: nn.Module, like: torch.Tensor, *, owner: str, terms: int = 1
) -> float:
    """Return ``s = 1 / (terms * gate(0))``, checking that ``terms * s * gate(0) == 1`` exactly.

    Args:
        gate: the block's gate module (``nn.Sigmoid()``...).
        like: a parameter of the block, for the dtype and device of the probe.
        owner: the block's class name, used in messages.
        terms: how many gates are added together (2 for scSE's ``combine="add"``).

    >>> identity_gate_scale(nn.Sigmoid(), torch.zeros(1), owner="X")
    2.0
    >>> identity_gate_scale(nn.Sigmoid(), torch.zeros(1), owner="X", terms=2)
    1.0
    """
    probe = like.new_zeros(1)
    at_zero = gate(probe)
    value = float(at_zero.item())
    if not 0.0 < value < float("inf"):
        raise InvalidArgumentError(
            f"{owner}: init='identity' needs a gate with a finite, positive value at 0; "
            f"the gate {gate} gives {value} there."
        )
    scale = 1.0 / (terms * value)
    if float((at_zero * scale).item()) * terms != 1.0:
        raise InvalidArgumentError(
            f"{owner}: init='identity' needs 1 / gate(0) to be exact in floating point; "
            f"gate(0) = {value!r} is not. Use 'sigmoid' or 'hard_sigmoid'."
        )
    return scale


@torch.no_grad()
def zero_output_mlp_(fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, *, owner: str) -> None:
    """Initialise ``fc2(act(fc1(z)))`` to output exactly 0 for every finite ``z``.

    See the module doc for the recipe and when it is exact. Every parameter still
    receives gradient, except the rows of ``fc1`` for hidden units that no output
    reads (only when ``hidden > out``), which start learning once ``fc2`` has
    moved. Needs both layers to have biases.

    >>> fc1, fc2 = nn.Linear(6, 3), nn.Linear(3, 6)
    >>> zero_output_mlp_(fc1, nn.GELU(), fc2, owner="X")
    >>> fc2.weight.detach() * 8
    tensor([[ 1., -1.,  0.],
            [ 0.,  1., -1.],
            [-1.,  0.,  1.],
            [ 1., -1.,  0.],
            [ 0.,  1., -1.],
            [-1.,  0.,  1.]])
    >>> mlp = nn.Sequential(fc1, nn.GELU(), fc2).to(torch.bfloat16)  # exact in any dtype
    >>> torch.equal(mlp(torch.randn(4, 6, dtype=torch.bfloat16)), torch.zeros(4, 6))
    True
    """
    require_bias(fc1.bias is not None and fc2.bias is not None, owner=owner)
    fc1.weight.zero_()
    fc1.bias.fill_(1.0)
    hidden = act(fc1.bias.detach().clone()[None])[0]
    if not bool(torch.isfinite(hidden).all()):
        raise InvalidArgumentError(
            f"{owner}: init='identity' needs a finite activation at 1; {act} gives {hidden[0]}."
        )
    out_features, hidden_features = fc2.weight.shape
    rows = torch.arange(out_features, device=fc2.weight.device)
    cols = rows % hidden_features
    fc2.weight.zero_()
    fc2.weight[rows, cols] = 2.0**-3
    if hidden_features > 1:
        fc2.weight[rows, (rows + 1) % hidden_features] = -(2.0**-3)
        fc2.bias.zero_()
    else:
        fc2.bias.copy_(-(hidden[cols].to(fc2.bias.dtype) * 2.0**-3))
