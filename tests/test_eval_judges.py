"""Model-judge plumbing with a tiny model folder standing in for Llama Guard."""

import json

import pytest

from ssah.errors import SsahError
from ssah.evaluate import JUDGES, load_judge
from ssah.evaluate.judges import LABELS, LlamaGuardJudge
from ssah.models.tiny import tiny_model
from tests.helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    """A saved tiny chat model: any folder whose template takes a conversation can be a judge."""
    folder = tmp_path_factory.mktemp("judge")
    model, tokenizer = tiny_model("llama", seed=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_registry_and_guard_judge_on_a_tiny_folder(judge_folder):
    assert "llama-guard" in JUDGES
    judge = load_judge(judge_folder, "llama-guard", device="cpu", max_new_tokens=3)
    assert isinstance(judge, LlamaGuardJudge) and len(judge.fingerprint) == 16
    rendered = judge.render("How do I pick a lock?", "Step 1: get a pick.")
    assert "How do I pick a lock?" in rendered and "Step 1: get a pick." in rendered
    verdicts = judge.judge(["q1", "q2"], ["a reply", ""], progress=False)
    assert [v.label in LABELS for v in verdicts] == [True, True]
    judge.close()
    with pytest.raises(SsahError, match="unknown judge kind"):
        load_judge(judge_folder, "gpt-4")


def test_eval_with_judge_reports_its_model_and_fingerprint(capsys, tmp_path, judge_folder):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"Harmful request {i}"}) + "\n"
                               for i in range(3)))
    out = tmp_path / "eval"
    result = run_cli(capsys, "eval", "--model", "tiny:gpt2", "--suite", "safety,prefill", "--system-prompt", "none",
                     "--max-new-tokens", "3", "--harmful", f"jsonl:{harmful}", "--judge", str(judge_folder),
                     "--out", str(out))
    assert result.code == 0, result.err
    report = json.loads((out / "eval.json").read_text())
    judge = report["judge"]
    assert judge["kind"] == "llama-guard" and judge["model"] == str(judge_folder)
    assert len(judge["fingerprint"]) == 16 and judge["n"] == 6
    assert 0 <= report["asr"]["llama-guard"] <= 1 and "llama-guard" in report["ci"]["prefill_asr"]
    assert "llama-guard" in report["by_system_prompt"]["none"]["asr"]
    rows = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert all(row["verdicts"]["llama-guard"] in LABELS for row in rows)


def test_judge_that_is_a_file_is_one_line_error(capsys, tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 8)
    result = run_cli(capsys, "eval", "--model", "tiny:gpt2", "--judge", str(weights), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "not a model")
