"""Retrofit attention into a trained model and fine-tune it: deterministic, resumable.

An *arm* says what is done to the trained baseline before a short fine-tune:
nothing (the control), SE blocks inserted with ``init="identity"`` or with the
default random init, all parameters trained, or only the inserted blocks. Every
arm with the same seed sees the same batches, augmentations and learning-rate
schedule, and is evaluated at the same steps, step 0 (before any update) included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from se_cifar.data import Split
from se_cifar.ema import WeightEMA
from se_cifar.engine import (
    EvalResult,
    Interrupted,
    Trainer,
    _save,
    _seed_of,
    _Stop,
    _StopRequest,
    make_scheduler,
    train_step,
)
from se_cifar.models import SE_SITES, TutorialCNN
from se_cifar.recipes import Recipe

__all__ = [
    "ARMS",
    "Arm",
    "FineTuneState",
    "attention_blocks",
    "build_arm",
    "compare_logits",
    "eval_steps",
    "finetune_run",
    "train_mode",
    "trainable_parameters",
]


@dataclass(frozen=True)
class Arm:
    """One way of retrofitting the baseline.

    Attributes:
        name: the arm's name.
        init: ``None`` (no attention: the control), ``"identity"`` or ``"default"``.
        attention_only: train only the inserted blocks; every other parameter is
            frozen and every BatchNorm keeps its running statistics (eval mode), so
            the blocks' weights are the only state that changes. Dropout stays on.
        label: the legend text.
    """

    name: str
    init: str | None
    attention_only: bool
    label: str


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("control", None, False, "a. control: baseline, fine-tuned the same way"),
        Arm("se_identity", "identity", False, 'b. + SE, init="identity", all trained'),
        Arm("se_random", "default", False, "c. + SE, default (random) init, all trained"),
        Arm("se_identity_attn", "identity", True, 'd. + SE, init="identity", only SE trained'),
    )
}


def build_arm(
    arm: Arm, base_state: dict[str, torch.Tensor], *, num_classes: int, seed: int
) -> nn.Module:
    """The trained baseline (in eval mode) with the arm's SE blocks inserted.

    ``torch.manual_seed(seed)`` is set first, so a random init is one draw per seed.
    """
    from attnblocks import insert_se

    torch.manual_seed(seed)
    model = TutorialCNN(num_classes=num_classes)
    model.load_state_dict(base_state)
    model.eval()
    if arm.init is not None:
        probe = torch.zeros(1, 3, 32, 32)
        insert_se(model, SE_SITES, reduction=16, init=arm.init, example_input=probe)
    return model


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The attention blocks in ``model`` (outermost only), by qualified name."""
    from attnblocks import AttentionBlock

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, AttentionBlock) and not any(
            name.startswith(f"{outer}.") for outer in found
        ):
            found[name] = module
    return found


def trainable_parameters(model: nn.Module, arm: Arm) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """Freeze what ``arm`` does not train; return (trainable parameters, modules kept in eval).

    For an attention-only arm every parameter outside the attention blocks gets
    ``requires_grad=False`` and the BatchNorm layers are returned, to be kept in
    eval mode while the rest of the model trains.
    """
    if not arm.attention_only:
        return [p for p in model.parameters() if p.requires_grad], []
    from attnblocks import freeze_except_attention

    trainable = freeze_except_attention(model)
    norms: list[nn.Module] = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    return trainable, norms


def train_mode(model: nn.Module, kept_in_eval: list[nn.Module]) -> None:
    """``model.train()``, then the modules an arm keeps frozen back to eval mode."""
    model.train()
    for module in kept_in_eval:
        module.eval()


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """How ``logits`` differ from ``reference`` (both (N, classes), same evaluation).

    >>> a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    >>> compare_logits(a, a)["logits_equal"], compare_logits(a.flip(1), a)["same_predictions"]
    (True, 0)
    """
    return {
        "logits_equal": bool(torch.equal(logits, reference)),
        "same_predictions": int((logits.argmax(1) == reference.argmax(1)).sum()),
        "images": int(reference.shape[0]),
        "max_abs_logit_difference": float((logits - reference).abs().max()),
    }


def eval_steps(
    steps_per_epoch: int, epochs: int, *, per_epoch: int = 2, early: tuple[int, ...] = ()
) -> list[int]:
    """Steps after which to evaluate: 0, the ``early`` ones, and ``per_epoch`` times an epoch.

    >>> eval_steps(196, 2, early=(10, 50))
    [0, 10, 50, 98, 196, 294, 392]
    """
    total = steps_per_epoch * epochs
    points = {0, total, *(s for s in early if 0 < s < total)}
    for k in range(1, per_epoch * epochs + 1):
        points.add(round(k * steps_per_epoch / per_epoch))
    return sorted(points)


@dataclass
class FineTuneState:
    """Everything a fine-tune run needs to continue exactly where it stopped."""

    step: int = 0  # completed optimiser steps (over all epochs)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    sums: dict[str, float] = field(default_factory=dict)  # training loss since the last row
    train_time_s: float = 0.0  # optimiser steps only (no evaluation, no checkpoints)
    check: dict[str, Any] = field(default_factory=dict)  # step-0 logits against the baseline
    complete: bool = False


