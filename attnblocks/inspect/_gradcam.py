"""Grad-CAM: class activation maps from the gradients of a chosen layer.

Paper: Ramprasaath R. Selvaraju, Michael Cogswell, Abhishek Das, Ramakrishna Vedantam,
Devi Parikh, Dhruv Batra, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017, https://arxiv.org/abs/1610.02391
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_bool, check_choice
from attnblocks.blocks._ops import spatial_dims_of
from attnblocks.inspect._maps import (
    MAP_NORMALIZATIONS,
    MapNormalization,
    UpsampleMode,
    check_upsample,
    normalize_maps,
    upsample_maps,
)
from attnblocks.inspect._sites import resolve_modules
from attnblocks.inspect._state import eval_mode as _eval_mode
from attnblocks.surgery._selectors import describe_selector

__all__ = ["grad_cam"]


def _find_layer(model: nn.Module, layer: object) -> tuple[str, nn.Module]:
    """The one module ``layer`` names, found with the surgery's selectors."""
    if not isinstance(layer, (str, nn.Module)):
        raise InvalidArgumentError(
            "grad_cam: layer must be a module name (str) or a submodule of the model, got "
            f"{type(layer).__name__}."
        )
    # a name that matches nothing raises a SelectorError that suggests the closest names
    found = resolve_modules(model, [layer], owner="grad_cam")
    if len(found) != 1:
        raise InvalidArgumentError(
            f"grad_cam: layer {describe_selector(layer)} matches {len(found)} modules "
            f"({[name for name, _ in found[:5]]}); name exactly one, e.g. 'layer4' or "
            "'features.10' as in model.named_modules()."
        )
    return found[0]


