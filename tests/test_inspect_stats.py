"""Running gate statistics and the summary metrics, against direct torch computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _inspect_toys import modes, toy_se_net
from hypothesis import given, settings
from hypothesis import strategies as st

from attnblocks import InvalidArgumentError, InvalidInputError, SelectorError
from attnblocks.inspect import (
    GateStats,
    SiteStats,
    class_specificity,
    gate_statistics,
    record_gates,
    saturation,
)


def _batches(sizes: list[int], channels: int, classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        # offsets around 0.5 with a small spread: a stress case for naive sum-of-squares
        gates = 0.5 + 1e-3 * torch.rand(n, channels, generator=gen)
        gates[:, 0] = torch.rand(n, generator=gen)  # one channel spanning [0, 1]
        labels = torch.randint(0, classes, (n,), generator=gen)
        out.append((gates, labels))
    return out


@settings(deadline=None, max_examples=25)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=6).filter(lambda s: sum(s) >= 2),
    channels=st.integers(1, 6),
    classes=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_running_stats_match_torch(sizes: list[int], channels: int, classes: int, seed: int):
    batches = _batches(sizes, channels, classes, seed)
    stats = GateStats(saturation_threshold=0.6)
    for gates, labels in batches:
        stats.update({"site": gates}, labels)
    all_gates = torch.cat([g for g, _ in batches]).double()
    all_labels = torch.cat([y for _, y in batches])
    s = stats["site"]
    assert s.count == all_gates.shape[0]
    torch.testing.assert_close(s.mean, all_gates.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.std(), all_gates.std(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.std(0), all_gates.std(0, correction=0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.saturation, (all_gates >= 0.6).double().mean(0))
    k = int(all_labels.max()) + 1
    assert s.num_classes == k
    for c in range(k):
        rows = all_gates[all_labels == c]
        assert int(s.class_count[c]) == rows.shape[0]
        if rows.shape[0] == 0:
            assert torch.isnan(s.class_mean[c]).all()
            continue
        torch.testing.assert_close(s.class_mean[c], rows.mean(0), rtol=1e-12, atol=1e-12)
        if rows.shape[0] > 1:
            torch.testing.assert_close(s.class_std()[c], rows.std(0), rtol=1e-9, atol=1e-12)
        else:
            assert torch.isnan(s.class_std()[c]).all()
    direct = class_specificity(all_gates, all_labels)
    torch.testing.assert_close(s.class_specificity(), direct, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        s.class_specificity(per_channel=False),
        class_specificity(all_gates, all_labels, per_channel=False),
        rtol=1e-7,
        atol=1e-9,
    )


def test_merge_equals_one_stream() -> None:
    batches = _batches([5, 3, 6, 4], 3, 3, 7)
    one, a, b = GateStats(), GateStats(), GateStats()
    for i, (g, y) in enumerate(batches):
        one.update({"s": g}, y)
        (a if i % 2 else b).update({"s": g}, y)
    merged = a["s"].merge(b["s"])
    torch.testing.assert_close(merged.mean, one["s"].mean)
    torch.testing.assert_close(merged.std(), one["s"].std())
    torch.testing.assert_close(merged.class_mean, one["s"].class_mean, equal_nan=True)
    torch.testing.assert_close(merged.class_std(), one["s"].class_std(), equal_nan=True)


def test_class_specificity_by_hand() -> None:
    gates = torch.tensor([[0.1, 0.5], [0.3, 0.5], [0.9, 0.5], [0.7, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # channel 0: class means 0.2 and 0.8, grand mean 0.5: between = 0.09, within = 0.01
    spec = class_specificity(gates, labels)
    assert spec[0].item() == pytest.approx(9.0)
    assert spec[1].item() == 0.0  # constant channel
    separated = torch.tensor([[0.2], [0.2], [0.8], [0.8]], dtype=torch.float64)
    assert math.isinf(class_specificity(separated, labels).item())


def test_saturation() -> None:
    gates = torch.tensor([[0.95, 0.1], [0.5, 0.99], [0.91, 0.2]])
    assert saturation(gates).item() == pytest.approx(3 / 6)
    assert saturation(gates, threshold=0.96).item() == pytest.approx(1 / 6)
    torch.testing.assert_close(
        saturation(gates, per_channel=True), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    )
    both = saturation({"a": gates, "b": gates[:1]})
    assert set(both) == {"a", "b"} and both["b"].item() == pytest.approx(0.5)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        saturation(gates, threshold="high")  # type: ignore[arg-type]


def test_gate_statistics_runs_model_and_restores_mode() -> None:
    net = toy_se_net()
    net.stage.bn.eval()
    before = modes(net)
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])) for _ in range(3)]
    stats = gate_statistics(net, data, num_classes=3)
    assert modes(net) == before
    assert list(stats) == ["stem.se", "stage.se"]
    net.eval()
    with torch.no_grad(), record_gates(net) as rec:
        for x, _ in data:
            net(x)
    torch.testing.assert_close(stats["stage.se"].mean, rec.gates["stage.se"].double().mean(0))
    labels = torch.cat([y for _, y in data])
    ref = GateStats.from_gates(rec.gates, labels)
    torch.testing.assert_close(stats["stem.se"].class_mean, ref["stem.se"].class_mean)
    summary = stats.summary()["stage.se"]
    assert summary["count"] == 12 and 0 <= summary["saturation"] <= 1
    assert summary["mean"] == pytest.approx(rec.gates["stage.se"].double().mean().item())
    assert summary["std"] == pytest.approx(rec.gates["stage.se"].double().std().item())
    assert gate_statistics(net, [x for x, _ in data], max_batches=2)["stem.se"].count == 8


def test_errors() -> None:
    stats = GateStats(num_classes=2)
    with pytest.raises(InvalidInputError, match="out of range"):
        stats.update({"s": torch.rand(3, 2)}, torch.tensor([0, 1, 2]))
    with pytest.raises(InvalidInputError, match="got 2 labels for 3 rows"):
        GateStats().update({"s": torch.rand(3, 2)}, torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="integer class indices"):
        GateStats().update({"s": torch.rand(3, 2)}, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(InvalidInputError, match=r"floating \(N, C\)"):
        GateStats().update({"s": torch.rand(3, 2, 2)})
    with pytest.raises(InvalidInputError, match="mapping"):
        GateStats().update(torch.rand(3, 2))  # type: ignore[arg-type]
    stats = GateStats()
    stats.update({"s": torch.rand(3, 2)})
    with pytest.raises(InvalidInputError, match="2 channels"):
        stats["s"].update(torch.rand(3, 4))
    with pytest.raises(InvalidArgumentError, match="the sites are"):
        stats["nope"]
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        GateStats(num_classes=0)
    assert math.isnan(stats.summary()["s"]["specificity"])  # no labels given


def test_update_is_atomic_across_sites() -> None:
    """A batch refused at one site changes no site (each is checked before any commit)."""
    stats = GateStats()
    stats.update({"a": torch.rand(4, 3), "b": torch.rand(4, 5)}, torch.tensor([0, 1, 0, 1]))
    before = {name: (s.count, s.mean, s.class_mean, s.num_classes) for name, s in stats.items()}
    bad_batches = [
        ({"a": torch.rand(4, 3), "b": torch.rand(4, 6)}, None),  # b has 5 channels
        ({"a": torch.rand(4, 3), "b": torch.rand(3, 5)}, [0, 1, 2, 3]),  # 3 rows at b
        ({"a": torch.rand(4, 3), "c": torch.rand(4, 2, 2)}, None),  # a new site, not (N, C)
        ({"a": torch.rand(4, 3), "b": torch.rand(4, 5)}, [0, 1, 2, 10**9]),  # absurd label
    ]
    for gates, labels in bad_batches:
        with pytest.raises(InvalidInputError):
            stats.update(gates, labels)
    assert list(stats) == ["a", "b"]
    for name, (count, mean, class_mean, k) in before.items():
        assert stats[name].count == count and stats[name].num_classes == k
        torch.testing.assert_close(stats[name].mean, mean)
        torch.testing.assert_close(stats[name].class_mean, class_mean, equal_nan=True)
    fixed = GateStats(num_classes=2)
    with pytest.raises(InvalidInputError, match="out of range for num_classes=2"):
        fixed.update({"a": torch.rand(2, 3), "b": torch.rand(2, 3)}, torch.tensor([0, 2]))
    assert len(fixed) == 0


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 1, 0, 2]),
        [0, 1, 0, 2],
        (0, 1, 0, 2),
        torch.tensor([0, 1, 0, 2], dtype=torch.int32),
    ],
    ids=["numpy", "list", "tuple", "int32"],
)
def test_labels_in_any_container_give_per_class_statistics(labels: object) -> None:
    gates = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    expected = GateStats.from_gates({"s": gates}, torch.tensor([0, 1, 0, 2]))
    got = GateStats.from_gates({"s": gates}, labels)  # type: ignore[arg-type]
    assert got.num_classes == 3
    torch.testing.assert_close(got["s"].class_mean, expected["s"].class_mean)
    net = toy_se_net().eval()
    x = torch.randn(4, 3, 8, 8)
    stats = gate_statistics(net, [(x, labels)])
    assert stats.num_classes == 3 and stats["stem.se"].class_count.tolist() == [2, 1, 1]
    assert not math.isnan(stats.summary()["stem.se"]["specificity"])


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (["cat", "dog", "cat", "cat"], "class indices"),
        (np.array([0.0, 1.0, 0.0, 1.0]), "integer class indices"),
        ({"a": 0}, "class indices"),
        (torch.tensor([0, 1, 2, 10**9]), "without num_classes at most 65536"),
        (torch.tensor([0, 1, 2, 3], device="meta"), "meta"),
    ],
)
def test_bad_labels_are_refused_never_dropped(labels: object, match: str) -> None:
    net = toy_se_net().eval()
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(InvalidInputError, match=match):
        gate_statistics(net, [(x, labels)])
    with pytest.raises(InvalidInputError, match=match):
        GateStats().update({"s": torch.rand(4, 3)}, labels)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda net, x: gate_statistics(42, [x]), InvalidArgumentError, "torch.nn.Module, got int"),
        (lambda net, x: gate_statistics(net, None), InvalidArgumentError, "iterable"),
        (lambda net, x: gate_statistics(net, [x], device="nope"), InvalidArgumentError, "device"),
        (lambda net, x: gate_statistics(net, [x], eval_mode="yes"), InvalidArgumentError, "True"),
        (lambda net, x: gate_statistics(net, [x], sites=[]), SelectorError, "sites is empty"),
        (
            lambda net, x: gate_statistics(net, [x], num_classes=10**12),
            InvalidArgumentError,
            "num_classes=1000000000000 is more than",
        ),
        (
            lambda net, x: GateStats().update({"s": torch.rand(2, 3, device="meta")}),
            InvalidInputError,
            "meta",
        ),
        (
            lambda net, x: class_specificity(torch.rand(2, 3), torch.tensor([0, 10**9])),
            InvalidInputError,
            "would mean 1000000001 classes",
        ),
    ],
)
def test_gate_statistics_errors(call: object, error: type[Exception], match: str) -> None:
    net = toy_se_net()
    before = modes(net)
    with pytest.raises(error, match=match):
        call(net, torch.randn(2, 3, 8, 8))  # type: ignore[operator]
    assert modes(net) == before


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((None,), {}, "channels must be a positive int"),
        ((0,), {}, "channels must be a positive int"),
        ((4,), {"threshold": "x"}, "threshold must be a number"),
        ((4,), {"threshold": float("nan")}, "threshold must be finite"),
        ((4,), {"num_classes": -1}, "num_classes"),
        ((4,), {"num_classes": True}, "num_classes"),
        ((4,), {"num_classes": False}, "num_classes"),
        ((4,), {"num_classes": 10**9}, "would not fit in memory"),
        ((10**12,), {}, "channels=1000000000000 .*do not fit in memory"),
    ],
)
def test_site_stats_refuses_bad_arguments_by_name(
    args: tuple[object, ...], kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        SiteStats(*args, **kwargs)  # type: ignore[arg-type]
    assert SiteStats(4).num_classes == 0  # 0 is the default: classes are added as seen
    assert SiteStats(4, num_classes=3).num_classes == 3
