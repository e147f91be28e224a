"""Rates with Wilson score intervals (every rate in a report carries its count and its 95% interval), and
the paired tests of two conditions on the same items: exact McNemar for one binary outcome, a paired
bootstrap for the mean difference of any per-item value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n is 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp rounding noise: the exact interval always contains p and lies in [0, 1].
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Rate:
    """k of n, with its rate (None when n is 0) and Wilson 95% interval."""

    k: int
    n: int

    @classmethod
    def of(cls, flags: Iterable[bool]) -> Rate:
        flags = list(flags)
        return cls(sum(bool(f) for f in flags), len(flags))

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def __add__(self, other: Rate) -> Rate:
        """Pool two rates (e.g. with and without a system prompt)."""
        return Rate(self.k + other.k, self.n + other.n)

    def to_dict(self) -> dict:
        lo, hi = self.ci
        return {"rate": self.rate, "k": self.k, "n": self.n, "ci95": [lo, hi]}


def paired_exact_test(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test for one binary outcome on the same items under two conditions.

    Only the discordant items carry evidence: `rose` went False -> True, `fell` True -> False.
    Under no change each discordant item is a fair coin, so the p-value is the two-sided binomial
    tail of min(rose, fell) in rose + fell tosses. Two rates whose Wilson intervals overlap can
    still differ clearly when nearly every changed item moved the same way; this test sees that.
    """
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need equal lengths, got {len(before)} and {len(after)}")
    rose = sum(1 for b, a in zip(before, after) if not b and a)
    fell = sum(1 for b, a in zip(before, after) if b and not a)
    n = rose + fell
    tail = sum(math.comb(n, i) for i in range(min(rose, fell) + 1)) / 2 ** n if n else 1.0
    return {"n": len(before), "rose": rose, "fell": fell, "p_value": min(1.0, 2 * tail)}


def paired_bootstrap(before: Sequence[float], after: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Paired percentile bootstrap of the mean difference `after - before` over items.

    Items are resampled with replacement (`resamples` times, seeded), keeping each item's two values
    together. `ci` is the percentile interval at `level`; `p_value` is two-sided: twice the smaller
    share of resampled means at or beyond zero on either side (each share counted as (k + 1) /
    (resamples + 1)), capped at 1, so it falls below 1 - level about when `ci` excludes zero.
    """
    import numpy as np

    if len(before) != len(after):
        raise ValueError(f"paired values need equal lengths, got {len(before)} and {len(after)}")
    if not before:
        raise ValueError("paired bootstrap needs at least one pair")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    diffs = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    n = len(diffs)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # bounds the index matrix's memory
    means = np.concatenate([diffs[rng.integers(0, n, size=(min(chunk, resamples - start), n))].mean(axis=1)
                            for start in range(0, resamples, chunk)])
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    below, above = int((means <= 0).sum()), int((means >= 0).sum())
    p_value = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    return {"mean_difference": float(diffs.mean()), "ci": [float(low), float(high)], "p_value": p_value, "n": n,
            "resamples": resamples, "seed": seed, "level": level, "alternative": "two-sided"}
