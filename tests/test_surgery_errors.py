"""Every refusal of insert/plan/remove: the message says what and why, the model is untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import TutorialCNN, small_cnn
from _surgery_helpers import assert_unchanged, snapshot
from torch import nn

from attnblocks import (
    AttnBlocksError,
    InvalidArgumentError,
    SelectorError,
    SurgeryError,
)
from attnblocks.surgery import (
    insert_attention,
    insert_se,
    plan_attention,
    plan_se,
    remove_attention,
    remove_se,
)

X = torch.randn(2, 3, 8, 8)


class TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class Head(nn.Module):
    """A model whose tail returns a tuple, an int tensor and a 2D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pair = TupleOut()
        self.argmax = ArgMax()
        self.flat = nn.Flatten()
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.pair(self.conv(x))
        return self.flat(y) + self.argmax(y).flatten(1).float().sum()


class ArgMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=1, keepdim=True)


class IteratesChildren(nn.Module):
    """A custom module whose forward runs every child in order (as some libraries do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


class DenseLikeBlock(nn.ModuleDict):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = layer(x)
        return x


class CustomSequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class NoIdentity(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _aliased() -> nn.Module:
    model = small_cnn()
    model.alias = model[1]
    return model


def _with_plain_layernorm() -> nn.Module:
    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return ChannelsLast()


def _with_scripted_child() -> nn.Module:
    model = small_cnn()
    model[1] = torch.jit.script(nn.BatchNorm2d(8))
    return model


class ReturnsNone(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> None:
        return None


class KeepsOneChannel(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


class BrokenConstructor(nn.Module):
    def __init__(self, channels: int) -> None:
        raise RuntimeError("constructor broke")


class Failing(nn.Module):
    """A block class that builds fine and fails on every input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the block itself broke")


def _conv1d_model() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU())


def _conv3d_model() -> nn.Module:
    return nn.Sequential(nn.Conv3d(3, 8, 1), nn.BatchNorm3d(8), nn.ReLU())


def _with_deleted_block() -> nn.Module:
    """small_cnn with an SE block at '1' deleted by hand (its hook left behind)."""
    model = small_cnn()
    insert_se(model, ["1"])
    del model[1].se
    return model


