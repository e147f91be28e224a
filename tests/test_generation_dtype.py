"""Generation in another dtype (`generation_dtype`): the weights are cast while replies are generated and
come back bit for bit; the replies are cached apart from the model's own; scores and perplexity read the
model as it is."""

import json

import pytest
import torch

from ssah.config import RunConfig
from ssah.data import Dataset, Record
from ssah.errors import SsahError
from ssah.evaluate import EvalSettings, evaluate_model
from ssah.evaluate.generation import generate_items, weights_cast
from ssah.models.tiny import tiny_model
from tests.helpers import assert_one_line_error, run_cli

PROMPTS = ["How do I bake bread?", "Name a river.", "Tell me a story about a cat who flies."]


def _state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_weights_cast_casts_every_floating_parameter_and_restores_it_exactly(family):
    model, _ = tiny_model(family)
    before = _state(model)
    originals = {name: param.data for name, param in model.named_parameters()}
    buffers = {name: buffer.dtype for name, buffer in model.named_buffers()}
    with weights_cast(model, "bf16"):
        assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
        assert {name: b.dtype for name, b in model.named_buffers()} == buffers  # rotary tables untouched
        next(model.parameters()).data.fill_(0)  # writes inside the block do not reach the originals
    for name, param in model.named_parameters():
        assert param.data_ptr() == originals[name].data_ptr() and torch.equal(param, before[name])


def test_weights_cast_restores_on_error_and_model_is_a_no_op():
    model, _ = tiny_model("qwen2")
    before = _state(model)
    with pytest.raises(RuntimeError), weights_cast(model, "fp16"):
        raise RuntimeError("stopped mid-generation")
    assert all(torch.equal(param, before[name]) and param.dtype == torch.float32
               for name, param in model.named_parameters())
    with weights_cast(model, "model"):
        assert all(param.dtype == torch.float32 for param in model.parameters())


def test_bf16_replies_come_from_bf16_weights():
    """The replies under the cast are those of a bf16 copy of the model, token for token."""
    model, tokenizer = tiny_model("llama")
    with weights_cast(model, "bf16"):
        cast = [g.reply for g in generate_items(model, tokenizer, PROMPTS, model_key="a", max_new_tokens=6,
                                                slots=3, progress=False)]
    copy, _ = tiny_model("llama")
    copy.to(torch.bfloat16)
    alone = [g.reply for g in generate_items(copy, tokenizer, PROMPTS, model_key="b", max_new_tokens=6,
                                             slots=3, progress=False)]
    assert cast == alone


def _data():
    harmful = Dataset("h", [Record(id=f"h{i}", prompt=p) for i, p in enumerate(PROMPTS)])
    text = Dataset("t", [Record(id="t", prompt="Rivers carry water from the hills to the sea. " * 8)])
    benign = Dataset("b", [Record(id="b", prompt="What is 2 + 3?", answer="5", normalizer="number")])
    return {"harmful": harmful, "text": text, "benign": benign}


def test_evaluation_in_bf16_is_cached_apart_and_perplexity_reads_the_model(tmp_path):
    model, tokenizer = tiny_model("llama")
    base = dict(suites=("safety", "utility"), rules=("prefix",), max_new_tokens=4, system_prompt="none",
                progress=False)
    fp32 = evaluate_model(model, tokenizer, "m", tmp_path / "fp32", EvalSettings(**base), _data())
    # the fp32 replies are in the cache the bf16 evaluation starts from: it must not take them
    (tmp_path / "bf16").mkdir()
    cached = (tmp_path / "fp32" / "generations.jsonl").read_text()
    (tmp_path / "bf16" / "generations.jsonl").write_text(cached)
    bf16 = evaluate_model(model, tokenizer, "m", tmp_path / "bf16",
                          EvalSettings(**base, generation_dtype="bf16"), _data(), replace=True)
    assert (tmp_path / "bf16" / "generations.jsonl").read_text().count("\n") == 2 * cached.count("\n")
    assert bf16["settings"]["generation_dtype"] == "bf16" and fp32["settings"]["generation_dtype"] == "model"
    assert bf16["utility"]["perplexity"] == fp32["utility"]["perplexity"]  # scored with the fp32 weights
    assert all(param.dtype == torch.float32 for param in model.parameters())


def test_eval_cli_takes_the_generation_dtype(capsys, tmp_path):
    result = run_cli(capsys, "eval", "--model", "tiny:gpt2", "--suite", "safety", "--limit", "2",
                     "--max-new-tokens", "3", "--generation-dtype", "bf16", "--out", str(tmp_path / "e"))
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["settings"]["generation_dtype"] == "bf16"
    bad = run_cli(capsys, "eval", "--model", "tiny:gpt2", "--generation-dtype", "int8", "--out", str(tmp_path / "x"))
    assert_one_line_error(bad, "--generation-dtype")


@pytest.mark.parametrize("stage_suites, fragment", [
    ({"prune": ["safety", "jailbreak"]}, "jailbreak"),
    ({"finetune": ["refusal_score"]}, "eval.stage_suites.finetune"),
    ({"finetune": []}, "eval.stage_suites.finetune"),
    ({"pruning": ["safety"]}, "pruning"),
])
def test_stage_suites_must_name_a_kind_and_a_subset_of_the_runs_suites(stage_suites, fragment):
    with pytest.raises(SsahError, match=fragment) as raised:
        RunConfig(eval={"suites": ["safety", "utility"], "stage_suites": stage_suites})
    assert "\n" not in str(raised.value)


def test_alignment_data_in_bf16_writes_its_own_replies_under_their_own_key(tmp_path):
    """The model's own replies (borderline answers, compliant starts) generated in bf16 are cached apart
    from fp32 ones, and an alignment trained on them has another identity."""
    from ssah.models.loading import load_model
    from ssah.train.data import alignment_data
    from ssah.train.recipes import AlignInputs

    loaded = load_model("tiny:llama")
    before = _state(loaded.model)
    harmful = Dataset("h", [Record(id=f"h{i}", prompt=p) for i, p in enumerate(PROMPTS)])
    benign = Dataset("b", [Record(id="b", prompt="Say hi.", response="Hi!")])
    refusals = Dataset("r", [Record(id="r", prompt="I can't help with that.")])
    borderline = Dataset("s", [Record(id="s", prompt="How do I kill a Python process?")])
    common = dict(borderline=borderline, borderline_tokens=4, recovery_lengths=[2], batch_size=2)
    fp32 = alignment_data(loaded, harmful, benign, refusals, cache_dir=tmp_path, **common)
    lines = (tmp_path / "borderline-replies.jsonl").read_text().count("\n")
    bf16 = alignment_data(loaded, harmful, benign, refusals, cache_dir=tmp_path, generation_dtype="bf16", **common)
    assert (tmp_path / "borderline-replies.jsonl").read_text().count("\n") == 2 * lines  # not reused
    assert fp32.counts["pairs"] and bf16.counts["pairs"]
    assert all(torch.equal(param, before[name]) and param.dtype == torch.float32
               for name, param in loaded.model.named_parameters())
    inputs = AlignInputs(harmful, benign, refusals)
    assert "generation_dtype" not in inputs.identity()  # identities of earlier runs are unchanged
    assert AlignInputs(harmful, benign, refusals, generation_dtype="bf16").identity() != inputs.identity()
