"""The benchmark harness: its statistics, and a tiny end-to-end pass from measurement to markdown."""

import json

import pytest

from benchmarks import common, harness, report
from ssah.models.loading import load_model


def test_summary_and_paired_ratios():
    stats = common.summary([3.0, 1.0, 2.0])
    assert (stats["median"], stats["min"], stats["max"], stats["n"]) == (2.0, 1.0, 3.0, 3)
    assert common.paired_ratios([2.0, 6.0], [1.0, 2.0])["values"] == [2.0, 3.0]
    assert common.target("t", 1.3, "<=", 1.2)["met"] is False
    assert common.target("t", 12, ">=", 10)["met"] is True


def test_linear_fit_recovers_a_line():
    fit = common.linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)


def test_synthetic_batches_have_scoring_masks():
    batch = common.synthetic_batches(50, 1, 2, 8)[0]
    assert set(batch) == {"input_ids", "attention_mask", "prompt_mask", "response_mask"}
    assert bool((batch["prompt_mask"] ^ batch["response_mask"]).all())


def test_tiny_run_renders_markdown_and_regenerates_from_json(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path))  # the generation table's auto slot count is cached there
    loaded = load_model("tiny:llama")
    results = {
        "scoring": harness.BENCHMARKS["scoring"].run(loaded, samples=2, repeats=1, max_length=64),
        "peers": harness.BENCHMARKS["peers"].run(loaded, samples=2, repeats=1, max_length=64),
        "freeze": harness.BENCHMARKS["freeze"].run(loaded, batch_size=1, length=16, steps=1, repeats=1, profile=True),
        "monitor": harness.BENCHMARKS["monitor"].run(loaded, batch=2, tokens=2, repeats=1),
        "generation": harness.BENCHMARKS["generation"].run(loaded, prompts=4, tokens=3, slots=(2,), batch1_prompts=2,
                                                           second=str(tmp_path / "absent.gguf")),
        "training": harness.BENCHMARKS["training"].run(loaded, batch_size=1, length=128, batches=1, repeats=1),
    }
    for name, result in results.items():
        result.update(command=f"python -m benchmarks --quick --only {name}", date="today", elapsed_s=0.0)
    data = {"mode": "quick", "model": "tiny:llama", "threads": 1, "command": "python -m benchmarks --quick",
            "machine": common.machine_info(), "benchmarks": results}
    json_path, md_path = tmp_path / "quick.json", tmp_path / "BENCHMARKS.md"
    json_path.write_text(json.dumps(data))
    harness.main(["--quick", "--render-only", "--json", str(json_path), "--markdown", str(md_path)])
    text = md_path.read_text()
    assert text == report.render(json.loads(json_path.read_text()), md_path, harness.BENCHMARKS)
    assert "## 1. Scoring vs a plain forward pass" in text and "## 7. GPU" in text
    assert "Not measured in this run: `python -m benchmarks --only scaling`" in text
    assert "absent.gguf is absent" in text and "share of roofline" in text
    generation = results["generation"]["models"][0]
    assert [row["slots"] for row in generation["rows"]][:2] == [1, 2] and generation["rows"][0]["vs_batch1"] == 1
    fp32_rows, (one, cast) = generation["rows"][:-2], generation["rows"][-2:]
    assert all(0 < row["roofline_share"] for row in fp32_rows)
    assert "bf16" in cast["side"] and cast["roofline_share"] is None and cast["vs_fp32_same_slots"] > 0
    # the like-for-like bf16 ratio: the bf16 slots against bf16 batch 1
    assert one["slots"] == 1 and "bf16" in one["side"] and one["roofline_share"] is None
    assert cast["vs_bf16_batch1"] == cast["tokens_per_s"] / one["tokens_per_s"] and "x batch 1 in bf16" in text
    assert "bf16" not in generation["best"] and "weights cast to bf16 for generation" in text
    for entry in results["training"]["data"]:  # response-only logits do less arithmetic than the full ones
        assert 0 < entry["learned_share"] < 1
        assert entry["rows"]["ours"]["flops_per_s"] * entry["rows"]["ours"]["seconds"]["median"] < \
            entry["rows"]["full"]["flops_per_s"] * entry["rows"]["full"]["seconds"]["median"]
    assert results["peers"]["storage"]["wanda_bytes"] > results["peers"]["storage"]["ours_bytes"]
    assert all(check["met"] in (True, False) for _, check in report._targets(results))


def test_a_benchmark_runs_as_a_script_with_flags_from_its_params():
    """`python benchmarks/bench_NAME.py` builds its flags from PARAMS (common.script_main)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_freeze.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--steps", "1", "--length", "16",
                           "--no-profile", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "batch 2 x 16 tokens" in done.stdout and "Profile of setting (ii)" not in done.stdout


def test_the_grid_benchmark_reads_a_grid_run_from_scratch_and_refuses_a_resumed_one(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_grid

    stage = tmp_path / "run" / "8-attacks"
    stage.mkdir(parents=True)
    compute = {"calibration": {"cells": 32, "seconds": 700.0, "untimed": 0},
               "test": {"cells": 28, "seconds": 900.0, "untimed": 0}, "monitor": {"cells": 12, "seconds": 400.0,
                                                                                  "untimed": 0}}
    (stage / "attacks.json").write_text(json.dumps({"compute": compute}))
    (stage / "done.json").write_text(json.dumps({"seconds": 2280.0}))
    monkeypatch.setenv("SSAH_BENCH_GRID_RUN", str(tmp_path / "run"))
    result = bench_grid.run(None)
    assert result["minutes"] == 38.0 and result["target"]["met"] and result["compute"] == compute
    text = "\n".join(bench_grid.render(result))
    assert "| calibration | 32 | 700 | 22 |" in text and "38.0 min" in text and "met (<= 40 min)" in text
    # a stage that reused cells did not take their seconds: not a measurement of the grid
    (stage / "done.json").write_text(json.dumps({"seconds": 600.0}))
    with pytest.raises(SystemExit) as stopped:
        bench_grid.run(None)
    assert stopped.value.code == 2 and "not a run from scratch" in capsys.readouterr().err
    # a folder with no finished stage: one line, status 2, no traceback
    monkeypatch.setenv("SSAH_BENCH_GRID_RUN", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit) as stopped:
        bench_grid.run(None)
    assert stopped.value.code == 2 and "holds no finished attack stage" in capsys.readouterr().err
    # the whole grid runs only when asked for by name
    assert "grid" in harness.BENCHMARKS and not harness.BENCHMARKS["grid"].DEFAULT
