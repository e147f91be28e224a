"""The staged experiment on a tiny model: resumes after kill -9 with the numbers of an uninterrupted run."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssah.config import load_config
from ssah.errors import SsahError
from ssah.ownership import Manifest
from ssah.pipeline import run_pipeline
from ssah.probe.monitor import MonitorState
from tests.helpers import assert_one_line_error, run_cli

CONFIG = Path(__file__).parent / "data" / "tiny_run.yaml"
STAGES = ("baseline", "align", "groups", "prune")


def _numbers(run_dir: Path) -> dict:
    """Every stage summary, without wall-clock fields."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "load_seconds")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {d.name: strip(json.loads((d / "done.json").read_text())["summary"])
            for d in sorted(run_dir.iterdir()) if (d / "done.json").is_file()}


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    config = load_config(path=CONFIG)
    run_pipeline(config, tmp_path / "straight", only=STAGES)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ssah", "run", "--config", str(CONFIG), "--out", str(killed),
                             *[arg for s in STAGES for arg in ("--only", s)]],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "2-align" / "model-budget" / "train.json"  # mid-stage: one model trained, more to come
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never reached the align stage"
    assert not (killed / "2-align" / "done.json").exists()
    # Nothing half-written: every JSON parses, temporary folders are hidden and ignored.
    for path in killed.rglob("*.json"):
        json.loads(path.read_text())
    assert Manifest.read(killed).foreign() == []  # all it left is recorded as ssah's: --force may remove it

    run_pipeline(config, killed, only=STAGES)
    assert _numbers(killed) == _numbers(tmp_path / "straight")
    assert Manifest.read(killed).foreign() == []


# (config after the model line, the one-line error it must give)
BAD_CONFIGS = [
    ("scores:\n  scorer: variance\n  colour: red\n", "unknown config key 'scores.colour'"),
    ("probe:\n  monitor_settings: {action: shout}\n", "unknown probe.monitor_settings.action 'shout'"),
    ("finetune:\n  settings: [plain, freeze_iii]\n", "unknown finetune.settings[1] 'freeze_iii'"),
    ("align:\n  study: full\nfinetune:\n  settings: [freeze_budget]\n",
     "needs align.enabled: true and align.study: budget"),
    ("align:\n  refusal_unlikelihood: -1\n", "align.refusal_unlikelihood must be >= 0"),
    ("groups:\n  ranking: per_layer\n", "unknown groups.ranking 'per_layer'; use global, per-layer"),
    ("prune:\n  masks: [SCU, SCX]\n", "prune.masks: unknown mask term 'SCX'"),
    ("groups:\n  sizes: {scu: 0, ucu: 0, ru: 0}\n", "every group size is 0"),
    ("device: gpu0\n", "unknown device 'gpu0'"),
]


def _stamp(run_dir: Path, stage: str) -> int:
    return (run_dir / stage / "done.json").stat().st_mtime_ns


def test_rerun_reuses_what_a_change_leaves_valid_and_refuses_another_model(tmp_path, capsys):
    config = load_config(path=CONFIG)
    run_pipeline(config, tmp_path, only=("baseline",))
    stamp = _stamp(tmp_path, "1-baseline")
    run_pipeline(config, tmp_path, only=("baseline",))
    assert _stamp(tmp_path, "1-baseline") == stamp
    config.prune.masks = ["SCU"]  # read by a later stage only: the baseline stays done
    run_pipeline(config, tmp_path, only=("baseline",))
    assert _stamp(tmp_path, "1-baseline") == stamp
    config.eval.max_new_tokens += 1  # read by the baseline: it is redone
    run_pipeline(config, tmp_path, only=("baseline",))
    assert _stamp(tmp_path, "1-baseline") != stamp
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["eval"]["max_new_tokens"] == \
        config.eval.max_new_tokens
    other = load_config(path=CONFIG)
    other.model = "tiny:qwen2"
    with pytest.raises(SsahError, match="holds a run of model 'tiny:llama'"):
        run_pipeline(other, tmp_path, only=("baseline",))
    assert_one_line_error(run_cli(capsys, "run", "--preset", "demo", "--out", str(tmp_path), "--force", "nope"),
                          "unknown stage")
    assert_one_line_error(run_cli(capsys, "run", "--config", str(CONFIG), "--out", str(tmp_path), "--only", "prune"),
                          "needs the groups stage")
    bad = tmp_path / "bad.yaml"
    for body, message in BAD_CONFIGS:
        bad.write_text("model: tiny:llama\n" + body)
        assert_one_line_error(run_cli(capsys, "run", "--config", str(bad), "--out", str(tmp_path / "x")), message)
    assert not (tmp_path / "x").exists()  # a bad config writes nothing


