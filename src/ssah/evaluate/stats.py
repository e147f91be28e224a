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
    (resamples + 1)), capped at 1, so it falls below 1 - level about when `ci` excludes zero; it can
    fall no lower than `p_floor`, 2 / (resamples + 1).
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
    means = np.concatenate([diffs[rows].mean(axis=1) for rows in _resampled_rows(n, resamples, seed)])
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    below, above = int((means <= 0).sum()), int((means >= 0).sum())
    p_value = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    return {"mean_difference": float(diffs.mean()), "ci": [float(low), float(high)], "p_value": p_value, "n": n,
            "resamples": resamples, "seed": seed, "level": level, "alternative": "two-sided",
            "p_floor": min(1.0, 2 / (resamples + 1))}


def _resampled_rows(n: int, resamples: int, seed: int):
    """`resamples` draws of n item indices with replacement (seeded), in chunks that bound the memory."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, resamples - start), n))


def paired_share_bootstrap(low: Sequence[float], high: Sequence[float], middle: Sequence[float],
                           resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The share of a paired rise from `low` to `high` that `middle` takes back, with a percentile
    bootstrap interval: share = mean(high - middle) / mean(high - low), the three values of each item
    resampled together (as `paired_bootstrap`). E.g. low: an aligned model's per-prompt attack success,
    high: the attacked model's, middle: the attacked model with some aligned weights put back; 1 means
    all of the rise undone, 0 none of it.

    Where the rise is not positive the share means nothing: `share` and `ci` are None and `reason`
    says why. Resamples whose rise is not positive are left out of the interval; `resamples_used`
    counts the rest (`ci` is None when none is left).
    """
    import numpy as np

    lengths = {len(low), len(high), len(middle)}
    if len(lengths) != 1 or not low:
        raise ValueError(f"the share needs three equally long, non-empty lists, got lengths {sorted(lengths)}")
    values = np.asarray([low, high, middle], dtype=np.float64)
    rise, taken = values[1] - values[0], values[1] - values[2]
    out = {"rise": float(rise.mean()), "taken_back": float(taken.mean()), "share": None, "ci": None,
           "reason": None, "n": len(rise), "resamples": resamples, "resamples_used": 0, "seed": seed,
           "level": level}
    if out["rise"] <= 0:
        out["reason"] = f"no rise to take back (mean rise {out['rise']:+.3f})"
        return out
    out["share"] = out["taken_back"] / out["rise"]
    rises, takens = [], []
    for rows in _resampled_rows(len(rise), resamples, seed):
        rises.append(rise[rows].mean(axis=1))
        takens.append(taken[rows].mean(axis=1))
    rises, takens = np.concatenate(rises), np.concatenate(takens)
    kept = rises > 0
    out["resamples_used"] = int(kept.sum())
    if kept.any():
        alpha = (1.0 - level) / 2
        low_q, high_q = np.quantile(takens[kept] / rises[kept], [alpha, 1.0 - alpha])
        out["ci"] = [float(low_q), float(high_q)]
    return out


# -- a paired difference of proportions: Tango's score interval, Newcombe's hybrid, the MDE ------------

Z_80 = 0.8416212335729143  # one-sided normal quantile of power 0.8
# The fewest discordant pairs, all moving the same way, that can make exact McNemar two-sided p < 0.05
# (2 * 0.5 ** 6 = 0.031; five give 0.0625).
MIN_DISCORDANT_05 = 6


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def _tango_score(delta: float, rose: int, fell: int, n: int) -> float:
    """Tango's score statistic for H0: p(rose) - p(fell) = delta, with the restricted maximum-likelihood
    estimate of p(fell) (the root of 2n q^2 + (-r - f + (2n + f - r) delta) q - f delta (1 - delta) = 0)."""
    pb = -rose - fell + (2 * n + fell - rose) * delta
    pc = -fell * delta * (1 - delta)
    q = (math.sqrt(max(0.0, pb * pb - 8 * n * pc)) - pb) / (4 * n)
    variance = n * (2 * q + delta * (1 - delta))
    diff = rose - fell - n * delta
    if variance <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(variance)


