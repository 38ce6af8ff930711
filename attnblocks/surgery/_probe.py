"""Run one forward pass with an example input and record what chosen modules return.

The probe runs the model in eval mode under ``torch.no_grad()`` (so batch-norm
running statistics are not updated and dropout is off), restores every module's
``training`` flag exactly afterwards and removes its hooks even when the forward
pass fails. It counts how often each chosen module is called: a module object
reused at several places of the network (the tutorial CNN's single ``nn.ReLU``) is
called more than once and cannot host an attention block safely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError, SurgeryError
from attnblocks._modes import evaluating

__all__ = ["ExampleInput", "OutputRecord", "ProbeResult", "describe_example_input", "run_probe"]

#: What ``example_input`` may be: one tensor (``model(x)``), a tuple or list of
#: positional arguments (``model(*args)``) or a dict of keyword arguments
#: (``model(**kwargs)``).
ExampleInput = torch.Tensor | Sequence[Any] | Mapping[str, Any]


@dataclass
class OutputRecord:
    """What one module returned during the probe (from its first call)."""

    calls: int = 0
    type_name: str = ""
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    input_shape: tuple[int, ...] | None = None  # of the first call's first argument

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None


@dataclass
class ProbeResult:
    """Records per chosen module (same order as given) and the model's MACs if counted."""

    records: list[OutputRecord] = field(default_factory=list)
    model_macs: int | None = None


def describe_example_input(example_input: object) -> str:
    """A short description of an example input for messages.

    >>> import torch
    >>> describe_example_input((torch.zeros(1, 3, 8, 8), 2))
    'tuple(Tensor(1, 3, 8, 8), int)'
    """
    if isinstance(example_input, torch.Tensor):
        return f"Tensor{tuple(example_input.shape)}"
    if isinstance(example_input, Mapping):
        inner = ", ".join(f"{k}={describe_example_input(v)}" for k, v in example_input.items())
        return f"dict({inner})"
    if isinstance(example_input, (tuple, list)):
        inner = ", ".join(describe_example_input(v) for v in example_input)
        return f"{type(example_input).__name__}({inner})"
    return type(example_input).__name__


def _call(model: nn.Module, example_input: object) -> object:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


class _Enter:
    """A forward pre-hook that notes which recorded module is running (innermost last)."""

    def __init__(self, index: int, record: OutputRecord, running: list[int]) -> None:
        self.index, self.record, self.running = index, record, running

    def __call__(self, module: nn.Module, args: tuple[object, ...]) -> None:
        self.running.append(self.index)
        if self.record.input_shape is None and args and isinstance(args[0], torch.Tensor):
            self.record.input_shape = tuple(args[0].shape)


class _Recorder:
    """A forward hook that counts calls and keeps the first output's metadata."""

    def __init__(self, record: OutputRecord, running: list[int] | None = None) -> None:
        self.record = record
        self.running = running

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if self.running:
            self.running.pop()
        record = self.record
        record.calls += 1
        if record.calls > 1:
            return
        record.type_name = type(output).__name__
        if isinstance(output, torch.Tensor):
            record.shape = tuple(output.shape)
            record.dtype = output.dtype
            record.device = output.device


def run_probe(
    model: nn.Module,
    example_input: object,
    modules: Sequence[nn.Module],
    *,
    owner: str,
    count_macs: bool = False,
    describe_failure: Callable[[int | None, Sequence[OutputRecord], Exception], str] | None = None,
) -> ProbeResult:
    """Run ``model`` once on ``example_input`` and record each module's output.

    Args:
        model: the model to run; it is left exactly as it was (training flags
            included).
        example_input: a tensor, a tuple/list of positional arguments or a dict of
            keyword arguments for ``model``.
        modules: the modules whose outputs to record.
        owner: the public function running the probe, used in messages.
        count_macs: also count the model's multiply-accumulates in matrix
            multiplications and convolutions (:mod:`torch.utils.flop_counter`).
        describe_failure: if given, a failing forward pass raises a
            :class:`~attnblocks.SurgeryError` with the message this returns, instead
            of blaming ``example_input``. It is called with the index of the
            innermost of ``modules`` that was running when the exception was raised
            (None if none was), the records so far and the exception.

    Returns:
        One :class:`OutputRecord` per module, in the given order.

    Raises:
        InvalidArgumentError: if ``example_input`` has an unsupported type or the
            forward pass fails (the original exception is chained).
        SurgeryError: if the forward pass fails and ``describe_failure`` is given.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> relu = nn.ReLU()
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), relu, nn.Conv2d(4, 4, 1), relu)
        >>> record = run_probe(net, torch.zeros(1, 3, 5, 5), [relu], owner="demo").records[0]
        >>> record.calls, record.shape
        (2, (1, 4, 5, 5))
    """
    if not isinstance(example_input, (torch.Tensor, Mapping, tuple, list)):
        raise InvalidArgumentError(
            f"{owner}: example_input must be a tensor, a tuple/list of positional arguments "
            f"or a dict of keyword arguments, got {type(example_input).__name__}."
        )
    result = ProbeResult(records=[OutputRecord() for _ in modules])
    handles = []
    running: list[int] = []  # indices of the recorded modules running now
    try:
        for index, (module, record) in enumerate(zip(modules, result.records, strict=True)):
            handles.append(module.register_forward_pre_hook(_Enter(index, record, running)))
            handles.append(module.register_forward_hook(_Recorder(record, running)))
        with evaluating(model), torch.no_grad():
            if count_macs:
                from torch.utils.flop_counter import FlopCounterMode  # slow import: lazy

                counter = FlopCounterMode(display=False)
                with counter:
                    _call(model, example_input)
                result.model_macs = int(counter.get_total_flops()) // 2
            else:
                _call(model, example_input)
    except Exception as err:
        if describe_failure is not None:
            culprit = running[-1] if running else None
            raise SurgeryError(describe_failure(culprit, result.records, err)) from err
        raise InvalidArgumentError(
            f"{owner}: the forward pass with example_input "
            f"{describe_example_input(example_input)} failed with {type(err).__name__}: "
            f"{err}. example_input must be something the model accepts, e.g. a batch "
            "of one image on the model's device."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return result
