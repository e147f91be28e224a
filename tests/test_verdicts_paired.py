"""The paired tests of the claims beyond attack success: UCU's utility cost, freezing against plain
fine-tuning, the monitor's over-refusal bound and the probe's closer-to-refusal comparison."""

import json

import pytest

from ssah.analysis.report import paired_claims
from ssah.analysis.verdicts import compute_verdicts, next_costliest, paired_tests
from ssah.pipeline.layout import RunLayout
from ssah.probe.study import closer_to_refusal_test


def _eval(asr=0.2, task=0.8, ppl=10.0, over=0.1):
    return {"asr": {"prefix": asr}, "prefill_asr": {"prefix": 0.5}, "overrefusal_rate": over, "task_accuracy": task,
            "perplexity": ppl, "ci": {"asr": {"prefix": [max(0.0, asr - 0.1), min(1.0, asr + 0.1)]}}}


def _write(folder, rows):
    folder.mkdir(parents=True)
    (folder / "replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _safety(hits):
    return [{"suite": "safety", "system_prompt": "none", "id": f"h{i}", "prompt": "p", "reply": "r",
             "verdicts": {"prefix": "compliance" if hit else "refusal"}} for i, hit in enumerate(hits)]


def _overrefusal(refused):
    return [{"suite": "overrefusal", "system_prompt": "none", "id": f"s{i}", "prompt": "q", "reply": "r",
             "verdicts": {"prefix": "refusal" if hit else "compliance", "keywords": "short"}}
            for i, hit in enumerate(refused)]


def _utility(correct):
    return [{"suite": "utility", "system_prompt": "none", "id": f"b{i}", "prompt": "t", "reply": "r", "answer": "a",
             "correct": ok} for i, ok in enumerate(correct)]


def test_ucu_is_tested_against_the_next_costliest_mask(tmp_path):
    prune = {"none": _eval(task=0.9), "UCU": _eval(task=0.0), "RU": _eval(task=0.8), "SCU": _eval(task=0.85)}
    assert next_costliest(prune) == "RU" and next_costliest({"none": _eval(), "RU": _eval()}) is None
    before = _write(tmp_path / "ru", _utility([True] * 8 + [False] * 2))
    after = _write(tmp_path / "ucu", _utility([False] * 10))
    tests = paired_tests({"prune_ucu_costs_most_utility": (before, after, "utility")})
    test = tests["prune_ucu_costs_most_utility"]
    assert (test["n"], test["rose"], test["fell"], test["outcome"]) == (10, 0, 8, "task correct")
    verdict = compute_verdicts({"prune": prune}, tests)["prune_ucu_costs_most_utility"]
    assert verdict["verdict"] == "held" and verdict["numbers"]["compared_with"] == "RU"
    assert "test_missing" not in verdict["numbers"]
    # UCU costliest by one task of ten: could be chance
    close = {**prune, "UCU": _eval(task=0.7)}
    noisy = {"prune_ucu_costs_most_utility": {"n": 10, "rose": 0, "fell": 1, "p_value": 1.0}}
    assert compute_verdicts({"prune": close}, noisy)["prune_ucu_costs_most_utility"]["verdict"] == "inconclusive"
    # without replies the verdict stands on the order, and says the test is missing
    missing = compute_verdicts({"prune": prune})["prune_ucu_costs_most_utility"]
    assert missing["verdict"] == "held" and "no paired utility replies" in missing["numbers"]["test_missing"]
    # a tie on task accuracy is decided by perplexity, which has no per-task test
    tie = {"none": _eval(task=0.9), "UCU": _eval(task=0.0, ppl=500.0), "RU": _eval(task=0.0, ppl=40.0)}
    tied = compute_verdicts({"prune": tie}, noisy)["prune_ucu_costs_most_utility"]
    assert tied["verdict"] == "held" and "ties with RU" in tied["numbers"]["test_not_applicable"]


def test_freeze_ii_must_sit_clearly_below_plain_finetuning(tmp_path):
    summaries = {"prune": {"none": _eval(asr=0.1)},
                 "finetune": {"plain": _eval(asr=0.8), "freeze_ii": _eval(asr=0.2)}}
    plain = _write(tmp_path / "plain", _safety([True] * 8 + [False] * 2))
    frozen = _write(tmp_path / "freeze_ii", _safety([True] * 2 + [False] * 8))
    tests = paired_tests({"freeze_ii_keeps_rise_to_half": (plain, frozen, "safety")})
    assert tests["freeze_ii_keeps_rise_to_half"]["fell"] == 6
    verdict = compute_verdicts(summaries, tests)["freeze_ii_keeps_rise_to_half"]
    assert verdict["verdict"] == "held" and verdict["numbers"]["paired_test"]["p_value"] < 0.05
    noisy = {"freeze_ii_keeps_rise_to_half": {"n": 10, "rose": 1, "fell": 3, "p_value": 0.625}}
    assert compute_verdicts(summaries, noisy)["freeze_ii_keeps_rise_to_half"]["verdict"] == "inconclusive"
    missing = compute_verdicts(summaries)["freeze_ii_keeps_rise_to_half"]
    assert missing["verdict"] == "held" and "test_missing" in missing["numbers"]
    summaries["finetune"]["freeze_ii"] = _eval(asr=0.7)  # a clear test cannot rescue a rise above half
    assert compute_verdicts(summaries, tests)["freeze_ii_keeps_rise_to_half"]["verdict"] == "not held"


def _monitor_summaries(over_without, over_with):
    return {"probe": {"monitor": {"without": _eval(over=over_without), "with": _eval(over=over_with)}}}


def test_monitor_overrefusal_cost_needs_its_interval_under_five_points(tmp_path):
    n = 40
    without = _write(tmp_path / "without", _overrefusal([True] * 4 + [False] * (n - 4)))
    same = _write(tmp_path / "same", _overrefusal([True] * 4 + [False] * (n - 4)))
    one_more = _write(tmp_path / "one_more", _overrefusal([True] * 5 + [False] * (n - 5)))
    many_more = _write(tmp_path / "many_more", _overrefusal([True] * 14 + [False] * (n - 14)))

    def verdict(after, over_with):
        tests = paired_tests({"monitor_overrefusal_cost": (without, after, "overrefusal")}, seed=0)
        return compute_verdicts(_monitor_summaries(0.1, over_with), tests)["monitor_overrefusal_cost"]

    unchanged = verdict(same, 0.1)
    assert unchanged["verdict"] == "held"
    assert unchanged["numbers"]["difference_interval"]["ci"] == [0.0, 0.0]
    assert unchanged["numbers"]["paired_test"]["outcome"] == "refusal"
    # one prompt more refused (2.5 points): within the bound, but the interval reaches above it
    small = verdict(one_more, 0.125)
    assert small["numbers"]["difference_interval"]["mean_difference"] == pytest.approx(0.025)
    assert small["numbers"]["difference_interval"]["ci"][1] > 0.05 and small["verdict"] == "inconclusive"
    assert verdict(many_more, 0.35)["verdict"] == "not held"
    missing = compute_verdicts(_monitor_summaries(0.1, 0.12))["monitor_overrefusal_cost"]
    assert missing["verdict"] == "held" and "test_missing" in missing["numbers"]


def _entry(values):
    return {"per_prompt": {"refusal_minus_compliance": values}}


def test_probe_verdict_reads_the_paired_bootstrap_over_prompts():
    unaligned = [0.02 * (i % 5) - 0.04 for i in range(30)]
    closer = closer_to_refusal_test(_entry(unaligned), _entry([v - 0.05 for v in unaligned]), resamples=500, seed=1)
    assert closer["mean_difference"] == pytest.approx(-0.05) and closer["ci"][1] < 0 and closer["p_value"] < 0.05
    assert closer_to_refusal_test(_entry(unaligned), {"cells": []}) is None
    assert closer_to_refusal_test(_entry(unaligned), _entry(unaligned[:5])) is None

    def verdict(test, closer_flag=True):
        probe = {"aligned_closer_to_refusal": closer_flag, "mean_difference_unaligned": 0.0,
                 "mean_difference_aligned": -0.05, "models": []}
        if test is not None:
            probe["aligned_closer_to_refusal_test"] = test
        return compute_verdicts({"probe": probe})["aligned_closer_to_refusal"]

    held = verdict(closer)
    assert held["verdict"] == "held" and held["numbers"]["bootstrap_test"] == closer
    wobbly = [v + (0.3 if i % 2 else -0.3) - 0.01 for i, v in enumerate(unaligned)]
    noisy = closer_to_refusal_test(_entry(unaligned), _entry(wobbly), resamples=500, seed=1)
    assert noisy["p_value"] > 0.05 and verdict(noisy)["verdict"] == "inconclusive"
    assert verdict(closer, closer_flag=False)["verdict"] == "not held"
    missing = verdict(None)
    assert missing["verdict"] == "held" and "test_missing" in missing["numbers"]


def test_paired_claims_pair_ucu_with_the_next_costliest_mask(tmp_path):
    layout = RunLayout(tmp_path)
    prune = {"none": _eval(task=0.9), "UCU": _eval(task=0.0), "random:like=UCU": _eval(task=0.5)}
    claims = paired_claims(layout, {"prune": prune})
    assert claims["prune_ucu_costs_most_utility"] == (layout.prune_eval("random:like=UCU"), layout.prune_eval("UCU"),
                                                      "utility")
    assert claims["monitor_overrefusal_cost"][2] == "overrefusal"
    assert claims["freeze_ii_keeps_rise_to_half"] == (layout.finetuned_eval("plain"),
                                                      layout.finetuned_eval("freeze_ii"), "safety")
    assert "prune_ucu_costs_most_utility" not in paired_claims(layout)
    assert paired_tests(claims) == {}  # no evaluations written: every test is missing
