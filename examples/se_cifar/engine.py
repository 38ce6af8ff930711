"""Train and evaluate one arm with one seed: deterministic, resumable, interruptible."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from se_cifar.augment import Augment
from se_cifar.data import Split
from se_cifar.ema import WeightEMA
from se_cifar.recipes import CIFAR10_MEAN, CIFAR10_STD, Recipe

__all__ = [
    "EvalResult",
    "Interrupted",
    "RunState",
    "Trainer",
    "autocast_dtype",
    "evaluate",
    "make_augment",
    "make_scheduler",
    "measure_latency",
    "pick_device",
    "train_run",
    "train_step",
]


class Interrupted(Exception):
    """Training was interrupted (Ctrl-C); a checkpoint was written first."""


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False.")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("--device mps was asked for, but MPS is not available here.")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown --device {name!r}; valid: auto, cpu, cuda, mps.")
    return torch.device(name)


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and _cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    raise ValueError(f"unknown precision {precision!r}; valid: auto, fp32, bf16, fp16.")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_augment(recipe: Recipe) -> Augment:
    """The recipe's batched augmentation pipeline."""
    return Augment(
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=recipe.crop_padding,
        flip=recipe.flip,
        jitter=recipe.jitter,
        rotation=recipe.rotation,
    )


def _seed_of(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % 2**63
    return value


class _StopRequest:
    """The first Ctrl-C (SIGINT) sets a flag that the training loop reads between steps.

    So a checkpoint is never written in the middle of an optimiser step; a second
    Ctrl-C stops at once (the last end-of-epoch checkpoint stays). Only installed in
    the main thread and only over Python's own handler (an ignored SIGINT stays ignored).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Stop(Exception):
    """Raised inside the training loop, at a step boundary, after a Ctrl-C."""


@dataclass
class EvalResult:
    """Test-set loss, accuracy and predictions (and the logits, when asked for)."""

    loss: float
    accuracy: float
    predictions: torch.Tensor
    logits: torch.Tensor | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    augment: Augment,
    device: torch.device,
    *,
    amp: torch.dtype | None,
    channels_last: bool,
    test_flip: bool = False,
    batch_size: int = 1000,
    keep_logits: bool = False,
) -> EvalResult:
    """Cross-entropy and accuracy on ``split``, in eval mode (restored afterwards).

    With ``keep_logits`` the result also holds every image's float32 logits (on the
    CPU), exactly as the accuracy was computed from them.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, preds, kept = 0.0, 0, [], []
    try:
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size].to(device, non_blocking=True)
            labels = split.labels[start : start + batch_size].to(device)
            x = augment(images, None, train=False)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                logits = model(x).float()
                if test_flip:
                    logits = 0.5 * (logits + model(x.flip(-1)).float())
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            pred = logits.argmax(dim=1)
            correct += int((pred == labels).sum())
            preds.append(pred.cpu())
            if keep_logits:
                kept.append(logits.cpu())
    finally:
        model.train(was_training)
    n = len(split)
    logits_all = torch.cat(kept) if keep_logits else None
    return EvalResult(total_loss / n, correct / n, torch.cat(preds), logits_all)


