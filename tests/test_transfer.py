"""Attribute transfer: the transition table is exact and sums to 100%."""

import json

import torch

from ssah.analysis.transfer import regroup_like, transfer_summary, transition_table
from ssah.units.groups import GROUP_NAMES, make_groups
from ssah.units.scores import Scores
from tests.helpers import assert_one_line_error, run_cli

SIZES = {"scu": 0.1, "ucu": 0.2, "ru": 0.25}


def _scores(seed: int, fingerprint: str, shift: float = 0.0) -> tuple[Scores, Scores]:
    gen = torch.Generator().manual_seed(seed)
    values = lambda: {"mlp": torch.rand(3, 40, generator=gen, dtype=torch.float64) + shift,  # noqa: E731
                      "attn": torch.rand(3, 16, generator=gen, dtype=torch.float64)}
    manifest = {"model_fingerprint": fingerprint, "scorer": "variance"}
    return Scores(values(), dict(manifest)), Scores(values(), dict(manifest))


def test_table_matches_a_hand_count_and_sums_to_one():
    before = make_groups(*_scores(0, "aaaa"), SIZES)
    after = regroup_like(before, *_scores(1, "bbbb"))
    table = transition_table(before, after)
    assert abs(float(table.sum()) - 1.0) < 1e-12
    total = sum(v.numel() for v in before.labels.values())
    for i, old in enumerate(GROUP_NAMES):
        for j, new in enumerate(GROUP_NAMES):
            hand = sum(int(((before.labels[k] == i) & (after.labels[k] == j)).sum()) for k in before.labels)
            assert abs(float(table[i, j]) - hand / total) < 1e-12, (old, new)
    # Rows are the old group sizes, columns the new ones (same sizes by construction).
    counts = before.counts()
    for i, name in enumerate(GROUP_NAMES):
        assert abs(float(table[i].sum()) - counts[name] / total) < 1e-12
        assert abs(float(table[:, i].sum()) - after.counts()[name] / total) < 1e-12


def test_identical_groupings_are_diagonal():
    groups = make_groups(*_scores(0, "aaaa"), SIZES)
    summary = transfer_summary(groups, groups)
    assert all(v == 0.0 for v in summary["share_left_group"].values())
    assert abs(sum(summary["table_percent"][i][i] for i in range(4)) - 100.0) < 1e-6


def test_cli_writes_table_and_plot(capsys, tmp_path):
    before = make_groups(*_scores(0, "aaaa"), SIZES)
    after = regroup_like(before, *_scores(1, "bbbb"))
    before.save(tmp_path / "before")
    after.save(tmp_path / "after")
    result = run_cli(capsys, "transfer", "--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"),
                     "--out", str(tmp_path / "t"))
    assert result.code == 0, result.err
    data = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert abs(sum(map(sum, data["table_percent"])) - 100.0) < 1e-3
    assert (tmp_path / "t" / "transfer.png").stat().st_size > 1000
    other = make_groups(*_scores(2, "cccc"), {"scu": 0.05, "ucu": 0.2, "ru": 0.25})
    other.save(tmp_path / "other")
    assert_one_line_error(run_cli(capsys, "transfer", "--before", str(tmp_path / "before"), "--after",
                                  str(tmp_path / "other"), "--out", str(tmp_path / "t2")), "differ in sizes")
