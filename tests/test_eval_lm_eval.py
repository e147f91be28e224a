"""The lm-evaluation-harness bridge, offline: a local YAML task over a JSONL file written here."""

import json

import pytest

from ssah.data import Dataset, Record
from ssah.evaluate import EvalSettings, evaluate_model
from ssah.models.tiny import tiny_model

LM_EVAL_TASK = """\
task: ssah_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_tasks_run_on_the_in_memory_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install lm-eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": "What color is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
        {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "answer": 1},
        {"question": "What is 2 + 2?", "choices": ["3", "5", "4"], "answer": 2}]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ssah_tiny_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    benign = Dataset("b", [Record(id="b0", prompt="What is 1 + 1?", answer="2", normalizer="number")])
    text = Dataset("t", [Record(id="t0", prompt="Rivers carry water from the hills to the sea.")])
    settings = EvalSettings(suites=("utility",), max_new_tokens=3, lm_eval_tasks=("ssah_tiny_mc",),
                            lm_eval_include=str(tasks), progress=False)
    model, tokenizer = tiny_model("llama")
    report = evaluate_model(model, tokenizer, "tiny", tmp_path / "out", settings, {"benign": benign, "text": text})
    assert 0.0 <= report["utility"]["lm_eval"]["ssah_tiny_mc"]["acc,none"] <= 1.0
