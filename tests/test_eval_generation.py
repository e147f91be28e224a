"""Batched greedy generation: equal to batch size 1, cached per item, resumable after a kill."""

import json

import pytest
import torch

from ssah.errors import SsahError
from ssah.evaluate.batching import BatchingStats, _shared_prefix, choose_slots, continuous_generate, length_buckets
from ssah.evaluate.generation import GenerationCache, _encode_text, generate_items, generate_replies, render_prompts
from ssah.models.tiny import TINY_FAMILIES as FAMILIES
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


MANY = PROMPTS + [f"Question {i}: what comes after {i * 7}?" for i in range(6)]


SYSTEM = "Be brief."  # with the chat template, a shared opening of 25 tokens on the tiny models


def _encoded(tokenizer, prompts=MANY, system=None):
    return [_encode_text(tokenizer, text) for text in render_prompts(tokenizer, prompts, system)]


def _frequent_token(model, tokenizer, system=None) -> int:
    """A token the random tiny model emits that, taken as EOS, ends its replies at the most different
    steps (random weights rarely emit the real EOS)."""
    replies = continuous_generate(model, _encoded(tokenizer, system=system), max_new_tokens=9, eos_ids=[-1], pad_id=0,
                                  batch_size=len(MANY))

    def lengths(token):
        return {reply.index(token) if token in reply else 9 for reply in replies}

    return max(sorted({t for reply in replies for t in reply}), key=lambda t: len(lengths(t)))


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_and_static_batches_equal_batch_size_one(family):
    """Rows leave and join a continuous batch (12 prompts, 4 slots); no reply changes by a token."""
    model, tokenizer = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights: the gemma families' tiny models repeat one token
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    model.generation_config.eos_token_id = _frequent_token(model, tokenizer, SYSTEM)
    # A system prompt gives every input a long shared opening, which continuous batching computes once.
    settings = dict(model_key=family, max_new_tokens=9, progress=False, system=SYSTEM)
    assert len(_shared_prefix(_encoded(tokenizer, system=SYSTEM))) >= 8
    single = generate_items(model, tokenizer, MANY, batch_size=1, batching="static", **settings)
    static = generate_items(model, tokenizer, MANY, batch_size=4, batching="static", **settings)
    continuous = generate_items(model, tokenizer, MANY, batch_size=4, **settings)
    # More slots than prompts: every prompt enters at once, prefilled in groups of similar length.
    wide = generate_items(model, tokenizer, MANY, slots=32, **settings)
    assert len({len(g.token_ids) for g in single}) >= 2  # rows did end at different steps
    assert [g.token_ids for g in static] == [g.token_ids for g in single]
    assert [g.token_ids for g in continuous] == [g.token_ids for g in single]
    assert [g.token_ids for g in wide] == [g.token_ids for g in single]


def test_continuous_batching_refills_finished_slots():
    """A slot freed by a reply's end is refilled, and no row steps after its reply ended."""
    model, tokenizer = tiny_model("llama")
    eos = _frequent_token(model, tokenizer)
    encoded = _encoded(tokenizer)
    single = [continuous_generate(model, [ids], max_new_tokens=9, eos_ids=[eos], pad_id=0, batch_size=1)[0]
              for ids in encoded]
    stats = BatchingStats()
    replies = continuous_generate(model, encoded, max_new_tokens=9, eos_ids=[eos], pad_id=0, batch_size=4,
                                  refill=1, stats=stats)
    assert replies == single and len({len(r) for r in replies}) >= 3
    # A reply's first token comes from its prefill; each later token, or the EOS that ends it, from one
    # row-step. A row that keeps stepping after its end would add row-steps.
    assert stats.row_steps == sum(len(r) if len(r) < 9 else 8 for r in replies)
    assert stats.prefills > 1 and stats.tokens == sum(len(r) for r in replies)


def test_length_buckets_keep_padding_small():
    lengths = [40, 12, 38, 11, 100, 9, 31, 75]
    groups = length_buckets(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert min(lengths[i] for i in group) >= 0.75 * max(lengths[i] for i in group)
    assert groups == [[4, 7], [0, 2, 6], [1, 3, 5]]  # longest first, input order inside a group
    assert length_buckets([5, 5, 5]) == [[0, 1, 2]]


def test_auto_slots_are_measured_once_per_model_shape(tmp_path):
    """`slots="auto"` measures decoding at growing slot counts once, then reads the choice back."""
    cache_file = tmp_path / "slots.json"
    model, tokenizer = tiny_model("llama")
    first = choose_slots(model, cache_file)
    assert first.measured and first.slots in first.rows_per_s and first.reason
    assert min(first.rows_per_s) == 8 and all(rate > 0 for rate in first.rows_per_s.values())
    fastest = max(first.rows_per_s.values())  # the choice: the fewest slots within 10% of the fastest
    assert first.rows_per_s[first.slots] * 1.1 >= fastest
    assert all(rate * 1.1 < fastest for slots, rate in first.rows_per_s.items() if slots < first.slots)
    again = choose_slots(model, cache_file)
    assert not again.measured and again.slots == first.slots and again.rows_per_s == first.rows_per_s
    other, _ = tiny_model("gpt2")  # another shape: measured on its own
    assert choose_slots(other, cache_file).measured
    assert len(json.loads(cache_file.read_text())) == 2


def test_auto_slots_generate_the_batch_one_replies(tmp_path, monkeypatch):
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("qwen2")
    settings = dict(model_key="m", max_new_tokens=5, progress=False)
    auto = generate_items(model, tokenizer, MANY, slots="auto", **settings)
    single = generate_items(model, tokenizer, MANY, batch_size=1, batching="static", **settings)
    assert [g.token_ids for g in auto] == [g.token_ids for g in single]
    assert (tmp_path / "slots.json").is_file()
    for bad in (0, "fast", 2.5):
        with pytest.raises(SsahError, match="slots"):
            generate_items(model, tokenizer, MANY[:1], slots=bad, **settings)


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
