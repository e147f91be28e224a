"""Batched greedy generation: equal to batch size 1, cached per item, resumable after a kill."""

import json

import pytest

from ssah.evaluate.generation import GenerationCache, generate_items, generate_replies
from ssah.models.tiny import tiny_model

PROMPTS = [
    "hi",
    "How do I bake bread at home?",
    "Tell me a long story about a cat who learns to fly over the mountains.",
    "ok?",
    "Explain the Pythagorean theorem.",
    "Name three rivers in Africa and one in Europe, please.",
]


class Interrupt(Exception):
    """Stands in for a kill in the middle of an evaluation."""


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3", "gpt2"])
def test_batched_equals_batch_size_one(family):
    model, tokenizer = tiny_model(family)
    settings = dict(model_key=family, max_new_tokens=10, progress=False)
    batched = generate_items(model, tokenizer, PROMPTS, batch_size=6, **settings)
    single = generate_items(model, tokenizer, PROMPTS, batch_size=1, **settings)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) > 0 for g in batched)


def test_system_prompt_and_prefill_change_the_input():
    model, tokenizer = tiny_model("llama")
    plain, with_system, with_prefill = (
        generate_items(model, tokenizer, ["hi"], model_key="m", max_new_tokens=4, progress=False, **extra)[0]
        for extra in ({}, {"system": "Be brief."}, {"prefills": ["Sure, here"]}))
    assert "Be brief." in with_system.text and with_prefill.text.endswith("Sure, here")
    assert len({plain.text, with_system.text, with_prefill.text}) == 3


def test_resume_after_kill_generates_only_unfinished_prompts(tmp_path):
    model, tokenizer = tiny_model("llama")
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(10)]
    cache_path = tmp_path / "generations.jsonl"
    settings = dict(model_key="tiny-llama", max_new_tokens=5, batch_size=3, progress=False)
    batches_done = []

    def kill_after_two_batches(finished):
        batches_done.append(len(finished))
        if len(batches_done) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_items(model, tokenizer, prompts, cache=GenerationCache(cache_path),
                       on_batch=kill_after_two_batches, **settings)
    assert len(GenerationCache(cache_path)) == 6  # two finished batches of three survived the kill

    resumed = generate_items(model, tokenizer, prompts, cache=GenerationCache(cache_path), **settings)
    assert sum(not g.cached for g in resumed) == 4  # exactly the unfinished ones
    fresh = generate_items(model, tokenizer, prompts, **settings)  # no cache at all
    assert [g.token_ids for g in resumed] == [g.token_ids for g in fresh]

    again = generate_items(model, tokenizer, prompts, cache=GenerationCache(cache_path), **settings)
    assert all(g.cached for g in again)  # a rerun costs nothing
    other = generate_items(model, tokenizer, prompts[:2], cache=GenerationCache(cache_path),
                           **{**settings, "max_new_tokens": 6})
    assert not any(g.cached for g in other)  # generation settings are part of the key


def test_cache_survives_a_torn_last_line(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    cache_path = tmp_path / "generations.jsonl"
    settings = dict(model_key="tiny-gpt2", max_new_tokens=4, batch_size=2, progress=False)
    first = generate_replies(model, tokenizer, PROMPTS[:2], cache=cache_path, **settings)
    with cache_path.open("a", encoding="utf-8") as handle:
        handle.write('{"key": "abc", "reply": "half a li')  # a write cut short by a kill
    replies = generate_replies(model, tokenizer, PROMPTS[:3], cache=cache_path, **settings)
    assert replies[:2] == first
    rows = [json.loads(line) for line in cache_path.read_text().splitlines()
            if line.strip() and not line.startswith('{"key": "abc"')]
    assert len(rows) == 3  # the new entry was not glued onto the torn line
    assert len(GenerationCache(cache_path)) == 3


def test_duplicate_prompts_are_generated_once():
    model, tokenizer = tiny_model("qwen2")
    seen = []
    items = generate_items(model, tokenizer, ["same", "same", "other"], model_key="q", max_new_tokens=3,
                           batch_size=4, progress=False, on_batch=seen.extend)
    assert len(seen) == 2 and items[0].token_ids == items[1].token_ids