def test_full_run_writes_report_with_verdicts(full_run):
    tmp_path, summaries = full_run
    assert Manifest.read(tmp_path).foreign() == []  # every file every stage wrote is recorded
    results = json.loads((tmp_path / "results.json").read_text())
    verdicts = results["verdicts"]
    assert set(verdicts) >= {"ru_alignment_lowers_asr", "ru_alignment_beats_random_budget",
                             "alignment_tax_ru_below_full", "prune_scu_breaks_safety_spares_utility",
                             "prune_ru_changes_little", "prune_ucu_costs_most_utility", "finetune_attack_raises_asr",
                             "freeze_ii_keeps_rise_to_half", "freeze_ii_beats_random", "aligned_closer_to_refusal",
                             "monitor_halves_prefill_asr", "monitor_overrefusal_cost"}
    # 4 prompts can show nothing: the tiny run's report holds no claim, and says why for each
    assert [claim for claim, v in verdicts.items() if v["verdict"] == "held"] == []
    for claim, v in verdicts.items():
        assert v["verdict"] in ("not held", "inconclusive") and v["tests"], claim
        assert v["verdict"] == "not held" or v["reason"], claim
    assert results["study"]["kind"] == "self-aligned" and results["verdict_rule"] == "prefix"
    # borderline prompts join the alignment data with their refusal openings made unlikely, and the
    # monitor's threshold comes from a calibration set no stage trained on
    assert summaries["align"]["borderline"] == 300
    train = json.loads((tmp_path / "2-align" / "model-budget" / "train.json").read_text())
    assert train["config"]["avoid_weight"] == 1.0
    assert summaries["probe"]["monitor"]["calibration"] is not None
    monitor = MonitorState.load(tmp_path / "6-probe" / "monitor.safetensors")
    assert monitor.meta["threshold_from"] == "benign and threshold-set calibration replies"
    assert monitor.meta["threshold_set"]["name"] == "sensitive_safe:calibration"
    # the claims that compare two evaluations of the same prompts carry their paired test, on all 4 prompts;
    # paired before -> after, the change in the rate is (rose - fell) / n, and it is the summaries' change
    limit = results["config"]["eval"]["limit"]
    stages = results["stages"]
    changes = {
        "ru_alignment_lowers_asr": stages["align"]["budget"]["eval"]["asr"]["prefix"]
        - stages["baseline"]["eval"]["asr"]["prefix"],
        "finetune_attack_raises_asr": stages["finetune"]["plain"]["asr"]["prefix"]
        - stages["prune"]["none"]["asr"]["prefix"],
    }
    for claim, change in changes.items():
        test = verdicts[claim]["tests"][0]
        assert test["name"] == "exact McNemar" and test["n"] == limit and 0.0 <= test["p_value"] <= 1.0, claim
        assert math.isclose(change, (test["rose"] - test["fell"]) / test["n"], abs_tol=1e-9), claim
        assert test["mde"] is None and "no effect is detectable at this n" in test["text"], claim
    scu = verdicts["prune_scu_breaks_safety_spares_utility"]["tests"][0]
    scu_rise = stages["prune"]["SCU"]["asr"]["prefix"] - stages["prune"]["none"]["asr"]["prefix"]
    assert math.isclose(scu["estimate"], scu_rise, abs_tol=1e-9)
    # no over-refusal change among 4 prompts is not "at most 5 points": Tango's interval spans far more
    over = verdicts["monitor_overrefusal_cost"]["tests"][0]
    assert over["name"] == "Tango score interval" and over["n"] == limit and over["ci"][1] > 0.4
    assert verdicts["monitor_overrefusal_cost"]["verdict"] == "inconclusive"
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "Llama-2-7B-Chat (paper)" in html
    assert summaries["finetune"]["freeze_ii"]["train"]["check"]["max_abs_change_frozen"] == 0.0
    # freeze_budget freezes exactly the units the align stage trained, and they stay bit-identical
    frozen_budget = summaries["finetune"]["freeze_budget"]
    assert frozen_budget["alignment_budget_frozen"] == 1.0
    assert frozen_budget["train"]["check"]["max_abs_change_frozen"] == 0.0
    assert 0.0 <= summaries["finetune"]["freeze_ii"]["alignment_budget_frozen"] < 1.0
    assert "freeze_budget_keeps_rise_to_half" in results["verdicts"]
    assert "Share of the alignment budget" in html and "freeze_budget 100.0%" in html
    assert all(math.isfinite(s["train"]["final_loss"]) for s in summaries["finetune"].values())
    assert abs(sum(map(sum, summaries["transfer"]["finetune"]["table_percent"])) - 100) < 1e-3
    # align.group_sizes sets the unaligned model's groups (the budget); the studied groups and both
    # transfer tables use groups.sizes, the unaligned model regrouped from its saved scores
    config = load_config(path=CONFIG)
    base = json.loads((tmp_path / "2-align" / "base" / "groups" / "groups.json").read_text())
    studied = json.loads((tmp_path / "3-groups" / "groups" / "groups.json").read_text())
    assert base["sizes"] == config.align.group_sizes and studied["sizes"] == config.groups.sizes
    assert summaries["transfer"]["alignment"]["sizes"] == config.groups.sizes
    assert abs(sum(map(sum, summaries["transfer"]["alignment"]["table_percent"])) - 100) < 1e-3
    # The studied model's own evaluation is reused for "nothing pruned", not generated again.
    same = [json.loads((tmp_path / d / "eval.json").read_text()) for d in ("2-align/eval-budget", "4-prune/eval-none")]
    assert same[0] == same[1]
    monitor = summaries["probe"]["monitor"]
    assert monitor["without"]["prefill_asr"] == summaries["prune"]["none"]["prefill_asr"]
    assert set(monitor["replaced"]) == {"safety", "prefill", "overrefusal"}
    assert "Runtime monitor" in html
    assert summaries["align"]["recovery"] > 0  # deeper-alignment examples from the model's own replies
    eval_monitor = json.loads((tmp_path / "6-probe" / "eval-monitor" / "eval.json").read_text())
    assert "+monitor-" in eval_monitor["model"]["key"] and eval_monitor["monitor"]["calibration"]


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    """The self-contained report opens in a real browser: the DOM it builds holds the verdict table, the
    tests' p-values and the charts, and a screenshot shows text, tables and plots."""
    from matplotlib.image import imread

    run_dir, _ = full_run
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", (run_dir / "report.html").as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "<th>effect</th><th>verdict</th>" in dom and "exact McNemar" in dom and "p = " in dom
    for chart in ("pruning ablation", "benign fine-tuning", "runtime monitor"):
        assert f'<img alt="{chart}' in dom, chart
    assert dom.count('src="data:image/png;base64,') >= 5
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,2400", (run_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    inked = (pixels.mean(axis=2) < 0.9).mean()  # share of non-white pixels
    colour = (pixels.max(axis=2) - pixels.min(axis=2) > 0.3).mean()  # plot lines and bars are coloured
    assert inked > 0.02 and colour > 0.001, (inked, colour)