def _check_targets(targets: object, n: int) -> torch.Tensor:
    owner = "grad_cam"
    if isinstance(targets, torch.Tensor):
        t = targets
    elif hasattr(targets, "__array__") and not isinstance(targets, (str, bytes)):
        try:  # a numpy array of class indices
            t = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError(
                f"{owner}: targets must be class indices, got {targets!r:.60}."
            ) from None
    elif isinstance(targets, Sequence) and not isinstance(targets, str):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in targets):
            raise InvalidArgumentError(
                f"{owner}: targets must be class indices (ints), got {list(targets)!r}."
            )
        t = torch.tensor(list(targets), dtype=torch.long)
    else:
        raise InvalidArgumentError(
            f"{owner}: targets must be a sequence or 1-D tensor with one class index per "
            f"input, got {type(targets).__name__}."
        )
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise InvalidArgumentError(
            f"{owner}: targets must be a 1-D integer tensor, got shape {tuple(t.shape)} "
            f"and dtype {t.dtype}."
        )
    if t.numel() != n:
        raise InvalidArgumentError(
            f"{owner}: got {t.numel()} targets for a batch of {n} inputs; give exactly one "
            "target class per input."
        )
    return t.to(torch.long)


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[int] | torch.Tensor,
    layer: str | nn.Module,
    *,
    normalize: MapNormalization = "none",
    size: tuple[int, int] | None = None,
    upsample: UpsampleMode = "bilinear",
    eval_mode: bool = True,
    relu: bool = True,
) -> torch.Tensor:
    r"""Grad-CAM maps of ``layer`` for a batch, one explicit target class per input.

    With :math:`A^k` the layer's output channels and :math:`y^c` the target logit,
    :math:`\alpha_k = \text{mean}_{ij}\, \partial y^c / \partial A^k_{ij}` and the map
    is :math:`\text{ReLU}(\sum_k \alpha_k A^k)` (eqs. 1-2 of the paper).

    The whole batch runs in one forward and one backward pass. The activation and
    its gradient are read with a forward hook and a tensor hook, and the activation is
    copied when the layer returns, so a following ``ReLU(inplace=True)`` does not
    corrupt either. The backward pass uses :func:`torch.autograd.grad` with respect to
    a detached copy of the input, so parameters' ``.grad`` are never touched and
    frozen models work. Every module's train/eval mode is restored afterwards.

    Args:
        model: a classifier mapping ``inputs`` to ``(N, K)`` logits.
        inputs: a floating ``(N, ...)`` batch.
        targets: ``N`` class indices, one per input (a length mismatch is an error;
            nothing is broadcast or dropped).
        layer: the module name (as in ``model.named_modules()``) or the module itself,
            resolved by the selectors of :func:`attnblocks.insert_se` (a name that
            matches nothing is an error suggesting the closest names; a selector must
            match exactly one module); its output must be ``(N, C, *spatial)`` and it
            must run once per forward.
            The output is taken as the rest of the model sees it: for a module that
            carries a block inserted by :func:`attnblocks.insert_se`, after the block.
        normalize: ``"none"`` (default) returns the raw maps; ``"image"`` scales each
            to [0, 1]; ``"shared"`` uses one scale for the whole batch, which keeps
            differences in strength visible (see :func:`normalize_maps`).
        size: resize the maps to ``(height, width)``, e.g. ``inputs.shape[-2:]``;
            ``None`` keeps the layer's resolution. Resizing happens before
            normalisation.
        upsample: the interpolation used when ``size`` is given (checked either way,
            so a misspelt mode is an error, not silently ignored).
        eval_mode: run the model in eval mode (batch norm and dropout in inference
            behaviour, so images in a batch do not influence one another).
        relu: apply the final ReLU of the paper (``False`` keeps negative evidence).

    Returns:
        A float32 tensor ``(N, *spatial)`` on the inputs' device.

    Example:
        >>> from attnblocks.inspect import grad_cam
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        ...     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        >>> cams = grad_cam(net, torch.randn(4, 3, 16, 16), [0, 1, 2, 3], "0")
        >>> cams.shape
        torch.Size([4, 16, 16])
        >>> grad_cam(net, torch.randn(4, 3, 16, 16), [0, 1], "0")
        Traceback (most recent call last):
        ...
        attnblocks._errors.InvalidArgumentError: grad_cam: got 2 targets for a batch of 4 inputs; give exactly one target class per input.
    """  # noqa: E501
    owner = "grad_cam"
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        got = f"dtype {inputs.dtype}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise InvalidInputError(f"{owner}: inputs must be a floating tensor (N, ...), got {got}.")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise InvalidInputError(
            f"{owner}: inputs must be a non-empty batch (N, ...), got shape {tuple(inputs.shape)}."
        )
    if inputs.is_meta:
        raise InvalidInputError(
            f"{owner}: inputs are on the meta device, which holds shapes but no values; "
            "Grad-CAM needs real activations and gradients."
        )
    check_choice(normalize, "normalize", MAP_NORMALIZATIONS, owner=owner)
    # everything is checked before the forward and backward passes
    out_size, _ = check_upsample(size, upsample, owner=owner)
    check_bool(eval_mode, "eval_mode", owner=owner)
    check_bool(relu, "relu", owner=owner)
    if torch.is_inference_mode_enabled():
        raise InvalidArgumentError(
            f"{owner}: called under torch.inference_mode(), where no gradient can be "
            "computed; Grad-CAM needs one backward pass. Call grad_cam outside the "
            "inference_mode block (it never touches the parameters' .grad)."
        )
    if any(p.is_inference() for p in model.parameters()):
        raise InvalidArgumentError(
            f"{owner}: the model's parameters were created under torch.inference_mode(), "
            "so no gradient can flow through them; build or load the model outside "
            "inference_mode (or clone its parameters) to use Grad-CAM."
        )
    name, module = _find_layer(model, layer)
    n = inputs.shape[0]
    t = _check_targets(targets, n)

    activations: list[torch.Tensor] = []
    gradients: list[torch.Tensor] = []

    def keep_grad(grad: torch.Tensor) -> None:
        gradients.append(grad.detach().clone())

    def forward_hook(mod: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() < 3:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise InvalidInputError(
                f"{owner}: layer {name!r} must output a (N, C, *spatial) tensor, got {got}; "
                "choose a convolutional layer or block."
            )
        activations.append(output.detach().clone())
        if output.requires_grad:
            output.register_hook(keep_grad)

    x = inputs.detach()
    if x.is_inference():  # made under inference_mode: a normal copy can require grad
        x = x.clone()
    x.requires_grad_(True)
    handle = module.register_forward_hook(forward_hook)
    try:
        with _eval_mode(model, eval_mode), torch.enable_grad():
            logits = model(x)
            if len(activations) != 1:
                raise InvalidArgumentError(
                    f"{owner}: layer {name!r} ran {len(activations)} times in one forward "
                    "pass; choose a layer that runs exactly once."
                )
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
                returned = (
                    tuple(logits.shape)
                    if isinstance(logits, torch.Tensor)
                    else type(logits).__name__
                )
                raise InvalidInputError(
                    f"{owner}: the model must return (N, num_classes) logits with N = {n}, "
                    f"got {returned}."
                )
            k = logits.shape[1]
            if int(t.min()) < 0 or int(t.max()) >= k:
                raise InvalidArgumentError(
                    f"{owner}: targets must lie in [0, {k - 1}] for a model with {k} "
                    f"outputs, got {t.tolist()}."
                )
            score = logits.gather(1, t.to(logits.device)[:, None]).sum()
            if score.requires_grad:
                torch.autograd.grad(score, x, allow_unused=True)
    finally:
        handle.remove()
    if not gradients:
        raise InvalidArgumentError(
            f"{owner}: no gradient reached layer {name!r}; the target logits do not depend "
            "on it (or the model runs under torch.no_grad())."
        )
    act = activations[0].float()
    grad = gradients[0].float()
    weights = grad.mean(dim=spatial_dims_of(act), keepdim=True)
    cams = (weights * act).sum(dim=1)
    if relu:
        cams = cams.clamp(min=0)
    if out_size is not None:
        if cams.dim() != 3:
            raise InvalidArgumentError(
                f"{owner}: size= needs a 2-D layer output, got maps of shape {tuple(cams.shape)}."
            )
        cams = upsample_maps(cams, out_size, mode=upsample)
    return normalize_maps(cams, normalize)