def finetune_run(
    model: nn.Module,
    *,
    arm: Arm,
    recipe: Recipe,
    seed: int,
    train: Split,
    test: Split,
    device: torch.device,
    checkpoint: Path,
    reference: EvalResult,
    per_epoch: int = 2,
    early: tuple[int, ...] = (),
    progress: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, FineTuneState]:
    """Fine-tune ``model`` (the output of :func:`build_arm`) with ``recipe``; resume if possible.

    At step 0, before any update, the model is evaluated with its logits kept and
    compared with ``reference`` (the baseline's evaluation with ``keep_logits=True``):
    ``state.check`` records whether the logits are bitwise equal. Then the test set is
    evaluated after every step of :func:`eval_steps`; with ``recipe.ema`` the evaluated
    (and, at the end, returned) weights are the moving average's. A checkpoint is
    written after every epoch and on Ctrl-C (then :class:`Interrupted` is raised).
    """
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    params, kept_in_eval = trainable_parameters(model, arm)
    optimizer = torch.optim.SGD(
        params,
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    points = eval_steps(steps_per_epoch, recipe.epochs, per_epoch=per_epoch, early=early)
    state = FineTuneState()
    aug_state: torch.Tensor | None = None

    if checkpoint.exists():
        blob = torch.load(checkpoint, weights_only=False, map_location="cpu")
        model.load_state_dict(blob["model"])
        state = blob["state"]
        if state.complete:
            return model, state
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        aug_state = blob["aug_rng"]
        log(f"resuming {checkpoint.name} at step {state.step}")
    ema = WeightEMA(model, recipe.ema) if recipe.ema > 0 else None
    if ema is not None and checkpoint.exists():
        ema.load_state_dict(blob["ema"])

    trainer = Trainer(model, model, recipe, seed, optimizer, scheduler, ema, device)

    def snapshot(aug_gen: torch.Generator | None) -> None:
        _save(checkpoint, trainer.checkpoint(state, aug_gen, arm=arm.name))

    def record(result: EvalResult) -> None:
        sums = state.sums or {"loss": 0.0, "seen": 0.0}
        row = {
            "step": state.step,
            "epoch": state.step / steps_per_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sums["loss"] / sums["seen"] if sums["seen"] else None,
            "test_loss": result.loss,
            "test_acc": result.accuracy,
            "train_time_s": state.train_time_s,
        }
        state.history.append(row)
        state.sums = {}
        train_loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        log(
            f"step {state.step:5d}/{total} (epoch {row['epoch']:.2f})  test acc "
            f"{row['test_acc']:.4f}  loss {row['test_loss']:.4f}  train loss {train_loss}  "
            f"lr {row['lr']:.2e}  {state.train_time_s:.1f}s training"
        )

    if not state.history:  # step 0: the retrofitted model before any update
        torch.manual_seed(_seed_of(seed, 1, 0))  # the dropout stream
        result = trainer.evaluate(test, model, keep_logits=True)
        if result.logits is None or reference.logits is None:
            raise ValueError("finetune_run: the reference evaluation needs keep_logits=True.")
        state.check = {
            **compare_logits(result.logits, reference.logits),
            "accuracy": result.accuracy,
            "reference_accuracy": reference.accuracy,
        }
        record(result)
    images = train.images.to(device)
    labels = train.labels.to(device)
    aug_gen: torch.Generator | None = None
    with _StopRequest() as stop:
        while state.step < total:
            epoch, inner = divmod(state.step, steps_per_epoch)
            order = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(_seed_of(seed, epoch))
            ).to(device)
            if inner == 0 or aug_gen is None:  # a new epoch, or resumed inside one
                aug_gen = torch.Generator().manual_seed(_seed_of(seed, epoch, 0, 7, 0))
                if inner > 0 and aug_state is not None:
                    aug_gen.set_state(aug_state)
            aug_state = None
            end = min((epoch + 1) * steps_per_epoch, next(p for p in points if p > state.step))
            train_mode(model, kept_in_eval)
            steps: Any = range(state.step, end)
            if progress is not None:
                steps = progress(
                    steps,
                    total=total,
                    initial=state.step,
                    desc=f"{arm.name} seed {seed}",
                    leave=False,
                )
            sums = state.sums or {"loss": 0.0, "seen": 0.0}
            tick = time.perf_counter()
            try:
                for step in steps:
                    if stop.requested:
                        raise _Stop
                    index = order[(step - epoch * steps_per_epoch) * recipe.batch_size :][
                        : recipe.batch_size
                    ]
                    x = trainer.augment(images[index], aug_gen, train=True)
                    if recipe.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    loss, _ = train_step(
                        model,
                        optimizer,
                        x,
                        labels[index],
                        amp=trainer.amp,
                        label_smoothing=recipe.label_smoothing,
                    )
                    scheduler.step()
                    if ema is not None:
                        ema.update(model)
                    sums["loss"] += float(loss) * len(index)
                    sums["seen"] += len(index)
                    state.step += 1
            except _Stop:
                state.train_time_s += time.perf_counter() - tick
                state.sums = sums
                snapshot(aug_gen)
                raise Interrupted(f"interrupted at step {state.step}") from None
            except KeyboardInterrupt:
                raise Interrupted(
                    "stopped at once (second Ctrl-C); the last epoch's checkpoint is kept"
                ) from None
            finally:
                if hasattr(steps, "close"):
                    steps.close()
            state.train_time_s += time.perf_counter() - tick
            state.sums = sums
            if state.step in points:
                record(trainer.evaluate(test))
            if state.step >= total:
                state.complete = True
                if ema is not None:
                    model.load_state_dict(ema.shadow.state_dict())  # the evaluated weights
            if stop.requested and not state.complete:
                snapshot(aug_gen if state.step % steps_per_epoch else None)
                raise Interrupted(f"interrupted at step {state.step}")
            if state.step % steps_per_epoch == 0:  # a checkpoint per epoch, as train_run
                snapshot(None)
    model.eval()
    return model, state
