"""`--sizes auto`: the pruning sweep measures what it says, follows its rule, and leaves the model as it was."""

import json

import pytest
import torch

from ssah.data import load_dataset
from ssah.errors import SsahError
from ssah.models.loading import load_model
from ssah.units.groups import GROUP_NAMES, Groups, make_groups
from ssah.units.scores import Scores, score_dataset
from ssah.units.size_sweep import AttributeProbe, SweepThresholds, sweep_sizes
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny Llama, its safety and utility scores, and a sweep probe on 6 calibration records each."""
    tmp = tmp_path_factory.mktemp("sweep")
    loaded = load_model("tiny:llama")
    harmful = load_dataset("harmful:calibration").take(6)
    benign = load_dataset("benign:calibration").take(6)
    common = dict(batch_size=4, max_length=256)
    score_dataset(loaded, harmful, responses="refusals", out=tmp / "S", **common)
    score_dataset(loaded, benign, out=tmp / "U", **common)
    probe = AttributeProbe.build(loaded, harmful, benign, samples=6, batch_size=4, max_length=256)
    assert len(probe.safety_prompts) == 6
    return loaded, Scores.load(tmp / "S"), Scores.load(tmp / "U"), probe, tmp


def _state(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_utility_measure_is_the_response_token_loss(setting):
    loaded, _, _, probe, _ = setting
    model = loaded.model
    total, tokens = 0.0, 0
    for batch in probe.utility_batches:
        labels = batch["input_ids"].masked_fill(~batch["response_mask"].bool(), -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss.detach()) * n
        tokens += n
    measured = probe.measure(model, loaded.tokenizer)
    assert measured.nll == pytest.approx(total / tokens, rel=1e-5)
    assert 0.0 <= measured.refusal_rate <= 1.0


def _check_step(step, base, t: SweepThresholds) -> None:
    drop = base["refusal_rate"] - step["refusal_rate"]
    ratio = step["perplexity_ratio"]
    assert step["safety_hurt"] == (drop >= t.hurt_safety - 1e-9)
    assert step["safety_spared"] == (abs(drop) <= t.spare_safety + 1e-9)
    assert step["utility_hurt"] == (ratio >= 1 + t.hurt_utility)
    assert step["utility_spared"] == (ratio <= 1 + t.spare_utility)


@pytest.mark.parametrize("thresholds", ["hurt_safety=0,spare_utility=0.2,hurt_utility=0.01,spare_safety=0.2",
                                        "hurt_safety=0,spare_utility=100,spare_safety=1,hurt_utility=0"])
def test_sweep_follows_its_rule(setting, thresholds):
    loaded, safety, utility, probe, _ = setting
    t = SweepThresholds.parse(thresholds)
    before = _state(loaded.model)
    sweep = sweep_sizes(loaded, safety, utility, probe, thresholds=t)
    after = _state(loaded.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the sweep must restore every pruned weight"
    record = sweep.to_dict()
    for group, own, other in (("SCU", "safety", "utility"), ("UCU", "utility", "safety")):
        steps = [s for s in record["steps"] if s["group"] == group]
        fractions = [s["fraction"] for s in steps]
        assert steps and fractions == sorted(fractions, reverse=True), "candidates go from large to small"
        for step in steps:
            _check_step(step, record["baseline"], t)
        # the sweep goes down while pruning hurts the group's own attribute and stops at the first that does not
        assert all(s[f"{own}_hurt"] for s in steps[:-1])
        hurting = [s for s in steps if s[f"{own}_hurt"]]
        expected = hurting[-1]["fraction"] if hurting and hurting[-1][f"{other}_spared"] else None
        assert record["met"][group] == (expected is not None), record["reasons"][group]
        if expected is not None:
            assert sweep.sizes[group.lower()] == expected
    ru = [s for s in record["steps"] if s["group"] == "RU"]
    for step in ru:
        _check_step(step, record["baseline"], t)
    sparing = [s for s in ru if s["safety_spared"] and s["utility_spared"]]
    assert record["met"]["RU"] == bool(sparing)
    if sparing:  # the first (largest) size sparing both ends the sweep
        assert sparing == [ru[-1]] and sweep.sizes["ru"] == ru[-1]["fraction"]
    assert sum(sweep.sizes.values()) <= 1
    groups = make_groups(safety, utility, sweep.sizes)
    total = groups.meta["total_units"]
    for group in ("SCU", "UCU", "RU"):
        assert groups.counts()[group] == int(sweep.sizes[group.lower()] * total + 0.5)


def test_permissive_thresholds(setting):
    """hurt=0 and spare=everything: SCU and UCU go down to the smallest candidate that does not improve
    the attribute, and RU takes the largest candidate that fits."""
    loaded, safety, utility, probe, _ = setting
    t = SweepThresholds.parse("hurt_safety=0,spare_safety=1,hurt_utility=0,spare_utility=1e9")
    sweep = sweep_sizes(loaded, safety, utility, probe, thresholds=t,
                        grids={"scu": (0.05, 0.02), "ucu": (0.2, 0.1), "ru": (0.9, 0.5)})
    base = sweep.baseline
    scu = [s for s in sweep.steps if s.group == "SCU"]
    if all(base.refusal_rate >= s.refusal_rate for s in scu):
        assert sweep.met["SCU"] and sweep.sizes["scu"] == 0.02 and len(scu) == 2
    room = 1 - sweep.sizes["scu"] - sweep.sizes["ucu"]
    assert sweep.sizes["ru"] == max(f for f in (0.9, 0.5) if f <= room) and sweep.met["RU"]


def test_a_model_that_does_not_refuse_cannot_size_scu(setting):
    loaded, safety, utility, probe, _ = setting
    rate = probe.measure(loaded.model, loaded.tokenizer).refusal_rate
    assert rate < 1  # a random tiny model does not open its replies with refusals
    with pytest.raises(SsahError, match="cannot be sized automatically"):
        sweep_sizes(loaded, safety, utility, probe, thresholds=SweepThresholds(hurt_safety=rate + 0.01))


def test_sweep_refuses_another_model(setting):
    _, safety, utility, _, _ = setting
    other = load_model("tiny:qwen2")
    probe = AttributeProbe.build(other, load_dataset("harmful:calibration").take(2),
                                 load_dataset("benign:calibration").take(2))
    with pytest.raises(SsahError, match="not the model the scores were computed on"):
        sweep_sizes(other, safety, utility, probe)


def test_thresholds_and_probe_inputs_are_checked():
    assert SweepThresholds.parse("hurt_safety=0.5").hurt_safety == 0.5
    assert SweepThresholds.parse(None) == SweepThresholds()
    for bad in ("hurt=0.5", "hurt_safety=x", "spare_safety=-1", "hurt_safety=1.5"):
        with pytest.raises(SsahError):
            SweepThresholds.parse(bad)
    loaded = load_model("tiny:llama")
    harmful = load_dataset("harmful:calibration").take(2)
    with pytest.raises(SsahError, match="without a response"):
        AttributeProbe.build(loaded, harmful, harmful)


def test_cli_sizes_auto(setting, capsys):
    _, _, _, _, tmp = setting
    out = str(tmp / "G")
    args = ("groups", "--safety", str(tmp / "S"), "--utility", str(tmp / "U"), "--sizes", "auto",
            "--sweep-samples", "4", "--sweep-thresholds", "hurt_safety=0,spare_safety=1,spare_utility=1e9",
            "--out", out)
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    meta = json.loads((tmp / "G" / "groups.json").read_text())
    selection = meta["size_selection"]
    assert selection["sizes"] == meta["sizes"] and selection["met"]["RU"]
    assert selection["request"]["data"]["safety"]["samples"] == 4
    assert (tmp / "G" / "size_sweep.png").stat().st_size > 1000
    groups = Groups.load(out)
    assert sum(groups.counts()[name] for name in GROUP_NAMES) == meta["total_units"]
    assert "reused" in run_cli(capsys, *args).out
    changed = run_cli(capsys, *args[:-4], "--sweep-thresholds", "hurt_safety=0.05", "--out", out)
    assert_one_line_error(changed, "already holds groups made differently", "--force")
    assert_one_line_error(run_cli(capsys, *args[:-2], "--model", "tiny:qwen2", "--out", str(tmp / "G2")),
                          "not the model the scores were computed on")
    assert_one_line_error(run_cli(capsys, *args[:-4], "--sweep-thresholds", "hurt=1", "--out", str(tmp / "G3")),
                          "bad sweep threshold")