@dataclass
class RunState:
    """Everything a run needs to continue exactly where it stopped."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps inside the current epoch
    history: list[dict[str, float]] = field(default_factory=list)
    iterations: list[tuple[int, int, float]] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    elapsed_s: float = 0.0  # wall time of the completed epochs, setup and evaluation included


def _make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
        )
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; valid: adam, sgd.")


#: The one-cycle schedule's warm-up as a fraction of all steps (OneCycleLR's ``pct_start``).
ONECYCLE_WARMUP = 0.25


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> Any:
    """The recipe's learning-rate schedule for ``recipe.epochs * steps_per_epoch`` steps.

    ``"plateau"`` is ReduceLROnPlateau, stepped once per epoch on the test loss. ``"onecycle"``
    is OneCycleLR (stepped once per batch), whose warm-up peaks at step
    ``ONECYCLE_WARMUP * steps - 1``. Short runs degrade gracefully instead of failing
    inside OneCycleLR: when that peak would come before step 1 (fewer than 8 steps), the
    warm-up ends at step 1 (3 to 7 steps), and 1 or 2 steps train at the constant peak
    learning rate ``recipe.lr``.

    >>> model = nn.Linear(2, 2)
    >>> recipe = Recipe("r", epochs=1, batch_size=8, optimizer="sgd", lr=0.2, schedule="onecycle")
    >>> type(make_scheduler(torch.optim.SGD(model.parameters(), lr=0.2), recipe, 4)).__name__
    'OneCycleLR'
    >>> type(make_scheduler(torch.optim.SGD(model.parameters(), lr=0.2), recipe, 2)).__name__
    'ConstantLR'
    """
    total = recipe.epochs * steps_per_epoch
    if total < 1:
        raise ValueError(
            f"make_scheduler: a run needs at least one step, got epochs={recipe.epochs} x "
            f"steps_per_epoch={steps_per_epoch}."
        )
    if recipe.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", patience=recipe.plateau_patience, factor=recipe.plateau_factor
        )
    if recipe.schedule == "onecycle":
        if total < 3:  # no room for a warm-up and an annealing phase: a constant rate
            return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        warmup = ONECYCLE_WARMUP
        if warmup * total - 1 < 1:  # the peak would be at step 0 (a division by zero) or before
            warmup = 2 / total  # the peak at step 1
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe.lr,
            total_steps=total,
            pct_start=warmup,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    raise ValueError(f"unknown schedule {recipe.schedule!r}; valid: plateau, onecycle.")


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


@dataclass
class Trainer:
    """What a run steps and saves: the model, optimiser, scheduler, EMA and augmentation.

    Attributes:
        model: the model whose weights are saved (unwrapped).
        net: what the training steps call: ``model``, or its DistributedDataParallel
            and/or ``torch.compile`` wrapper.
        recipe: how to train.
        seed: the run's seed.
        optimizer: the optimiser over ``model``'s trained parameters.
        scheduler: the learning-rate scheduler of ``optimizer``.
        ema: the moving average of the weights, or None.
        device: where to train.
        augment: the recipe's augmentation (and test-time normalisation).
        amp: the recipe's autocast dtype on ``device``, or None for float32.
    """

    model: nn.Module
    net: nn.Module
    recipe: Recipe
    seed: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: WeightEMA | None
    device: torch.device
    augment: Augment = field(init=False)
    amp: torch.dtype | None = field(init=False)

    def __post_init__(self) -> None:
        self.augment = make_augment(self.recipe)
        self.amp = autocast_dtype(self.recipe.precision, self.device)

    def checkpoint(
        self, state: Any, aug_gen: torch.Generator | None, **extra: Any
    ) -> dict[str, Any]:
        """The checkpoint dict of a run in ``state``; ``extra`` keys come before ``"seed"``."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": state,
            "torch_rng": torch.get_rng_state(),
            "aug_rng": aug_gen.get_state() if aug_gen is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "recipe": self.recipe.to_dict(),
            **extra,
            "seed": self.seed,
        }

    def evaluate(
        self, split: Split, net: nn.Module | None = None, *, keep_logits: bool = False
    ) -> EvalResult:
        """:func:`evaluate` ``net`` on ``split`` with the recipe's settings.

        ``net`` defaults to the evaluated weights: the EMA's if there is one, else ``model``.
        """
        if net is None:
            net = self.model if self.ema is None else self.ema.shadow
        return evaluate(
            net,
            split,
            self.augment,
            self.device,
            amp=self.amp,
            channels_last=self.recipe.channels_last,
            test_flip=self.recipe.test_flip,
            keep_logits=keep_logits,
        )


