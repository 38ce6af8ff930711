"""Running gate statistics per site and channel, without keeping every batch.

Means and variances are merged batch by batch with the parallel algorithm of Chan,
Golub and LeVeque (1979), the batch form of Welford's update, in float64, so the
result matches a two-pass computation over all gates to rounding error however many
batches are merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_bool, check_positive_int
from attnblocks.inspect._buffer import check_store_device
from attnblocks.inspect._gates import record_gates
from attnblocks.inspect._metrics import (
    check_gates,
    check_labels,
    check_num_classes,
    check_threshold,
    specificity_from_moments,
)
from attnblocks.inspect._sites import Selectors
from attnblocks.inspect._state import eval_mode as _eval_mode

__all__ = ["GateStats", "Labels", "SiteStats", "gate_statistics"]

#: Class labels: a 1-D integer tensor, or a list or numpy array of class indices.
Labels = torch.Tensor | Sequence[int]


def _merge(
    n_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of two (count, mean, M2) summaries; counts broadcast over C."""
    n = n_a + n_b
    safe = n.clamp(min=1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return n, mean, m2


def _batch_moments(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = g.mean(0)
    dev = g - mean
    return mean, (dev * dev).sum(0)


class SiteStats:
    """Running statistics of one site's gates: per channel, overall and per class.

    Built and fed by :class:`GateStats`; read its properties. All values are float64
    tensors on the CPU.

    Attributes:
        channels: the number of channels ``C``.
        threshold: the saturation threshold.
    """

    def __init__(self, channels: int, *, threshold: float = 0.9, num_classes: int = 0) -> None:
        owner = "SiteStats"
        self.channels = check_positive_int(channels, "channels", owner=owner)
        self.threshold = check_threshold(threshold, owner=owner)
        if not (type(num_classes) is int and num_classes == 0):  # 0: classes added as seen
            num_classes = check_num_classes(num_classes, owner=owner) or 0
        f64 = torch.float64
        self._n = torch.zeros((), dtype=f64)
        try:  # four (C,) and two (K, C) float64 tables
            self._mean = torch.zeros(self.channels, dtype=f64)
            self._m2 = torch.zeros(self.channels, dtype=f64)
            self._saturated = torch.zeros(self.channels, dtype=f64)
            self._class_n = torch.zeros(num_classes, dtype=f64)
            self._class_mean = torch.zeros(num_classes, self.channels, dtype=f64)
            self._class_m2 = torch.zeros(num_classes, self.channels, dtype=f64)
        except RuntimeError as err:  # out of memory
            raise InvalidArgumentError(
                f"{owner}: channels={self.channels} and num_classes={num_classes} need "
                f"tables that do not fit in memory ({' '.join(str(err).split())[:120]})."
            ) from None

    def _grow(self, num_classes: int) -> None:
        extra = num_classes - self._class_n.numel()
        if extra > 0:
            self._class_n = torch.cat([self._class_n, self._class_n.new_zeros(extra)])
            pad = self._class_mean.new_zeros(extra, self.channels)
            self._class_mean = torch.cat([self._class_mean, pad])
            self._class_m2 = torch.cat([self._class_m2, pad])

    def update(self, gates: torch.Tensor, labels: Labels | None = None) -> None:
        """Fold in a batch of ``(n, C)`` gates, with ``(n,)`` class labels if known.

        The batch is checked in full before anything changes: a refused batch leaves
        the statistics as they were.
        """
        self._fold(self._prepare(gates, labels, owner="SiteStats.update"))

    def _prepare(
        self,
        gates: object,
        labels: object,
        *,
        owner: str,
        name: str = "gates",
        num_classes: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check a batch and return it as float64 CPU gates and int64 CPU labels."""
        g = check_gates(gates, owner=owner, name=name)
        if g.shape[1] != self.channels:
            raise InvalidInputError(
                f"{owner}: this site has {self.channels} channels, got {name} of shape "
                f"{tuple(g.shape)}."
            )
        y = None
        if labels is not None:
            y = check_labels(labels, g.shape[0], owner=owner, num_classes=num_classes).cpu()
        return g.detach().to(device="cpu", dtype=torch.float64), y

    def _fold(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Fold in a batch :meth:`_prepare` accepted (nothing here can fail on the input)."""
        g, y = batch
        if g.shape[0] == 0:
            return
        mean_b, m2_b = _batch_moments(g)
        n_b = torch.tensor(float(g.shape[0]), dtype=torch.float64)
        self._n, self._mean, self._m2 = _merge(self._n, self._mean, self._m2, n_b, mean_b, m2_b)
        self._saturated += (g >= self.threshold).sum(0)
        if y is None:
            return
        self._grow(int(y.max()) + 1)
        k = self._class_n.numel()
        cn_b = torch.bincount(y, minlength=k).to(torch.float64)
        sums = torch.zeros(k, self.channels, dtype=torch.float64).index_add_(0, y, g)
        cmean_b = sums / cn_b.clamp(min=1)[:, None]
        dev = g - cmean_b[y]
        cm2_b = torch.zeros_like(sums).index_add_(0, y, dev * dev)
        self._class_n, self._class_mean, self._class_m2 = _merge(
            self._class_n[:, None],
            self._class_mean,
            self._class_m2,
            cn_b[:, None],
            cmean_b,
            cm2_b,
        )
        self._class_n = self._class_n[:, 0]

    def merge(self, other: SiteStats) -> SiteStats:
        """Fold in the statistics of ``other`` (e.g. from another process); returns self."""
        if not isinstance(other, SiteStats) or other.channels != self.channels:
            raise InvalidArgumentError(
                f"SiteStats.merge: need a SiteStats with {self.channels} channels, got {other!r}."
            )
        if other.threshold != self.threshold:
            raise InvalidArgumentError(
                f"SiteStats.merge: saturation thresholds differ ({self.threshold} vs "
                f"{other.threshold})."
            )
        self._n, self._mean, self._m2 = _merge(
            self._n, self._mean, self._m2, other._n, other._mean, other._m2
        )
        self._saturated = self._saturated + other._saturated
        k = max(self._class_n.numel(), other._class_n.numel())
        self._grow(k)
        other_n = torch.cat([other._class_n, other._class_n.new_zeros(k - other._class_n.numel())])
        pad = self._class_mean.new_zeros(k - other._class_n.numel(), self.channels)
        n, self._class_mean, self._class_m2 = _merge(
            self._class_n[:, None],
            self._class_mean,
            self._class_m2,
            other_n[:, None],
            torch.cat([other._class_mean, pad]),
            torch.cat([other._class_m2, pad]),
        )
        self._class_n = n[:, 0]
        return self

    @property
    def count(self) -> int:
        """How many gate rows (samples) have been folded in."""
        return int(self._n)

    @property
    def mean(self) -> torch.Tensor:
        """``(C,)`` mean gate per channel (NaN before any update)."""
        return self._mean.clone() if self.count else torch.full_like(self._mean, float("nan"))

    def var(self, correction: int = 1) -> torch.Tensor:
        """``(C,)`` variance per channel, dividing by ``count - correction`` like
        :func:`torch.var` (NaN when that is not positive)."""
        dof = self._n - correction
        if dof <= 0:
            return torch.full_like(self._m2, float("nan"))
        return self._m2 / dof

    def std(self, correction: int = 1) -> torch.Tensor:
        """``(C,)`` standard deviation per channel, like :func:`torch.std`."""
        return self.var(correction).sqrt()

    @property
    def num_classes(self) -> int:
        """The number of classes tracked (highest label seen + 1, or ``num_classes``)."""
        return int(self._class_n.numel())

    @property
    def class_count(self) -> torch.Tensor:
        """``(K,)`` labelled samples per class (int64)."""
        return self._class_n.to(torch.int64)

    @property
    def class_mean(self) -> torch.Tensor:
        """``(K, C)`` mean gate per class and channel; NaN rows for unseen classes."""
        out = self._class_mean.clone()
        out[self._class_n == 0] = float("nan")
        return out

    def class_std(self, correction: int = 1) -> torch.Tensor:
        """``(K, C)`` standard deviation per class and channel (NaN where undefined)."""
        dof = (self._class_n - correction)[:, None]
        out = self._class_m2 / dof.clamp(min=1)
        out[(dof <= 0).expand_as(out)] = float("nan")
        return out.sqrt()

    @property
    def saturation(self) -> torch.Tensor:
        """``(C,)`` share of gates ``>= threshold`` per channel (see :func:`saturation`)."""
        if not self.count:
            return torch.full_like(self._saturated, float("nan"))
        return self._saturated / self._n

    def class_specificity(self, *, per_channel: bool = True) -> torch.Tensor:
        """Between- / within-class variance over the labelled samples, as
        :func:`class_specificity` computes it from all gates at once."""
        return specificity_from_moments(
            self._class_n, self._class_mean, self._class_m2, per_channel=per_channel
        )

    def __repr__(self) -> str:
        return (
            f"SiteStats(channels={self.channels}, count={self.count}, "
            f"num_classes={self.num_classes}, threshold={self.threshold})"
        )


class GateStats(Mapping[str, SiteStats]):
    """Running gate statistics for every site: a mapping ``{site: SiteStats}``.

    Feed it batch by batch with :meth:`update` (e.g. from
    :meth:`GateRecorder.pop`), or let :func:`gate_statistics` run a data loader.
    Memory stays ``O(sites x classes x channels)`` whatever the number of samples.

    Args:
        num_classes: the number of classes, if known (labels must then be smaller);
            ``None`` grows the class tables as new labels appear.
        saturation_threshold: gates ``>= saturation_threshold`` count as saturated.

    Example:
        >>> from attnblocks.inspect import GateStats
        >>> import torch
        >>> stats = GateStats(num_classes=3)
        >>> for _ in range(4):
        ...     gates = {"layer1.se": torch.rand(8, 16), "layer2.se": torch.rand(8, 32)}
        ...     stats.update(gates, labels=torch.randint(0, 3, (8,)))
        >>> stats["layer2.se"].count, tuple(stats["layer2.se"].class_mean.shape)
        (32, (3, 32))
        >>> sorted(stats.summary()["layer1.se"])
        ['count', 'mean', 'saturation', 'specificity', 'std']
    """

    def __init__(
        self, *, num_classes: int | None = None, saturation_threshold: float = 0.9
    ) -> None:
        owner = "GateStats"
        self._fixed_classes = check_num_classes(num_classes, owner=owner)
        self.saturation_threshold = check_threshold(saturation_threshold, owner=owner)
        self._sites: dict[str, SiteStats] = {}

    @classmethod
    def from_gates(
        cls,
        gates: Mapping[str, torch.Tensor],
        labels: Labels | None = None,
        **kwargs: Any,
    ) -> GateStats:
        """Build statistics from gates already recorded (e.g. ``rec.gates``) in one go."""
        stats = cls(**kwargs)
        stats.update(gates, labels)
        return stats

    @property
    def num_classes(self) -> int:
        """Classes tracked: ``num_classes`` if given, else the highest label seen + 1."""
        if self._fixed_classes is not None:
            return self._fixed_classes
        return max((s.num_classes for s in self._sites.values()), default=0)

    def update(self, gates: Mapping[str, torch.Tensor], labels: Labels | None = None) -> None:
        """Fold in one batch: ``{site: (n, C) gates}`` and optionally ``(n,)`` labels.

        ``labels`` may be a tensor, a numpy array or a list of class indices. Every
        site's batch is checked before any site changes, so a refused batch (a wrong
        channel count at one site, a label out of range) leaves the statistics as they
        were.
        """
        owner = "GateStats.update"
        if not isinstance(gates, Mapping):
            raise InvalidInputError(
                f"{owner}: gates must be a mapping {{site name: (N, C) tensor}} such as "
                f"rec.gates or rec.pop(), got {type(gates).__name__}."
            )
        staged: list[tuple[str, SiteStats, tuple[torch.Tensor, torch.Tensor | None]]] = []
        for name, g in gates.items():
            site = self._sites.get(name)
            if site is None:
                shown = f"gates[{name!r}]"
                channels = check_gates(g, owner=owner, name=shown).shape[1]
                site = SiteStats(channels, threshold=self.saturation_threshold)
            batch = site._prepare(
                g,
                labels,
                owner=owner if labels is None else f"{owner} (site {name!r})",
                name=f"gates[{name!r}]",
                num_classes=self._fixed_classes,
            )
            staged.append((name, site, batch))
        for name, site, batch in staged:  # everything was accepted: commit
            self._sites.setdefault(name, site)._fold(batch)
        k = self.num_classes
        for site in self._sites.values():
            site._grow(k)

    def __getitem__(self, site: str) -> SiteStats:
        try:
            return self._sites[site]
        except KeyError:
            raise InvalidArgumentError(
                f"GateStats: no statistics for site {site!r}; the sites are {list(self._sites)}."
            ) from None

    def __contains__(self, site: object) -> bool:
        return site in self._sites

    def get(self, site: str, default: Any = None) -> Any:  # type: ignore[override]
        """The :class:`SiteStats` of ``site``, or ``default`` if there is none."""
        return self._sites.get(site, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def summary(self) -> dict[str, dict[str, float]]:
        """One row of numbers per site: ``count``, ``mean`` (of all gates), ``std`` (of all
        gates, pooled over channels), ``saturation`` (share of gates near 1) and
        ``specificity`` (between- / within-class variance summed over channels; NaN
        without labels)."""
        out = {}
        for name, s in self._sites.items():
            n = max(s.count, 1)
            total_m2 = s._m2.sum() + (n * (s._mean - s._mean.mean()) ** 2).sum()
            pooled = (total_m2 / max(n * s.channels - 1, 1)).sqrt()
            labelled = bool(s._class_n.sum() > 0)
            out[name] = {
                "count": float(s.count),
                "mean": float(s.mean.mean()),
                "std": float(pooled) if s.count else float("nan"),
                "saturation": float(s.saturation.mean()),
                "specificity": float(s.class_specificity(per_channel=False))
                if labelled
                else float("nan"),
            }
        return out

    def __repr__(self) -> str:
        return (
            f"GateStats(sites={list(self._sites)}, num_classes={self.num_classes}, "
            f"saturation_threshold={self.saturation_threshold})"
        )


def _split_batch(batch: object) -> tuple[torch.Tensor, Any]:
    """``(inputs, labels or None)`` from a batch; labels are checked by GateStats.update."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise InvalidInputError(
        "gate_statistics: each batch must be an input tensor or a tuple (inputs, labels, ...), "
        f"got {type(batch).__name__}."
    )


@torch.no_grad()
def gate_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    sites: Selectors | None = None,
    num_classes: int | None = None,
    saturation_threshold: float = 0.9,
    eval_mode: bool = True,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> GateStats:
    """Run ``model`` over ``batches`` and return the running statistics of its gates.

    Args:
        model: a model with attention blocks.
        batches: an iterable of input tensors or of ``(inputs, labels, ...)`` tuples,
            such as a ``DataLoader``; with labels (a tensor, numpy array or list of
            class indices), per-class statistics are kept too.
        sites: restrict to these blocks (selectors); ``None`` for all.
        num_classes: the number of classes, if known.
        saturation_threshold: see :class:`GateStats`.
        eval_mode: run in eval mode (every module's own mode is restored afterwards).
        device: where to send the inputs; ``None`` uses the device of the model's first
            parameter (CPU if it has none).
        max_batches: stop after this many batches.

    Example:
        >>> from attnblocks.inspect import gate_statistics
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks import SEBlock
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), SEBlock(8, reduction=2))
        >>> data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
        >>> stats = gate_statistics(net, data)
        >>> stats["1"].count, tuple(stats["1"].class_mean.shape), net.training
        (12, (2, 8), True)
    """
    owner = "gate_statistics"
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    if max_batches is not None:
        max_batches = check_positive_int(max_batches, "max_batches", owner=owner)
    check_bool(eval_mode, "eval_mode", owner=owner)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    else:
        device = check_store_device(device, owner=owner)
    try:
        stream = iter(batches)
    except TypeError:
        raise InvalidArgumentError(
            f"{owner}: batches must be an iterable of input tensors or (inputs, labels) "
            f"tuples, such as a DataLoader, got {type(batches).__name__}."
        ) from None
    stats = GateStats(num_classes=num_classes, saturation_threshold=saturation_threshold)
    with _eval_mode(model, eval_mode), record_gates(model, sites=sites, keep=False) as rec:
        for i, batch in enumerate(stream):
            if max_batches is not None and i >= max_batches:
                break
            inputs, labels = _split_batch(batch)
            model(inputs.to(device))
            stats.update(rec.pop(), labels)
    return stats
