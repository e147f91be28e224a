"""The paired tests: the bootstrap of a mean difference finds a real shift, not a null one, and is seeded;
Tango's and Newcombe's intervals match a published example and stay honest with no discordant pair; the
minimum detectable effect, the sign-flip test and the perplexity-ratio interval."""

import math
import random

import pytest

from ssah.evaluate.stats import paired_bootstrap


def _before(n=40, seed=0):
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) for _ in range(n)]


def test_a_real_shift_is_detected():
    before = _before()
    rng = random.Random(1)
    after = [b + 0.5 + rng.gauss(0.0, 0.3) for b in before]
    test = paired_bootstrap(before, after, resamples=2000, seed=0)
    assert test["mean_difference"] == pytest.approx(sum(a - b for a, b in zip(after, before)) / 40)
    assert 0 < test["ci"][0] < test["mean_difference"] < test["ci"][1]
    assert test["p_value"] < 0.01
    assert (test["n"], test["resamples"], test["seed"], test["alternative"]) == (40, 2000, 0, "two-sided")
    # the same shift downwards is as clear
    down = paired_bootstrap(after, before, resamples=2000, seed=0)
    assert down["ci"][1] < 0 and down["p_value"] < 0.01


def test_a_null_shift_is_not():
    before = _before()
    rng = random.Random(2)
    noise = [rng.gauss(0.0, 0.3) for _ in range(20)]
    after = [b + d for b, d in zip(before, [*noise, *(-x for x in noise)])]  # differences cancel exactly
    test = paired_bootstrap(before, after, resamples=2000, seed=0)
    assert abs(test["mean_difference"]) < 1e-12
    assert test["ci"][0] < 0 < test["ci"][1] and test["p_value"] > 0.5
    same = paired_bootstrap(before, before, resamples=500, seed=3)
    assert same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0


def test_seeded_and_checked():
    before, after = _before(seed=4), _before(seed=5)
    assert paired_bootstrap(before, after, seed=7) == paired_bootstrap(before, after, seed=7)
    assert paired_bootstrap(before, after, seed=7)["ci"] != paired_bootstrap(before, after, seed=8)["ci"]
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_bootstrap([], [])


# -- a paired difference of proportions: Tango, Newcombe, the minimum detectable effect -----------------

def test_tango_and_newcombe_match_the_published_worked_example():
    """Cavo et al. (2012), complete response before and after consolidation therapy: 59 both, 6 before
    only, 16 after only, 80 neither (Fagerland, Lydersen and Laake, Statistical Analysis of Contingency
    Tables, ch. 8: Tango -0.0621 (-0.1240 to -0.0054), Newcombe square-and-add (-0.1186 to -0.0046),
    before minus after)."""
    from ssah.evaluate.stats import newcombe_paired_interval, tango_interval

    lo, hi = tango_interval(rose=16, fell=6, n=161)  # after - before
    assert (round(-hi, 4), round(-lo, 4)) == (-0.1240, -0.0054)
    lo, hi = newcombe_paired_interval(both=59, rose=16, fell=6, neither=80)
    assert (round(-hi, 4), round(-lo, 4)) == (-0.1186, -0.0046)


def test_no_discordant_pair_is_not_a_zero_width_interval():
    from ssah.evaluate.stats import Z_95, paired_proportions, tango_interval

    # no change among 48 prompts: +-z^2 / (n + z^2), the Wilson bound of 0 of 48; not within 5 points
    lo, hi = tango_interval(0, 0, 48)
    assert hi == pytest.approx(Z_95 ** 2 / (48 + Z_95 ** 2)) == pytest.approx(0.0741, abs=1e-4) and lo == -hi
    assert hi > 0.05
    assert tango_interval(0, 0, 4)[1] > 0.45  # the tiny pipeline's 4 prompts say almost nothing
    found = paired_proportions([True] * 24 + [False] * 24, [True] * 24 + [False] * 24)
    assert found["ci"][1] > 0.05 and found["p_value"] == 1.0 and found["difference"] == 0.0
    # every pair moved the same way: the interval excludes zero, and it stays inside [-1, 1]
    lo, hi = tango_interval(48, 0, 48)
    assert lo == pytest.approx((48 - Z_95 ** 2) / (48 + Z_95 ** 2)) and hi == 1.0
    with pytest.raises(ValueError, match="rose"):
        tango_interval(3, 2, 4)


def test_minimum_detectable_effect_of_a_paired_proportion():
    from ssah.evaluate.stats import mde_paired_proportions

    # 5 prompts cannot reach p < 0.05 (six one-way discordant pairs are needed)
    assert mde_paired_proportions(4) is None and mde_paired_proportions(5) is None
    sizes = [mde_paired_proportions(n) for n in (12, 48, 200, 1000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.02
    # Connor's formula at a given discordant share: n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2
    d = mde_paired_proportions(200, discordant_share=0.3)
    assert (1.959964 * 0.3 ** 0.5 + 0.841621 * (0.3 - d * d) ** 0.5) ** 2 / d ** 2 == pytest.approx(200, rel=1e-3)
    assert mde_paired_proportions(48) >= 6 / 48  # the exact test's floor


def test_sign_flip_test_is_exact_mcnemar_on_one_binary_outcome():
    from ssah.evaluate.stats import paired_exact_test, sign_flip_test

    before = [False] * 30 + [True] * 3 + [False] * 15
    after = [True] * 9 + [False] * 21 + [False] * 3 + [False] * 15
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    assert sign_flip_test(diffs)["p_value"] == pytest.approx(paired_exact_test(before, after)["p_value"])
    assert sign_flip_test([0.0] * 10)["p_value"] == 1.0
    many = sign_flip_test([1.0] * 30, resamples=999, seed=0)  # past 16 changed items: seeded resampling
    assert not many["exact"] and many["p_value"] == many["p_floor"] == 1 / 1000


def test_perplexity_ratio_interval_and_the_bootstrap_floor():
    from ssah.evaluate.stats import perplexity_ratio_interval

    before = [300.0 + 5 * (i % 7) for i in range(20)]
    after = [b * 1.2 + (3 if i % 2 else -3) for i, b in enumerate(before)]
    found = perplexity_ratio_interval(before, after, [100] * 20, seed=0)
    assert found["ratio"] == pytest.approx(math.exp((sum(after) - sum(before)) / 2000))
    assert found["ci"][0] < found["ratio"] < found["ci"][1] and found["n"] == 20
    # a bootstrap p-value reaches its floor, 2 / (resamples + 1)
    shifted = paired_bootstrap([0.0] * 30, [1.0 + 0.01 * i for i in range(30)], resamples=2000)
    assert shifted["p_value"] == shifted["p_floor"] == pytest.approx(2 / 2001)