def _batches(n: int, batch_size: int, order: torch.Tensor, start: int) -> Iterator[torch.Tensor]:
    steps = math.ceil(n / batch_size)
    for step in range(start, steps):
        yield order[step * batch_size : (step + 1) * batch_size]


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    amp: torch.dtype | None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch; returns the (detached) loss and logits.

    Under DistributedDataParallel the gradients are averaged over the processes in
    ``loss.backward()``, so every process takes the same step.
    """
    with _autocast(x.device, amp):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_run(
    model: nn.Module,
    *,
    recipe: Recipe,
    seed: int,
    train: Split,
    test: Split,
    device: torch.device,
    checkpoint: Path,
    progress: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[RunState], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[nn.Module, RunState]:
    """Train ``model`` with ``recipe``; resume from ``checkpoint`` if it exists.

    A checkpoint is written after every epoch and when the run is interrupted
    (``KeyboardInterrupt``), after which :class:`Interrupted` is raised. The same
    seed gives the same result on the CPU, interrupted and resumed or not (for a
    single process; under torchrun, rank 0 writes the checkpoints and the other
    ranks restart their random streams when resuming inside an epoch).

    With ``recipe.ema`` the evaluated (and, at the end, returned and saved) weights
    are the moving average's. Every epoch's row records ``elapsed_s``: the wall time
    since training started (model set-up, evaluation and checkpoints included,
    summed over resumed sessions), for time-to-accuracy measurements.

    Under torchrun (``world_size > 1``) the model is wrapped in
    DistributedDataParallel, each process trains on its own shard of every epoch's
    permutation (``batch_size`` is per process), and only rank 0 logs and saves.

    Args:
        model: the freshly built model (its weights are replaced on resume).
        recipe: how to train.
        seed: seeds shuffling, augmentation and dropout.
        train: the training split (uint8 images).
        test: the test split.
        device: where to train.
        checkpoint: the checkpoint file of this run.
        progress: a tqdm-like factory ``progress(iterable, total=, desc=)``, or None.
        log: where to print one line per epoch.
        on_epoch: called with the state after every epoch.
        rank: this process's rank under torchrun (0 otherwise).
        world_size: the number of processes.
    """
    session_start = time.perf_counter()
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model)
    if recipe.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    optimizer = _make_optimizer(model, recipe)
    ema = WeightEMA(model, recipe.ema) if recipe.ema > 0 else None
    steps_per_epoch = math.ceil(len(train) // world_size / recipe.batch_size)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    trainer = Trainer(model, net, recipe, seed, optimizer, scheduler, ema, device)
    state = RunState()
    torch.manual_seed(_seed_of(seed, 1, rank))  # dropout: a different stream per process
    aug_state: torch.Tensor | None = None
    if checkpoint.exists():
        blob = torch.load(checkpoint, weights_only=False, map_location="cpu")
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        state = blob["state"]
        torch.set_rng_state(blob["torch_rng"])
        aug_state = blob.get("aug_rng")
        if ema is not None and blob.get("ema") is not None:
            ema.load_state_dict(blob["ema"])
        if rank != 0:  # only rank 0's random streams are saved: others restart theirs
            torch.manual_seed(_seed_of(seed, 1, rank, state.epoch, state.step))
            aug_state = None
        if state.complete:
            return model, state
        log(f"resuming {checkpoint.name} at epoch {state.epoch + 1}, step {state.step}")

    def snapshot(aug_gen: torch.Generator | None) -> None:
        if rank == 0:
            _save(checkpoint, trainer.checkpoint(state, aug_gen))

    with _StopRequest() as stop:
        _train_epochs(
            trainer,
            state,
            stop,
            _Session(
                train=train,
                test=test,
                rank=rank,
                world_size=world_size,
                clock=(state.elapsed_s, session_start),
                snapshot=snapshot,
                progress=progress if rank == 0 else None,
                log=log,
                on_epoch=on_epoch,
            ),
            aug_state,
        )
    return model, state


@dataclass
class _Session:
    """The data and the callbacks of one call of :func:`train_run`."""

    train: Split
    test: Split
    rank: int
    world_size: int
    clock: tuple[float, float]  # (elapsed_s of the earlier sessions, this one's start)
    snapshot: Callable[[torch.Generator | None], None]
    progress: Callable[..., Any] | None
    log: Callable[[str], None]
    on_epoch: Callable[[RunState], None] | None


def _train_epochs(
    trainer: Trainer,
    state: RunState,
    stop: _StopRequest,
    session: _Session,
    aug_state: torch.Tensor | None,
) -> None:
    recipe, seed, rank = trainer.recipe, trainer.seed, session.rank
    train = session.train
    local_n = len(train) // session.world_size
    steps_per_epoch = math.ceil(local_n / recipe.batch_size)
    images = train.images.to(trainer.device)
    labels = train.labels.to(trainer.device)
    while state.epoch < recipe.epochs:
        epoch = state.epoch
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(_seed_of(seed, epoch))
        )
        order = order[rank * local_n : (rank + 1) * local_n].to(trainer.device)
        aug_gen = torch.Generator().manual_seed(_seed_of(seed, epoch, rank, 7, state.step))
        if aug_state is not None and state.step > 0:
            aug_gen.set_state(aug_state)
        aug_state = None
        sums = state.epoch_sums or {"loss": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0}
        trainer.net.train()
        batches: Any = _batches(local_n, recipe.batch_size, order, state.step)
        if session.progress is not None:
            batches = session.progress(
                batches,
                total=steps_per_epoch,
                initial=state.step,
                desc=f"epoch {epoch + 1}/{recipe.epochs}",
                leave=False,
            )
        tick = time.perf_counter()
        try:
            for index in batches:
                if stop.requested:
                    raise _Stop
                x = trainer.augment(images[index], aug_gen, train=True)
                y = labels[index]
                if recipe.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss, logits = train_step(
                    trainer.net,
                    trainer.optimizer,
                    x,
                    y,
                    amp=trainer.amp,
                    label_smoothing=recipe.label_smoothing,
                )
                if recipe.schedule == "onecycle":
                    trainer.scheduler.step()
                if trainer.ema is not None:
                    trainer.ema.update(trainer.model)
                value = float(loss)
                state.iterations.append((epoch, state.step, value))
                sums["loss"] += value * len(index)
                sums["correct"] += float((logits.argmax(1) == y).sum())
                sums["seen"] += len(index)
                state.step += 1
                if hasattr(batches, "set_postfix") and state.step % 20 == 0:
                    batches.set_postfix(loss=f"{value:.3f}")
        except _Stop:
            sums["time"] += time.perf_counter() - tick
            state.epoch_sums = sums
            session.snapshot(aug_gen)
            raise Interrupted(f"interrupted at epoch {epoch + 1}, step {state.step}") from None
        except KeyboardInterrupt:
            raise Interrupted(
                f"stopped at once in epoch {epoch + 1} (second Ctrl-C); the checkpoint of "
                f"epoch {epoch} is kept"
            ) from None
        finally:
            if hasattr(batches, "close"):
                batches.close()
        sums["time"] += time.perf_counter() - tick
        result = trainer.evaluate(session.test)
        if recipe.schedule == "plateau":
            trainer.scheduler.step(result.loss)
        row = {
            "epoch": epoch + 1,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "train_loss": sums["loss"] / max(1.0, sums["seen"]),
            "train_acc": sums["correct"] / max(1.0, sums["seen"]),
            "test_loss": result.loss,
            "test_acc": result.accuracy,
            "epoch_time_s": sums["time"],
            "images_per_s": sums["seen"] * session.world_size / max(1e-9, sums["time"]),
        }
        state.epoch += 1
        state.step = 0
        state.epoch_sums = {}
        state.complete = state.epoch >= recipe.epochs
        if state.complete and trainer.ema is not None:
            trainer.model.load_state_dict(trainer.ema.shadow.state_dict())  # evaluated weights
        row["elapsed_s"] = session.clock[0] + time.perf_counter() - session.clock[1]
        state.elapsed_s = row["elapsed_s"]
        state.history.append(row)
        session.snapshot(None)
        if rank == 0:
            session.log(
                f"epoch {epoch + 1:3d}/{recipe.epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.4f}  test loss {row['test_loss']:.4f} "
                f"acc {row['test_acc']:.4f}  lr {row['lr']:.2e}  {row['epoch_time_s']:.1f}s"
            )
        if session.on_epoch is not None:
            session.on_epoch(state)
        if stop.requested and not state.complete:
            raise Interrupted(f"interrupted after epoch {epoch + 1}")


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    device: torch.device,
    *,
    batch_size: int,
    amp: torch.dtype | None,
    channels_last: bool,
    repeats: int = 20,
    image_size: int = 32,
) -> dict[str, float]:
    """Median inference latency (ms) and throughput (images/s) at ``batch_size``."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    try:
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            with _autocast(device, amp):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - tick)
    finally:
        model.train(was_training)
    median = sorted(times)[len(times) // 2]
    return {"latency_ms": median * 1000.0, "images_per_s": batch_size / median}
