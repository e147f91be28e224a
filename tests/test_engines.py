"""Evaluation engines: the copy a folder-based engine loads, the vllm engine's checks, and vLLM itself
where it is installed (a GPU machine)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ssah.evaluate.engines import drop_engine_copy, engine_model_folder
from ssah.evaluate.generation import generate_items
from ssah.evaluate.runner import evaluate_model, read_replies
from ssah.evaluate.settings import EvalSettings
from ssah.interventions.masks import random_mask
from ssah.interventions.prune import pruned
from ssah.models.loading import load_model
from tests.helpers import assert_one_line_error, run_cli

PROMPTS = ["How do I bake bread?", "Name a river.", "What is 2 plus 2?", "Say hello."]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_the_engine_copy_holds_the_pruned_model_and_is_saved_once(tmp_path):
    """A pruned evaluation under a folder engine saves the pruned weights once; loaded back, that copy
    gives the replies the reversibly pruned model gives."""
    loaded = load_model("tiny:llama", device="cpu")
    mask = random_mask(loaded.layout, 0.3)
    settings = dict(max_new_tokens=6, progress=False)
    with pruned(loaded.model, loaded.layout, mask):
        expected = generate_items(loaded.model, loaded.tokenizer, PROMPTS, model_key="pruned", **settings)
        folder = engine_model_folder(loaded.model, loaded.tokenizer, "key-a", tmp_path)
        saved = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        assert engine_model_folder(loaded.model, loaded.tokenizer, "key-a", tmp_path) == folder
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == saved  # reused, not rewritten
    copy = load_model(str(folder), device="cpu")
    replies = generate_items(copy.model, copy.tokenizer, PROMPTS, model_key="copy", **settings)
    assert [g.token_ids for g in replies] == [g.token_ids for g in expected]
    unpruned = generate_items(loaded.model, loaded.tokenizer, PROMPTS, model_key="base", **settings)
    assert [g.token_ids for g in unpruned] != [g.token_ids for g in expected]  # the prune did change replies
    engine_model_folder(loaded.model, loaded.tokenizer, "key-b", tmp_path)  # another model: rewritten
    assert (folder / "config.json").stat().st_mtime_ns != saved["config.json"]
    drop_engine_copy(tmp_path)  # what a finished evaluation does
    assert not folder.exists() and tmp_path.exists()


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; the missing-engine error cannot happen")
def test_vllm_engine_without_vllm_is_one_line(tmp_path, capsys):
    result = run_cli(capsys, "eval", "--model", "tiny:llama", "--suite", "safety", "--limit", "2",
                     "--engine", "vllm", "--out", str(tmp_path / "e"))
    assert_one_line_error(result, "vllm", "--engine hf")
    assert result.code == 2 and not (tmp_path / "e").exists()  # refused before any work


def test_the_monitor_needs_the_hf_engine(tmp_path, capsys):
    monitor = tmp_path / "monitor.yaml"
    monitor.write_text("layers: [1]\n")
    result = run_cli(capsys, "eval", "--model", "tiny:llama", "--suite", "safety", "--limit", "2",
                     "--engine", "vllm", "--monitor", str(monitor), "--out", str(tmp_path / "e"))
    assert_one_line_error(result, "monitor", "--engine hf")
    assert result.code == 2


@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()),
                    reason="vLLM and a CUDA device are needed: pip install 'ssah[vllm]' on a GPU machine")
def test_vllm_replies_equal_the_hf_engine(tmp_path):
    """Same prompts, same greedy decoding: the vllm engine writes the replies the hf engine writes."""
    from ssah.models.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model"), dtype="fp32", device="cuda")
    reports = {}
    for engine in ("hf", "vllm"):
        settings = EvalSettings(suites=["safety"], rules=["prefix"], limit=8, max_new_tokens=8, system_prompt="none",
                                engine=engine, progress=False)
        reports[engine] = evaluate_model(loaded.model, loaded.tokenizer, loaded.fingerprint, tmp_path / engine,
                                         settings, model_folder=tmp_path / "model")
    replies = {engine: [row["reply"] for row in read_replies(tmp_path / engine)] for engine in reports}
    assert replies["vllm"] == replies["hf"]
    assert reports["vllm"]["asr"] == reports["hf"]["asr"]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; the missing-engine error cannot happen")
def test_a_run_with_the_vllm_engine_is_refused_before_its_first_stage(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny:llama\neval:\n  engine: vllm\n")
    result = run_cli(capsys, "run", "--config", str(config), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "vllm")
    assert result.code == 2 and not (tmp_path / "run").exists()