def tango_interval(rose: int, fell: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Tango's (1998) asymptotic score interval for a paired difference of proportions, after - before =
    (rose - fell) / n, where `rose` items went False -> True and `fell` True -> False among `n` pairs.

    Unlike a Wald or bootstrap interval it does not collapse when no pair is discordant: with rose =
    fell = 0 it is +-z^2 / (n + z^2) (7.4 points at n = 48), the Wilson bound of a rate of 0 of n.
    The bounds are the deltas where the score statistic equals -+z, found by bisection (the statistic
    falls as delta rises)."""
    if n < 1 or rose < 0 or fell < 0 or rose + fell > n:
        raise ValueError(f"need n >= 1 and 0 <= rose + fell <= n, got rose={rose}, fell={fell}, n={n}")
    z = _z(level)
    estimate = (rose - fell) / n

    def root(target: float, low: float, high: float) -> float:
        # the delta in [low, high] where the statistic crosses `target` (it falls from low to high)
        for _ in range(200):
            mid = (low + high) / 2
            if _tango_score(mid, rose, fell, n) > target:
                low = mid
            else:
                high = mid
        return (low + high) / 2

    lower = -1.0 if estimate <= -1 else root(z, -1.0, estimate)
    upper = 1.0 if estimate >= 1 else root(-z, estimate, 1.0)
    return max(-1.0, min(estimate, lower)), min(1.0, max(estimate, upper))


def newcombe_paired_interval(both: int, rose: int, fell: int, neither: int,
                             level: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) hybrid score interval for a paired difference of proportions,
    after - before, from the four cells of the paired table: `both` True before and after, `rose`
    False -> True, `fell` True -> False, `neither`. Wilson intervals of the two margins combined with
    the phi correlation (continuity-corrected; 0 when a margin is empty). It can be narrow when no pair is discordant
    and a margin is near one half; the verdicts use `tango_interval`."""
    n = both + rose + fell + neither
    if n < 1 or min(both, rose, fell, neither) < 0:
        raise ValueError(f"need non-negative cells summing to at least 1, got {(both, rose, fell, neither)}")
    z = _z(level)
    before, after = both + fell, both + rose
    p_before, p_after = before / n, after / n
    lo_b, hi_b = wilson_interval(before, n, z)
    lo_a, hi_a = wilson_interval(after, n, z)
    margins = (both + rose) * (fell + neither) * (both + fell) * (rose + neither)
    cross = both * neither - rose * fell
    # Newcombe's continuity-corrected phi: shrunk by n / 2 towards zero, zero in between
    phi = 0.0 if margins == 0 or 0 <= cross <= n / 2 else (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    d = p_after - p_before
    dl_a, du_a, dl_b, du_b = p_after - lo_a, hi_a - p_after, p_before - lo_b, hi_b - p_before
    lower = d - math.sqrt(max(0.0, dl_a ** 2 - 2 * phi * dl_a * du_b + du_b ** 2))
    upper = d + math.sqrt(max(0.0, du_a ** 2 - 2 * phi * du_a * dl_b + dl_b ** 2))
    return max(-1.0, lower), min(1.0, upper)


def mde_paired_proportions(n: int, discordant_share: float = 0.0, alpha: float = 0.05,
                           power: float = 0.8) -> float | None:
    """The smallest difference of two paired proportions that a two-sided McNemar test at `alpha` finds
    with probability `power` among `n` pairs; None when no difference can reach `alpha` at this n.

    Connor's (1987) normal approximation: n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, solved for d,
    where psi, the share of discordant pairs, is the larger of `discordant_share` (the one observed) and
    d itself (a difference of d needs at least d discordant). The exact test also needs at least
    `MIN_DISCORDANT_05` one-way discordant pairs (at alpha 0.05), so d is at least that many over n."""
    if n < 1:
        return None
    z_a = _z(1 - alpha)
    z_b = _z(1 - 2 * (1 - power))

    def needed(d: float) -> float:
        psi = max(discordant_share, d)
        return (z_a * math.sqrt(psi) + z_b * math.sqrt(max(0.0, psi - d * d))) ** 2 / (d * d)

    if needed(1.0) > n:
        return None
    low, high = 1e-9, 1.0
    for _ in range(100):  # needed(d) falls as d grows
        mid = (low + high) / 2
        if needed(mid) > n:
            low = mid
        else:
            high = mid
    floor = MIN_DISCORDANT_05 / n if alpha >= 0.05 else 0.0
    found = max(high, floor)
    return None if found > 1 else found


def mde_paired_mean(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest mean paired difference a two-sided test at `alpha` finds with probability `power`
    among `n` pairs whose differences have standard deviation `sd`: (z_a + z_b) sd / sqrt(n) (normal
    approximation)."""
    if n < 2:
        return None
    return (_z(1 - alpha) + _z(1 - 2 * (1 - power))) * sd / math.sqrt(n)


def paired_proportions(before: Sequence[bool], after: Sequence[bool], level: float = 0.95) -> dict:
    """Two rates of the same items compared: exact McNemar (`paired_exact_test`), the difference after -
    before with Tango's score interval, and the minimum detectable difference at this n
    (`mde_paired_proportions` at the observed discordant share)."""
    test = paired_exact_test(before, after)
    n = test["n"]
    if n == 0:
        raise ValueError("paired proportions need at least one pair")
    lo, hi = tango_interval(test["rose"], test["fell"], n, level)
    both = sum(1 for b, a in zip(before, after) if b and a)
    return {**test, "name": "exact McNemar + Tango score interval", "before": sum(map(bool, before)) / n,
            "after": sum(map(bool, after)) / n, "difference": (test["rose"] - test["fell"]) / n, "ci": [lo, hi],
            "both": both, "level": level,
            "mde": mde_paired_proportions(n, (test["rose"] + test["fell"]) / n, 1 - level)}


def sign_flip_test(differences: Sequence[float], resamples: int = 20000, seed: int = 0) -> dict:
    """Two-sided paired permutation (sign-flip) test that per-item differences are centred on zero.

    Under no effect each item's difference is as likely to carry either sign, so the p-value is the share
    of sign assignments whose mean is at least as far from zero as the observed one: every assignment
    when at most 16 items differ from zero (exact), else `resamples` seeded draws counted as (k + 1) /
    (resamples + 1), whose floor is `p_floor`. On 0/1 differences (one binary outcome) it is exact
    McNemar."""
    import numpy as np

    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a sign-flip test needs at least one difference")
    nonzero = values[np.abs(values) > 1e-12]
    observed = abs(float(values.sum()))
    out = {"name": "paired sign-flip permutation test", "n": int(values.size),
           "mean_difference": float(values.mean()), "nonzero": int(nonzero.size)}
    if nonzero.size == 0:
        return {**out, "p_value": 1.0, "exact": True, "p_floor": None}
    if nonzero.size <= 16:
        signs = ((np.arange(2 ** nonzero.size)[:, None] >> np.arange(nonzero.size)) & 1) * 2 - 1
        sums = np.abs(signs @ nonzero)
        p = float((sums >= observed - 1e-9).mean())
        return {**out, "p_value": min(1.0, p), "exact": True, "p_floor": None}
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(resamples, nonzero.size))
    k = int((np.abs(signs @ nonzero) >= observed - 1e-9).sum())
    return {**out, "p_value": min(1.0, (k + 1) / (resamples + 1)), "exact": False, "resamples": resamples,
            "seed": seed, "p_floor": 1 / (resamples + 1)}


def perplexity_ratio_interval(before_nll: Sequence[float], after_nll: Sequence[float], tokens: Sequence[int],
                              resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The ratio of two perplexities of the same text (after / before), with a paired percentile bootstrap
    interval over blocks of its scored tokens (each block's summed NLL under both models kept together):
    ratio = exp((sum after - sum before) / sum tokens). `sd_log_ratio` is the spread of the per-block
    log-ratio (per token), for the minimum detectable ratio."""
    import numpy as np

    if not len(before_nll) == len(after_nll) == len(tokens) or not tokens:
        raise ValueError("the per-block NLLs and token counts must have the same, non-zero length")
    b, a, t = (np.asarray(x, dtype=np.float64) for x in (before_nll, after_nll, tokens))
    n = len(t)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # bounds the index matrix's memory
    logs = []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        logs.append((a[picks].sum(axis=1) - b[picks].sum(axis=1)) / t[picks].sum(axis=1))
    logs = np.concatenate(logs)
    alpha = (1 - level) / 2
    low, high = np.exp(np.quantile(logs, [alpha, 1 - alpha]))
    per_block = (a - b) / t
    return {"name": "paired bootstrap over perplexity blocks", "ratio": float(np.exp((a.sum() - b.sum()) / t.sum())),
            "ci": [float(low), float(high)], "n": n, "resamples": resamples, "seed": seed, "level": level,
            "sd_log_ratio": float(per_block.std(ddof=1)) if n > 1 else None}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values for a family of tests, in the order given.

    Sorted ascending, the i-th smallest (from 0) becomes max over j <= i of (m - j) * p_(j), capped at 1;
    rejecting where the adjusted p is below alpha keeps the family-wise error rate at alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted
