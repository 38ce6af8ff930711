"""The retrofit experiment (examples/retrofit.py) end to end on a tiny generated ImageFolder."""

from __future__ import annotations

import csv
import doctest
import json
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import _cifar_example
import pytest
import retrofit
import torch
from safetensors.torch import load_file
from se_cifar import finetune
from se_cifar.data import load_cifar10
from se_cifar.engine import Interrupted, evaluate, make_augment, train_run
from se_cifar.finetune import ARMS, build_arm, finetune_run
from se_cifar.models import build_model
from se_cifar.recipes import get_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny ImageFolder and a finished baseline checkpoint trained on it (2 epochs)."""
    root = tmp_path_factory.mktemp("retrofit")
    data = _cifar_example.make_image_folder(root / "data")
    train, test = load_cifar10(data)
    torch.manual_seed(0)
    checkpoint = root / "base" / "checkpoints" / "baseline-seed0.pt"
    train_run(
        build_model("baseline"),
        recipe=get_recipe("fast", epochs=2, batch_size=16),
        seed=0,
        train=train,
        test=test,
        device=torch.device("cpu"),
        checkpoint=checkpoint,
        log=lambda _: None,
    )
    return data, checkpoint


def test_docstring_examples() -> None:
    result = doctest.testmod(finetune)
    assert result.attempted > 0 and result.failed == 0


def test_the_experiment_end_to_end(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    data, checkpoint = tiny
    out = tmp_path / "run"
    argv = ["--base", str(checkpoint.parents[1]), "--data-dir", str(data), "--out", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--epochs", "2", "--seeds", "2"]
    argv += ["--early-evals", "1", "--evals-per-epoch", "1", "--set", "batch_size=20"]
    argv += ["--no-progress"]
    assert retrofit.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    assert list(arms) == list(ARMS)
    images = summary["test_images"]
    # step 0: the identity arms (and the untouched control) give the baseline's logits exactly
    for name in ("control", "se_identity", "se_identity_attn"):
        assert arms[name]["step0_logits_equal_to_baseline"] == [True, True], name
        assert arms[name]["step0_same_predictions"] == [images, images]
        assert arms[name]["step0_test_acc"] == [summary["baseline_test_acc"]] * 2
    # the random init changes the network (the logits, if not every prediction)
    assert arms["se_random"]["step0_logits_equal_to_baseline"] == [False, False]
    assert all(d > 0 for d in arms["se_random"]["step0_max_abs_logit_difference"])
    # only the attention is trained in arm d; the others train everything
    assert arms["se_identity_attn"]["trainable_params"] < 3000
    assert arms["se_identity"]["trainable_params"] == arms["se_identity"]["params"]
    assert set(summary["comparisons"]) == {"se_identity", "se_random", "se_identity_attn"}
    # every arm and seed is evaluated at the same steps, from step 0 to the end
    with (out / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    steps = {
        (r["arm"], r["seed"]): [int(x["step"]) for x in rows if (x["arm"], x["seed"]) == key]
        for r in rows
        for key in [(r["arm"], r["seed"])]
    }
    assert len(steps) == 8 and len({tuple(s) for s in steps.values()}) == 1
    first = next(iter(steps.values()))
    assert first == [0, 1, 3, 6]  # 60 images / 20 = 3 steps per epoch
    # the attention file holds only the blocks, far smaller than the model
    assert arms["se_identity"]["attention_bytes"] < arms["se_identity"]["model_bytes"] / 50
    assert (out / "retrofit.png").stat().st_size > 10_000
    # --report rebuilds the same summary from the run folder
    assert retrofit.main(["--report", str(out), "--no-plots"]) == 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_attention_only_arm_changes_nothing_but_the_blocks(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    data, checkpoint = tiny
    out = tmp_path / "run"
    argv = ["--base", str(checkpoint), "--data-dir", str(data), "--out", str(out), "--seeds", "1"]
    argv += ["--arms", "se_identity_attn", "--epochs", "2", "--no-progress", "--no-plots"]
    assert retrofit.main(argv) == 0
    base = load_file(str(out / "sizes" / "baseline.safetensors"))
    tuned = load_file(str(out / "sizes" / "se_identity_attn-seed0.safetensors"))
    for key, value in base.items():  # weights and BatchNorm statistics untouched, bit for bit
        assert torch.equal(tuned[key], value), key
    added = sorted(set(tuned) - set(base))
    assert added and all(".relu.se." in key for key in added)
    # the blocks did learn: no longer the identity init (fc1.weight starts at exactly 0)
    assert any(tuned[k].abs().sum() > 0 for k in added if k.endswith("fc1.weight"))
    # and the baseline + the saved attention file give the fine-tuned model back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["se_identity_attn"]["reloaded_equal"] == [True]


class _StopAfter:
    """A progress wrapper that presses Ctrl-C (sends SIGINT) after ``n`` steps."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, iterable: Iterable[Any], **_: object) -> Iterator[Any]:
        for item in iterable:
            if self.left == 0:
                signal.raise_signal(signal.SIGINT)
            self.left -= 1
            yield item


@pytest.mark.parametrize("arm", ["se_random", "se_identity_attn"])
def test_interrupt_and_resume_give_the_same_run(
    tiny: tuple[Path, Path], tmp_path: Path, arm: str
) -> None:
    data, checkpoint = tiny
    train, test = load_cifar10(data)
    base_state, _ = retrofit.load_base(checkpoint)
    recipe = get_recipe("fast", epochs=2, batch_size=16, lr=0.02, precision="fp32")
    base = build_model("baseline")
    base.load_state_dict(base_state)
    reference = evaluate(
        base, test, make_augment(recipe), torch.device("cpu"), amp=None,
        channels_last=False, test_flip=recipe.test_flip, keep_logits=True,
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        arm=ARMS[arm],
        recipe=recipe,
        seed=3,
        train=train,
        test=test,
        device=torch.device("cpu"),
        reference=reference,
        early=(1,),
        log=lambda _: None,
    )

    def model() -> torch.nn.Module:
        return build_arm(ARMS[arm], base_state, num_classes=10, seed=3)

    straight, state = finetune_run(model(), checkpoint=tmp_path / "a.pt", **kwargs)
    with pytest.raises(Interrupted):  # inside the first epoch, between two evaluations
        finetune_run(model(), checkpoint=tmp_path / "b.pt", progress=_StopAfter(3), **kwargs)
    with pytest.raises(Interrupted):  # inside the second epoch
        finetune_run(model(), checkpoint=tmp_path / "b.pt", progress=_StopAfter(2), **kwargs)
    torch.manual_seed(123)  # the resumed run must not depend on the global seed
    resumed, state_b = finetune_run(model(), checkpoint=tmp_path / "b.pt", **kwargs)
    assert state_b.complete and state_b.step == state.step == 8
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    keys = ("step", "test_acc", "test_loss", "train_loss")
    assert [[r[k] for k in keys] for r in state.history] == [
        [r[k] for k in keys] for r in state_b.history
    ]
    assert state.check == state_b.check


def test_time_steps_times_every_arm(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, checkpoint = tiny
    argv = ["--base", str(checkpoint), "--time-steps", "1", "--out", str(tmp_path)]
    assert retrofit.main([*argv, "--arms", "control,se_identity_attn"]) == 0
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert set(timing["median_seconds_per_step"]) == {"control", "se_identity_attn"}
    assert len(timing["seconds_per_step"]["control"]) == timing["rounds"] == 5
    assert timing["ratio_to_control"]["control"] == 1.0


def test_the_command_line_resumes_after_ctrl_c(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, checkpoint = tiny
    argv = ["--base", str(checkpoint), "--data-dir", str(data), "--seeds", "1", "--epochs", "2"]
    argv += ["--arms", "control,se_identity_attn", "--set", "batch_size=20", "--no-plots"]
    argv += ["--evals-per-epoch", "1", "--early-evals", "1", "--no-progress"]
    assert retrofit.main([*argv, "--out", str(tmp_path / "a")]) == 0
    monkeypatch.setattr(retrofit, "progress_factory", lambda enabled: _StopAfter(4))
    assert retrofit.main([*argv, "--out", str(tmp_path / "b")]) == 130  # inside epoch 2
    monkeypatch.undo()
    assert retrofit.main(["--resume", str(tmp_path / "b"), "--no-plots", "--no-progress"]) == 0

    def curves(run: str) -> list[tuple[str, ...]]:
        with (tmp_path / run / "curves.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        return [(r["arm"], r["step"], r["test_acc"], r["test_loss"]) for r in rows]

    assert curves("a") == curves("b") and len(curves("a")) == 2 * 4