def test_saved_groups_are_remade_when_their_ranking_changes(tmp_path):
    from ssah.pipeline.context import RunContext

    config = load_config(path=CONFIG)
    run = RunContext(config, tmp_path)
    loaded = run.load()
    first = run.score_and_group(loaded, tmp_path / "groups-stage")
    assert first.meta["ranking"] == "global"
    config.groups.ranking = "per-layer"
    again = run.score_and_group(loaded, tmp_path / "groups-stage")
    assert again.meta["ranking"] == "per-layer"
    on_disk = json.loads((tmp_path / "groups-stage" / "groups" / "groups.json").read_text())
    assert on_disk["ranking"] == "per-layer"


def test_full_run_has_the_controls(full_run):
    """freeze_random draws, freeze_ii_strict and the random alignment budget: rows of their own, with
    their trainable shares and per-prompt replies for paired tests."""
    tmp_path, summaries = full_run
    ft, align = summaries["finetune"], summaries["align"]
    assert set(ft) == {"plain", "freeze_ii", "freeze_ii_strict", "freeze_random_s0", "freeze_random_s1",
                       "freeze_budget", "lora"}
    share = {row: ft[row]["trainable_share"] for row in ft}
    assert share["plain"] == 1.0 and 0 < share["lora"] < 0.5
    assert 0 < share["freeze_ii_strict"] < share["freeze_ii"] < 1.0
    for seed in (0, 1):
        draw = ft[f"freeze_random_s{seed}"]
        # the same per-layer, per-kind sizes as freeze_ii: as many units and entries, other units
        assert draw["units_frozen"] == ft["freeze_ii"]["units_frozen"] and draw["overlap"] < 1.0
        assert draw["trainable_share"] == pytest.approx(share["freeze_ii"])
        assert draw["control_of"] == "freeze_ii" and draw["seed"] == seed
        assert draw["train"]["check"]["max_abs_change_frozen"] == 0.0
        assert (tmp_path / "5-finetune" / f"eval-freeze_random_s{seed}" / "replies.jsonl").is_file()
    assert ft["freeze_ii_strict"]["train"]["check"]["max_abs_change_frozen"] == 0.0
    # LoRA at its own rate (finetune.lora_lr), every other row at finetune.train's
    assert ft["lora"]["train"]["lr"] == 0.01 and {ft[row]["train"]["lr"] for row in ft if row != "lora"} == {0.001}
    drawn = align["random_budget"]["random_budget_s0"]
    assert drawn["units"] == align["budget"]["units"] and drawn["overlap_with_budget"] == 0.0
    assert drawn["trainable_share"] == pytest.approx(align["budget"]["trainable_share"])
    assert align["budget"]["trainable_share"] < 1.0
    assert align["full"]["trainable_share"] == 1.0
    assert drawn["train"]["check"]["max_abs_change_frozen"] == 0.0 and drawn["eval"]["n"]
    assert (tmp_path / "2-align" / "eval-random_budget_s0" / "replies.jsonl").is_file()