def _renumbered_sequential() -> nn.Module:
    """An SE block appended to a Sequential that `del seq[0]` then renumbered."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)))
    insert_se(model, ["0"])
    del model[0][0]
    return model


def _foreign_module(model: nn.Module) -> Any:
    return insert_se(model, [nn.BatchNorm2d(8)])  # equal to model[1], but another object


# (id, model factory, call, error class, message fragments)
REFUSALS: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any], type, list[str]]] = [
    (
        "unmatched",
        small_cnn,
        lambda m: insert_se(m, ["1", "bn1"]),
        SelectorError,
        ["insert_se:", "'bn1'", "matches no module", "Closest module names"],
    ),
    (
        "channels-unknown",
        small_cnn,
        lambda m: insert_se(m, ["1", "2"]),
        SurgeryError,
        ["'2' (ReLU)", "from the module alone", "example_input="],
    ),
    (
        "tutorial-shared-relu",
        TutorialCNN,
        lambda m: insert_se(m, ["relu"], example_input=torch.randn(1, 3, 32, 32)),
        SurgeryError,
        ["'relu' (ReLU)", "called 4 times", "reused"],
    ),
    (
        "tutorial-shared-pool",
        TutorialCNN,
        lambda m: insert_se(m, ["bn1", "pool"], example_input=torch.randn(1, 3, 32, 32)),
        SurgeryError,
        ["'pool' (MaxPool2d)", "called 3 times"],
    ),
    (
        "not-called",
        Head,
        lambda m: insert_se(m, ["conv", "unused"], example_input=X),
        SurgeryError,
        ["'unused' (Conv2d)", "not called"],
    ),
    (
        "tuple-output",
        Head,
        lambda m: insert_se(m, ["pair"], example_input=X),
        SurgeryError,
        ["'pair' (TupleOut)", "returns a tuple, not a tensor"],
    ),
    (
        "integer-output",
        Head,
        lambda m: insert_se(m, ["argmax"], example_input=X),
        SurgeryError,
        ["'argmax' (ArgMax)", "torch.int64", "floating"],
    ),
    (
        "not-a-feature-map",
        Head,
        lambda m: insert_se(m, ["flat"], example_input=X),
        SurgeryError,
        ["'flat' (Flatten)", "(2, 256)", "(N, C, *spatial)"],
    ),
    (
        "linear-with-probe",
        small_cnn,
        lambda m: insert_se(m, ["8"], example_input=X),
        SurgeryError,
        ["'8' (Linear)", "(2, 4)"],
    ),
    (
        "channels-last-layernorm",
        _with_plain_layernorm,
        lambda m: insert_se(m, ["norm"], example_input=X),
        SurgeryError,
        ["'norm' (LayerNorm)", "channels-last", "(N, C, *spatial)"],
    ),
    (
        "module-list",
        lambda: nn.Sequential(nn.ModuleList([nn.Conv2d(3, 3, 1)])),
        lambda m: insert_se(m, ["0"]),
        SurgeryError,
        ["'0' (ModuleList)", "container"],
    ),
    (
        "module-dict-with-forward",
        lambda: nn.Sequential(DenseLikeBlock({"a": nn.Conv2d(3, 4, 1)})),
        lambda m: insert_se(m, ["0"], example_input=X),
        SurgeryError,
        ["'0' (DenseLikeBlock)", "container", "iterates over its children"],
    ),
    (
        "sequential-with-own-forward",
        lambda: nn.Sequential(CustomSequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))),
        lambda m: insert_se(m, ["0"]),
        SurgeryError,
        ["'0' (CustomSequential)", "its own forward", "'0.1'"],
    ),
    (
        "iterates-children-caught-after-insertion",
        lambda: nn.Sequential(IteratesChildren()),
        lambda m: insert_se(m, ["0"], example_input=X),
        SurgeryError,
        ["'0' (IteratesChildren)", "ran 2 times", "insertion was undone"],
    ),
    (
        "aliased",
        _aliased,
        lambda m: insert_se(m, ["1"]),
        SurgeryError,
        ["registered under several names", "'1'", "'alias'"],
    ),
    (
        "scripted-child",
        _with_scripted_child,
        lambda m: insert_se(m, ["1"]),
        SurgeryError,
        ["'1'", "ScriptModule"],
    ),
    (
        "attribute-taken",
        small_cnn,
        lambda m: insert_attention(m, ["0"], name="weight"),
        SurgeryError,
        ["'0' (Conv2d)", "already has an attribute 'weight' (Parameter)", "name="],
    ),
    (
        "unknown-block",
        small_cnn,
        lambda m: insert_attention(m, ["1"], block="squeeze"),
        InvalidArgumentError,
        ["insert_attention:", "unknown block 'squeeze'", "'se'"],
    ),
    (
        "bad-init",
        small_cnn,
        lambda m: insert_se(m, ["1"], init="zeros"),
        InvalidArgumentError,
        ["unknown init 'zeros'", "'default', 'identity'"],
    ),
    (
        "identity-unsupported",
        small_cnn,
        lambda m: insert_attention(m, ["1"], block=NoIdentity, init="identity"),
        InvalidArgumentError,
        ["init='identity' is not available for NoIdentity", "supports_identity_init"],
    ),
    (
        "bad-block-option",
        small_cnn,
        lambda m: insert_se(m, ["1", "4"], reduction=0),
        InvalidArgumentError,
        ["insert_se: cannot build SEBlock(8", "module '1'", "reduction"],
    ),
    (
        "unknown-block-option",
        small_cnn,
        lambda m: insert_se(m, ["1"], squeeze=3),
        InvalidArgumentError,
        ["cannot build SEBlock", "squeeze"],
    ),
    (
        "channels-option",
        small_cnn,
        lambda m: insert_se(m, ["1"], channels=8),
        InvalidArgumentError,
        ["channels= cannot be passed", "inferred per site"],
    ),
    (
        "bad-name",
        small_cnn,
        lambda m: insert_attention(m, ["1"], name="my se"),
        InvalidArgumentError,
        ["name must be a valid Python identifier", "'my se'"],
    ),
    (
        "keyword-name",
        small_cnn,
        lambda m: insert_attention(m, ["1"], name="class"),
        InvalidArgumentError,
        ["'class'"],
    ),
    (
        "bad-example-type",
        small_cnn,
        lambda m: insert_se(m, ["2"], example_input=3),
        InvalidArgumentError,
        ["example_input must be a tensor", "got int"],
    ),
    (
        "example-forward-fails",
        small_cnn,
        lambda m: insert_se(m, ["2"], example_input=torch.randn(2, 5, 8, 8)),
        InvalidArgumentError,
        ["forward pass with example_input Tensor(2, 5, 8, 8) failed with RuntimeError"],
    ),
    (
        "plan-refuses-too",
        TutorialCNN,
        lambda m: plan_se(m, ["relu"], example_input=torch.randn(1, 3, 32, 32)),
        SurgeryError,
        ["plan_se:", "called 4 times"],
    ),
    (
        "plan-attention-unmatched",
        small_cnn,
        lambda m: plan_attention(m, ["9"]),
        SelectorError,
        ["plan_attention:", "'9'"],
    ),
    (
        "module-object-of-another-model",
        small_cnn,
        _foreign_module,
        SelectorError,
        ["module object BatchNorm2d(8, eps=1e-05", "matches no module", "copy.deepcopy"],
    ),
    (
        "predicate-of-one-argument",
        small_cnn,
        lambda m: insert_se(m, [lambda name: name == "1"]),
        SelectorError,
        ["predicate", "cannot be called as predicate(name, module)", "(name)"],
    ),
    (
        "predicate-of-three-arguments",
        small_cnn,
        lambda m: plan_se(m, [lambda name, module, depth: True]),
        SelectorError,
        ["plan_se:", "cannot be called as predicate(name, module)", "depth"],
    ),
    (
        "predicate-that-raises",
        small_cnn,
        lambda m: insert_se(m, [lambda name, module: module.num_features == 8]),
        SelectorError,
        ["predicate", "raised AttributeError", "for module '0' (Conv2d)", "True or False"],
    ),
    (
        "cbam-after-conv1d",
        _conv1d_model,
        lambda m: insert_attention(m, ["0"], block="cbam"),
        SurgeryError,
        ["CBAMBlock gates 2D feature maps", "'0' (Conv1d)", "1D feature maps (N, C, L)", "'se'"],
    ),
    (
        "coord-after-batchnorm1d",
        _conv1d_model,
        lambda m: plan_attention(m, ["1"], block="coord"),
        SurgeryError,
        ["CoordAttentionBlock gates 2D", "'1' (BatchNorm1d)", "(N, C) vectors or 1D"],
    ),
    (
        "cbam-after-conv3d-sequential",
        lambda: nn.Sequential(_conv3d_model()),
        lambda m: insert_attention(m, ["0"], block="cbam"),
        SurgeryError,
        ["CBAMBlock gates 2D", "'0' (Sequential)", "3D feature maps (N, C, D, H, W)"],
    ),
    (
        "parametric-ge-after-conv1d",
        _conv1d_model,
        lambda m: insert_attention(m, ["0"], block="ge", variant="theta", extent=2),
        SurgeryError,
        ["GatherExciteBlock gates 2D", "'0' (Conv1d)"],
    ),
    (
        "cbam-after-relu-probed-1d",
        _conv1d_model,
        lambda m: insert_attention(m, ["2"], block="cbam", example_input=torch.randn(2, 3, 9)),
        SurgeryError,
        ["CBAMBlock gates 2D", "'2' (ReLU) returns shape (2, 8, 7) with example_input"],
    ),
    (
        "block-fails-after-insertion",
        small_cnn,
        lambda m: insert_attention(m, ["1", "4"], block=Failing, example_input=X),
        SurgeryError,
        [
            "after insertion, the Failing at '1' (BatchNorm2d) failed",
            "output of shape (2, 8, 8, 8)",
            "RuntimeError: the block itself broke",
            "insertion was undone",
        ],
    ),
    (
        "ge-spatial-size-mismatch-after-insertion",
        small_cnn,
        lambda m: insert_attention(
            m, ["1"], block="ge", variant="theta", spatial_size=4, example_input=X
        ),
        SurgeryError,
        ["the GatherExciteBlock at '1' (BatchNorm2d) failed", "4x4", "insertion was undone"],
    ),
    (
        "block-returns-none-after-insertion",
        small_cnn,
        lambda m: insert_attention(m, ["1"], block=ReturnsNone, example_input=X),
        SurgeryError,
        ["the ReturnsNone at '1' (BatchNorm2d) returned a NoneType", "input's shape", "undone"],
    ),
    (
        "block-changes-the-shape-after-insertion",
        small_cnn,
        lambda m: insert_attention(m, ["1"], block=KeepsOneChannel, example_input=X),
        SurgeryError,
        ["KeepsOneChannel at '1' (BatchNorm2d) returned shape (2, 1, 8, 8)", "then failed"],
    ),
    (
        "block-constructor-raises",
        small_cnn,
        lambda m: insert_attention(m, ["1"], block=BrokenConstructor),
        InvalidArgumentError,
        ["cannot build BrokenConstructor(8", "RuntimeError: constructor broke"],
    ),
    (
        "strict-not-a-bool",
        small_cnn,
        lambda m: plan_se(m, ["1"], strict="no"),
        InvalidArgumentError,
        ["plan_se: strict must be True or False, got 'no'"],
    ),
    (
        "huge-selector-quoted-short",
        small_cnn,
        lambda m: insert_se(m, ["x" * 100_000]),
        SelectorError,
        ["'xxxxxxxx", "...>", "matches no module"],
    ),
    (
        "leftover-hook-of-a-deleted-block",
        _with_deleted_block,
        lambda m: insert_se(m, ["1"]),
        SurgeryError,
        ["'1' (BatchNorm2d)", "deleted by hand", "applied twice", "remove_attention(model)"],
    ),
    (
        "renumbered-sequential-block-name-taken",
        _renumbered_sequential,
        lambda m: insert_attention(m, ["0"], block="cbam", name="se"),
        SurgeryError,
        ["'0' (Sequential)", "already has a block inserted as 'se'"],
    ),
    (
        "renumbered-sequential-no-stacking",
        _renumbered_sequential,
        lambda m: insert_se(m, ["0"]),
        SurgeryError,
        ["'0' (Sequential)", "already has a SEBlock"],
    ),
]


@pytest.mark.parametrize(
    ("build", "call", "error", "fragments"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusal_message_and_atomicity(
    build: Callable[[], nn.Module],
    call: Callable[[nn.Module], Any],
    error: type,
    fragments: list[str],
) -> None:
    model = build()
    before = snapshot(model)
    with pytest.raises(error) as info:
        call(model)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, AttnBlocksError)
    assert_unchanged(model, before)


def test_forward_failure_keeps_the_original_exception_as_cause() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        insert_se(small_cnn(), ["2"], example_input=torch.randn(2, 5, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_double_insertion_is_refused_and_does_not_stack() -> None:
    model = small_cnn()
    insert_se(model, ["1"])
    after_first = snapshot(model)
    with pytest.raises(SurgeryError, match=r"'1' \(BatchNorm2d\) already has a SEBlock"):
        insert_se(model, ["1", "4"])
    with pytest.raises(SurgeryError, match="would stack two blocks"):
        insert_attention(model, ["1"], name="se_again")  # another name, same kind
    assert_unchanged(model, after_first)


def test_double_insertion_through_a_sequential_site() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    insert_se(model, ["0"])
    with pytest.raises(SurgeryError, match="already has a SEBlock"):
        insert_se(model, ["0"])


def test_modules_inside_inserted_blocks_are_never_sites() -> None:
    model = small_cnn()
    insert_se(model, ["1"])
    after_first = snapshot(model)
    with pytest.raises(SurgeryError, match=r"'1\.se\.act' \(ReLU\) belongs to an attention block"):
        insert_attention(model, [nn.ReLU], name="again", example_input=X)
    with pytest.raises(SurgeryError, match=r"'1\.se' \(SEBlock\) belongs to an attention block"):
        insert_attention(model, ["1.se"], name="again", example_input=X)
    assert_unchanged(model, after_first)


def test_script_module_is_refused() -> None:
    scripted = torch.jit.script(small_cnn())
    with pytest.raises(SurgeryError, match=r"torch\.jit\.ScriptModule.*eager"):
        insert_se(scripted, ["1"])
    with pytest.raises(SurgeryError, match="ScriptModule"):
        plan_se(scripted, ["1"])


def test_not_a_module_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"model must be an nn\.Module, got dict"):
        insert_se({}, ["1"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"model must be an nn\.Module, got list"):
        remove_se([])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="remove_attention: unknown block 'nope'"):
        remove_attention(small_cnn(), block="nope")


def test_strict_false_skips_unmatched_selectors_with_a_warning() -> None:
    model = small_cnn()
    with pytest.warns(UserWarning, match="'bn9' matches no module"):
        insert_se(model, ["1", "bn9"], strict=False)
    assert hasattr(model[1], "se")


def test_a_failing_block_is_blamed_not_example_input() -> None:
    model = small_cnn()
    with pytest.raises(SurgeryError) as info:
        insert_attention(model, ["1"], block=Failing, example_input=X)
    assert "example_input must be" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_the_first_forward_is_still_blamed_on_example_input() -> None:
    with pytest.raises(InvalidArgumentError, match="must be something the model accepts"):
        insert_attention(small_cnn(), ["1"], block=Failing, example_input=torch.randn(2, 4, 8, 8))


def _lazy_model() -> nn.Sequential:
    return nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.LazyLinear(4))


def _lazy_state(model: nn.Module) -> tuple[str, list[str], list[bool], list[object]]:
    """What a forward pass would change in a lazy model (its state_dict cannot be cloned)."""
    tensors = [*model.parameters(), *model.buffers()]
    return (
        repr(model),
        [type(m).__name__ for m in model.modules()],
        [torch.nn.parameter.is_lazy(t) for t in tensors],
        [list(m._forward_pre_hooks.values()) for m in model.modules()],
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda m: plan_se(m, ["0"], example_input=X),
        lambda m: insert_se(m, ["0"], example_input=X),
        lambda m: insert_se(m, ["1"], example_input=X),
        lambda m: plan_attention(m, ["2"], block="eca", example_input=X),
    ],
    ids=["plan", "insert-conv", "insert-lazy-batchnorm", "plan-attention"],
)
def test_lazy_models_are_refused_with_example_input_and_stay_lazy(
    call: Callable[[nn.Module], Any],
) -> None:
    model = _lazy_model()
    before = _lazy_state(model)
    with pytest.raises(SurgeryError) as info:
        call(model)
    message = str(info.value)
    for fragment in ["lazy modules", "'0', '1', '3'", "Run one forward pass first"]:
        assert fragment in message, (fragment, message)
    assert _lazy_state(model) == before
    assert all(torch.nn.parameter.is_lazy(p) for p in model.parameters())


def test_lazy_models_take_blocks_whose_channels_the_module_tells() -> None:
    model = _lazy_model()
    model[3] = nn.Identity()
    plan = plan_se(model, ["0"], reduction=4)
    insert_se(model, ["0"], reduction=4)
    assert torch.nn.parameter.is_lazy(model[0].weight)  # nothing ran yet
    assert plan.sites[0].channels == model[0].se.channels == 8
    assert model(X).shape == (2, 8, 6, 6)
    assert type(model[0]) is nn.Conv2d  # materialised by the user's own forward
    remove_se(model)
    assert not hasattr(model[0], "se") and not model[0]._forward_hooks


def test_quoted_values_stay_short() -> None:
    model = small_cnn()
    with pytest.raises(SelectorError) as info:
        insert_se(model, ["x" * 100_000])
    assert len(str(info.value)) < 500
    with pytest.raises(SelectorError, match="layers must be a list") as info:
        insert_se(model, model)  # type: ignore[arg-type]
    assert len(str(info.value)) < 500
