"""The paired bootstrap of a mean difference: it finds a real shift, not a null one, and is seeded."""

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