def test_each_kind_of_evaluation_runs_its_stage_suites(full_run):
    """eval.stage_suites: the random pruning draws and random freezes run only safety, the other fine-tuned
    models safety and utility, the unpruned reference every suite a pruned model runs; unnamed kinds run eval.suites."""
    tmp_path, _ = full_run

    def suites(folder):
        return json.loads((tmp_path / folder / "eval.json").read_text())["settings"]["suites"]

    every = ["safety", "refusal_score", "prefill", "overrefusal", "utility"]
    assert suites("4-prune/eval-random_like_SCU") == ["safety"]
    assert suites("4-prune/eval-SCU") == suites("4-prune/eval-none") == every
    assert suites("5-finetune/eval-plain") == ["safety", "utility"]
    assert suites("5-finetune/eval-freeze_random_s0") == ["safety"]
    assert suites("1-baseline/eval") == suites("2-align/eval-budget") == every


def test_restore_table_pairs_the_studied_and_attacked_models_own_evaluations(full_run):
    """restore.enabled: the transfer stage restores each part into the plain attack's model; the table's
    two end points are the studied model's and the attacked model's ASR on the same prompts and rule."""
    tmp_path, summaries = full_run
    table = summaries["transfer"]["restore"]
    assert table["attacked_row"] == "plain" and table["rule"] == "prefix"
    assert [row["part"] for row in table["parts"]] == ["SCU", "embeddings", "SCU+CU+norms"]

    def asr(folder):
        return json.loads((tmp_path / folder / "eval.json").read_text())["asr"]["prefix"]

    assert table["aligned"]["asr"] == pytest.approx(asr("2-align/eval-budget"))
    assert table["attacked"]["asr"] == pytest.approx(asr("5-finetune/eval-plain"))
    for row in table["parts"]:
        assert 0 < row["share_of_entries"] < 1 and row["entries"] > 0
        assert (tmp_path / "7-transfer" / "restore" / row["folder"] / "replies.jsonl").is_file()
    # a larger part holds more entries than the one inside it
    entries = {row["part"]: row["entries"] for row in table["parts"]}
    assert entries["SCU+CU+norms"] > entries["SCU"]
    assert json.loads((tmp_path / "7-transfer" / "restore" / "restore.json").read_text())["n"] == table["n"]
    page = (tmp_path / "report.html").read_text()
    assert "Where fine-tuning breaks safety" in page and "SCU+CU+norms" in page
