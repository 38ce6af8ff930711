"""Small statistics for an honest comparison: mean, std and a Welch 95 % interval."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Comparison", "compare", "comparisons", "mean_std", "t_quantile"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _t_pdf(x: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: float, steps: int = 2000) -> float:
    # Simpson's rule on [0, |x|]; the density is smooth, so this is accurate to ~1e-10.
    h = abs(x) / steps
    total = _t_pdf(0.0, df) + _t_pdf(abs(x), df)
    for i in range(1, steps):
        total += (4 if i % 2 else 2) * _t_pdf(i * h, df)
    area = total * h / 3
    return 0.5 + math.copysign(area, x)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom.

    >>> round(t_quantile(0.975, 4), 3), round(t_quantile(0.975, 1e6), 3)
    (2.776, 1.96)
    """
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class Comparison:
    """``treatment - control`` of two samples, with a Welch t 95 % confidence interval."""

    control: str
    treatment: str
    n_control: int
    n_treatment: int
    mean_control: float
    std_control: float
    mean_treatment: float
    std_treatment: float
    difference: float
    ci_low: float | None
    ci_high: float | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def compare(
    control: list[float], treatment: list[float], *, names: tuple[str, str] = ("a", "b")
) -> Comparison:
    """Difference of means with Welch's 95 % interval (none with fewer than 2 per arm)."""
    m1, s1 = mean_std(control)
    m2, s2 = mean_std(treatment)
    n1, n2 = len(control), len(treatment)
    low = high = None
    if n1 < 2 or n2 < 2:
        note = "fewer than 2 seeds per arm: no confidence interval"
    else:
        var = s1**2 / n1 + s2**2 / n2
        if var == 0:
            low = high = m2 - m1
            note = "zero variance in both arms"
        else:
            df = var**2 / ((s1**2 / n1) ** 2 / (n1 - 1) + (s2**2 / n2) ** 2 / (n2 - 1))
            half = t_quantile(0.975, df) * math.sqrt(var)
            low, high = m2 - m1 - half, m2 - m1 + half
            note = f"Welch t interval, {df:.1f} degrees of freedom"
    return Comparison(
        control=names[0],
        treatment=names[1],
        n_control=n1,
        n_treatment=n2,
        mean_control=m1,
        std_control=s1,
        mean_treatment=m2,
        std_treatment=s2,
        difference=m2 - m1,
        ci_low=low,
        ci_high=high,
        note=note,
    )


def comparisons(arms: dict[str, Any]) -> dict[str, Any]:
    """Each arm against ``"baseline"`` on final test accuracy, as summary.json entries.

    Returns ``{"comparisons": {arm: Comparison dict}}`` plus ``"comparison"`` (the SE
    arm's, kept as the headline) when there is an SE arm; empty without a baseline.
    """
    if "baseline" not in arms:
        return {}
    control = [r["final_test_acc"] for r in arms["baseline"]["runs"]]
    out = {
        arm: compare(
            control, [r["final_test_acc"] for r in info["runs"]], names=("baseline", arm)
        ).to_dict()
        for arm, info in arms.items()
        if arm != "baseline"
    }
    result: dict[str, Any] = {"comparisons": out}
    if "se" in out:
        result["comparison"] = out["se"]
    return result
