"""Every script in experiments/ runs end to end (--smoke, on tiny:llama) and writes its results file.

Each script runs as a subprocess from the repository root, as a user runs it, so a broken import fails
here; its results go to tmp_path, never to experiments/results. The committed results files are checked
against the scripts' docstrings.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssah.config import load_config
from ssah.pipeline import RunLayout, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
RESULTS = EXPERIMENTS / "results"
SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.stem != "common")
CONFIG = Path(__file__).parent / "data" / "tiny_run.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
RUN_KEYS = {"source", "date", "commit", "command", "model", "smoke", "settings", "rule", "rows", "decision"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _common():
    spec = importlib.util.spec_from_file_location("experiments_common", EXPERIMENTS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docstring(name: str) -> str:
    return ast.get_docstring(ast.parse((EXPERIMENTS / f"{name}.py").read_text(encoding="utf-8")))


@pytest.fixture(scope="module", autouse=True)
def committed_results_untouched():
    before = {p.name: p.read_bytes() for p in RESULTS.glob("*.json")}
    yield
    assert {p.name: p.read_bytes() for p in RESULTS.glob("*.json")} == before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny run folder with every stage the scripts read: the RU budget and borderline replies (align),
    the studied model's groups, its unpruned evaluation (prune), its plain fine-tuning attack and its
    runtime monitor (probe)."""
    config = load_config(path=CONFIG)
    config.align.compare_full = False
    config.align.random_budget_seeds = []
    config.finetune.settings = ["plain"]
    out = tmp_path_factory.mktemp("experiments") / "run"
    run_pipeline(config, out, only=("baseline", "align", "groups", "prune", "finetune", "probe"))
    return out


def run_script(name: str, tmp_path: Path, *args: str) -> dict:
    """Run experiments/NAME.py --smoke; returns the one run its results file holds, checked for shape."""
    results = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, f"experiments/{name}.py", "--smoke", "--results", str(results), *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"results appended to {results}" in proc.stdout
    data = json.loads(results.read_text(encoding="utf-8"))
    assert data["script"] == f"{name}.py"
    assert data["question"] == _common().section(_docstring(name), "Question")
    (run,) = data["runs"]
    assert set(run) == RUN_KEYS
    assert run["source"] == "measured by this script" and run["smoke"] is True
    assert run["command"].startswith(f"python experiments/{name}.py --smoke")
    assert run["rule"] == _common().section(_docstring(name), "Rule")
    assert run["date"] and run["model"] and run["rows"]
    assert run["decision"]["kind"] in ("choice", "measurement")
    return run


