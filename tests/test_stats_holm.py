"""Holm's step-down correction against a hand-computed example."""

import pytest

from ssah.evaluate.stats import holm_adjust


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (step-down
    # adjusted p-values never fall along the sorted order)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]
    # less strict than Bonferroni: 0.03 x 1 stays below 0.05 where Bonferroni's 0.03 x 2 does not
    assert holm_adjust([0.02, 0.03]) == pytest.approx([0.04, 0.04])
    assert holm_adjust([0.2]) == [0.2] and holm_adjust([]) == []