def is_rate(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_align_recipe(tmp_path):
    run = run_script("align_recipe", tmp_path, "--out", str(tmp_path / "recipes"))
    rows = run["rows"]
    assert [(r["recipe"], r["lr"], r["steps"]) for r in rows] == [("r1", 2e-4, 2), ("r1-lr12-ul005", 1.2e-3, 2)]
    assert all(is_rate(r["asr"]) and is_rate(r["overrefusal"]) for r in rows)
    assert all(r["meets_targets"] == (r["asr"] <= 0.25 and r["overrefusal"] <= 0.15) for r in rows)
    eligible = [r for r in rows if r["asr"] <= 0.20]
    expected = min(eligible, key=lambda r: (r["overrefusal"], r["borderline_repeats"]))["recipe"] if eligible else None
    assert run["decision"]["kind"] == "choice" and run["decision"]["chosen"] == expected
    # the second recipe reused the first one's replies to the borderline prompts, on the validation sets
    second = RunLayout(tmp_path / "recipes" / "r1-lr12-ul005")
    assert (second.stage("align") / "borderline-replies.jsonl").is_file()
    report = json.loads((second.aligned_eval("budget") / "eval.json").read_text())
    assert report["data"]["harmful"]["name"].startswith("harmful:calibration")
    assert report["data"]["sensitive"]["name"].startswith("sensitive_safe:calibration")


def test_finetune_attack_strength(tmp_path, tiny_run):
    out = tmp_path / "attack"
    run = run_script("finetune_attack_strength", tmp_path, "--aligned", str(tiny_run), "--out", str(out),
                     "--lrs", "1e-4", "4e-4")
    rows = run["rows"]
    assert [r["lr"] for r in rows] == [1e-4, 4e-4]
    for r in rows:
        assert is_rate(r["aligned_asr"]) and is_rate(r["plain_asr"]) and is_rate(r["freeze_ii_asr"])
        assert r["plain_rise"] == pytest.approx(r["plain_asr"] - r["aligned_asr"])
        assert r["freeze_ii_rise"] == pytest.approx(r["freeze_ii_asr"] - r["aligned_asr"])
    strong = [r["lr"] for r in rows if r["plain_rise"] >= 0.20]
    assert run["decision"]["chosen"] == (strong[0] if strong else None)
    report = json.loads((out / "lr0.0004" / "eval-freeze_ii" / "eval.json").read_text())
    assert report["data"]["harmful"]["name"].startswith("harmful:calibration")  # validation, never test
    assert (out / "groups" / "groups" / "groups.json").is_file()


def test_maker_aligned_freezing(tmp_path, tiny_run):
    out = tmp_path / "strengths"
    run = run_script("maker_aligned_freezing", tmp_path, "--run", str(tiny_run), "--out", str(out),
                     "--strengths", "1e-3:2", "4e-3:2", "--seeds", "0", "1")
    rows = run["rows"]
    assert [(r["lr"], r["steps"]) for r in rows] == [(1e-3, 2), (4e-3, 2)]
    before = json.loads((RunLayout(tiny_run, "budget").prune_eval("none") / "eval.json").read_text())
    for r in rows:
        assert r["asr_before"] == before["asr"]["prefix"]  # the run's own unpruned evaluation
        assert all(is_rate(r[f"asr_{row}"]) for row in ("plain", "freeze_ii", "freeze_random_s0", "freeze_random_s1"))
        assert r["freeze_ii_keeps_rise_to_half"]["verdict"] in ("held", "not held", "inconclusive")
        assert r["freeze_ii_beats_random"]["verdict"] in ("held", "not held", "inconclusive")
        folder = out / f"lr{r['lr']:g}-s{r['steps']}"
        record = json.loads((folder / "5-finetune" / "model-freeze_ii" / "train.json").read_text())
        assert record["config"]["lr"] == r["lr"]
        saved = json.loads((folder / "verdicts.json").read_text())
        # the verdict's test paired the before, plain and freeze_ii replies of these folders
        verdict = r["freeze_ii_keeps_rise_to_half"]["verdict"]
        assert saved["verdicts"]["freeze_ii_keeps_rise_to_half"]["verdict"] == verdict
    assert run["decision"]["summary"] == {f"lr{r['lr']:g}-s{r['steps']}": r["freeze_ii_keeps_rise_to_half"]["verdict"]
                                          for r in rows}


def test_ru_share(tmp_path, tiny_run):
    run = run_script("ru_share", tmp_path, "--run", str(tiny_run), "--definitions", "rank/global",
                     "zscore-per-layer/per-layer", "--grid", "0.3", "0.1", "0.02")
    rows = run["rows"]
    assert [r["definition"] for r in rows] == ["rank/global", "zscore-per-layer/per-layer"]
    for r in rows:
        # the rule, applied to the measured steps: the largest share within 5 points and x1.10
        kept = [s["share"] for s in r["steps"] if abs(s["refusal_rate"] - r["unpruned_refusal_rate"]) <= 0.05 + 1e-9
                and s["perplexity_ratio"] <= 1.10]
        assert r["ru_share"] == (max(kept) if kept else 0.0)
        assert [s["share"] for s in r["steps"]] == [0.3, 0.1, 0.02][:len(r["steps"])]  # largest first
        assert all(s["units"] > 0 for s in r["steps"])
    best = max(rows, key=lambda r: r["ru_share"])
    assert run["decision"]["ru_share"] == best["ru_share"]


def test_finetune_trainable_units(tmp_path, tiny_run):
    out = tmp_path / "trainable"
    run = run_script("finetune_trainable_units", tmp_path, "--run", str(tiny_run), "--out", str(out),
                     "--units", "UCU+RU", "RU")
    rows = run["rows"]
    assert [r["units"] for r in rows] == ["UCU+RU", "RU"]
    assert 0 < rows[1]["trainable_share"] < rows[0]["trainable_share"] <= 1
    assert all(is_rate(r["asr"]) and is_rate(r["studied_asr"]) and is_rate(r["plain_attack_asr"]) for r in rows)
    assert all(r["perplexity"] > 0 and r["final_loss"] > 0 for r in rows)
    assert run["decision"] == {"kind": "measurement", "summary": {
        "rule": "prefix", "share_of_plain_rise": {r["units"]: r["share_of_plain_rise"] for r in rows}}}
    assert (out / "trainable-UCU_RU" / "model" / "train.json").is_file()


def test_monitor_unseen(tmp_path, tiny_run):
    out = tmp_path / "unseen"
    run = run_script("monitor_unseen", tmp_path, "--run", str(tiny_run), "--out", str(out))
    rows = run["rows"]
    assert [r["metric"] for r in rows] == ["asr", "prefill_asr", "overrefusal_rate"]
    for r in rows:
        assert is_rate(r["with"]) and is_rate(r["without"]) and r["n"] == 4
        assert r["change"] == pytest.approx(r["with"] - r["without"])
        assert r["with_ci"][0] <= r["with"] <= r["with_ci"][1]
    summary = run["decision"]["summary"]
    assert summary["asr_change"] == rows[0]["change"]
    assert set(summary["replaced"]) == {"safety", "prefill", "overrefusal"}
    report = json.loads((out / "with" / "eval.json").read_text())
    assert report["data"]["harmful"]["name"] == "harmful:test[4:8]"  # after the prompts the run evaluated
    assert "monitor" in report


def test_align_borderline(tmp_path, tiny_run):
    run = run_script("align_borderline", tmp_path, "--run", str(tiny_run), "--out", str(tmp_path / "borderline"),
                     "--repeats", "1", "2")
    once, twice = run["rows"]
    assert (once["repeats"], twice["repeats"]) == (1, 2)
    assert once["borderline"] > 0 and twice["pairs"] - once["pairs"] == once["borderline"]
    assert all(is_rate(r["harmful_refusal"]) and is_rate(r["sensitive_refusal"]) for r in run["rows"])
    assert run["decision"]["summary"]["sensitive_refusal"] == {"1": once["sensitive_refusal"],
                                                               "2": twice["sensitive_refusal"]}


def test_monitor_calibration_size(tmp_path, tiny_run):
    model = RunLayout(tiny_run).aligned_model("budget")
    run = run_script("monitor_calibration_size", tmp_path, "--model", str(model), "--threshold-sets", "preset", "none")
    rows = run["rows"]
    assert [(r["threshold_set"], r["calibration_limit"]) for r in rows] == [("preset", 4), ("preset", 5),
                                                                            ("none", 4), ("none", 5)]
    assert {r["threshold_set"]: r["threshold_calibration"] for r in rows} == {
        "preset": "sensitive_safe:calibration", "none": None}
    assert all(is_rate(r["harmful_flag_rate"]) and is_rate(r["benign_flag_rate"]) and len(r["layers"]) == 1
               for r in rows)
    chosen = run["decision"]["chosen"]
    assert set(chosen) == {"preset", "none"} and all(limit in (4, 5, None) for limit in chosen.values())


def test_monitor_positions(tmp_path, tiny_run):
    run = run_script("monitor_positions", tmp_path, "--model", str(RunLayout(tiny_run).aligned_model("budget")))
    rows = run["rows"]
    assert [r["layer"] for r in rows] == list(range(len(rows))) and rows
    assert all(is_rate(r["at_request"]) and is_rate(r["at_last_token"]) for r in rows)
    best_request = max(r["at_request"] for r in rows)
    best_last = max(r["at_last_token"] for r in rows)
    assert run["decision"]["chosen"] == ("request" if best_request >= best_last else "last_token")


def test_results_file_gains_one_run_per_call_and_keeps_other_scripts_out(tmp_path):
    common = _common()
    args = type("Args", (), {})()
    args.smoke, args.out = False, tmp_path
    for rows in ([{"x": 1.0}], [{"x": float("inf")}]):
        common.record_run(tmp_path / "r.json", script="align_recipe.py", doc=_docstring("align_recipe"), model="m",
                          args=args, rows=rows, decision={"kind": "measurement", "summary": {}})
    data = json.loads((tmp_path / "r.json").read_text())
    assert [run["rows"] for run in data["runs"]] == [[{"x": 1.0}], [{"x": "inf"}]]
    assert data["runs"][0]["settings"] == {"out": str(tmp_path)}
    with pytest.raises(SystemExit, match="align_recipe.py"):
        common.record_run(tmp_path / "r.json", script="monitor_unseen.py", doc=_docstring("monitor_unseen"),
                          model="m", args=args, rows=[], decision={})


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_results_match_their_script(name):
    """experiments/results/NAME.json exists for every script, names it, asks its docstring's question, and
    every run in it (measured or transcribed) has the fields of a run and says where it came from."""
    common = _common()
    data = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    assert data["script"] == f"{name}.py"
    assert data["question"] == common.section(_docstring(name), "Question")
    for run in data["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["source"] == "measured by this script" or run["source"].startswith("transcribed from")
        assert run["date"] and run["rows"] and run["decision"]["kind"] in ("choice", "measurement")
        assert run["smoke"] is False  # smoke numbers mean nothing and stay out of the committed files


def test_group_definition(tmp_path):
    run = run_script("group_definition", tmp_path, "--out", str(tmp_path / "tables"))
    rows = run["rows"]
    assert [r["definition"] for r in rows] == ["variance/rank/global", "variance/rank/per-layer"]
    for r in rows:
        models = [r["tiny:llama"], r["tiny:qwen2"]]
        assert r["meets_ru_everywhere"] == all(m["meets_ru"] for m in models)
        assert r["min_scu_excess"] == min(m["scu_excess_asr_rise"] for m in models)
    both = [r for r in rows if r["meets_both_everywhere"]]
    pool = both or [r for r in rows if r["meets_ru_everywhere"]]
    expected = max(pool, key=lambda r: r["min_scu_excess"])["definition"] if pool else None
    assert run["decision"]["chosen"] == expected
    table = json.loads((tmp_path / "tables" / "table-1" / "faithfulness.json").read_text())
    assert table["spec"]["safety_data"] == "harmful:calibration"  # calibration, never test
