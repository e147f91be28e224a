"""Log-likelihood scoring, the refusal score, multiple-choice accuracy and perplexity on tiny models."""

import math

import pytest
import torch

from ssah.errors import SsahError
from ssah.evaluate import (
    continuation_logprobs,
    multiple_choice_accuracy,
    perplexity,
    refusal_score,
    shared_continuation_logprobs,
)
from ssah.evaluate.refusal import openings_from
from ssah.evaluate.scoring import encode_continuations
from ssah.models.tiny import tiny_model

PROMPTS = ["How do I make a cake?", "hi", "Write a poem about the sea, in four lines."]
OPENINGS = ["I can't help", "Sorry, but I", "Sure, here is", "Here's how"]


def _reference_logprob(model, item) -> float:
    """Unbatched, unpadded: the plain definition."""
    ids = torch.tensor([item.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(item.prompt_len - 1, len(item.input_ids) - 1)
    return sum(float(logprobs[p, item.input_ids[p + 1]]) for p in positions)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox"])
def test_batched_scores_match_the_unpadded_definition(family):
    model, tokenizer = tiny_model(family)
    prompts = [p for p in PROMPTS for _ in OPENINGS]
    continuations = OPENINGS * len(PROMPTS)
    batched = continuation_logprobs(model, tokenizer, prompts, continuations, batch_size=5, progress=False)
    shared = shared_continuation_logprobs(model, tokenizer, PROMPTS, OPENINGS, prompt_batch_size=2, progress=False)
    encoded = encode_continuations(tokenizer, prompts, continuations)
    for score, item, shared_score in zip(batched, encoded, [s for row in shared for s in row]):
        reference = _reference_logprob(model, item)
        assert score.logprob == pytest.approx(reference, abs=1e-3)
        assert shared_score.logprob == pytest.approx(reference, abs=1e-3)
        assert score.n_tokens == shared_score.n_tokens == len(item.input_ids) - item.prompt_len


def test_refusal_score_is_the_documented_margin():
    model, tokenizer = tiny_model("qwen2")
    refusals = ["I can't help with that.", "Sorry, but I won't do that."]
    compliance = ["Sure, here is the answer.", "Here's how to do it."]
    result = refusal_score(model, tokenizer, PROMPTS, refusals, compliance, opening_words=3, progress=False)
    assert result.refusal_openings == ("I can't help", "Sorry, but I")
    assert result.n == len(PROMPTS)

    def log_mean_exp(values):
        return math.log(sum(math.exp(v) for v in values) / len(values))

    margins = []
    for prompt in PROMPTS:
        means = [s.mean_logprob for s in continuation_logprobs(
            model, tokenizer, [prompt] * 4, list(result.refusal_openings + result.compliance_openings),
            progress=False)]
        margins.append(log_mean_exp(means[:2]) - log_mean_exp(means[2:]))
    assert result.per_prompt == pytest.approx(margins, abs=1e-3)
    assert result.score == pytest.approx(sum(margins) / len(margins), abs=1e-3)


def test_openings_are_cut_deduplicated_and_capped():
    texts = ["I can't help with that.", "I can't help you.", "Sorry, no.", "Nope", "Never ever ever."]
    assert openings_from(texts, words=3, limit=3) == ["I can't help", "Sorry, no.", "Nope"]


def test_multiple_choice_accuracy_picks_the_most_likely_choice():
    model, tokenizer = tiny_model("llama")
    items = [("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
             ("How many legs does a cat have?", ["two", "four", "six"], 1),
             ("What is 2 + 2?", ["3", "5", "4"], 2),
             ("Which is a fruit?", ["apple", "chair"], 0)]
    rate = multiple_choice_accuracy(model, tokenizer, items, progress=False)
    expected = 0
    for question, choices, answer in items:
        scores = [s.logprob for s in continuation_logprobs(model, tokenizer, [question] * len(choices), choices,
                                                           progress=False)]
        expected += scores.index(max(scores)) == answer
    assert (rate.k, rate.n) == (expected, 4)
    with pytest.raises(SsahError, match="answer index in range"):
        multiple_choice_accuracy(model, tokenizer, [("q", ["a", "b"], 2)], progress=False)


def test_perplexity_sliding_window():
    model, tokenizer = tiny_model("llama")
    text = "The water cycle moves water between the oceans, the air and the land. " * 6
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    full_nll = -sum(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1))
    whole = perplexity(model, tokenizer, text, window=1024, stride=512, progress=False)
    assert whole.n_tokens == len(ids) - 1
    assert whole.perplexity == pytest.approx(math.exp(full_nll / (len(ids) - 1)), rel=1e-4)
    windowed = perplexity(model, tokenizer, text, window=128, stride=48, batch_size=3, progress=False)
    assert windowed.n_tokens == len(ids) - 1  # every token but the first scored exactly once
    assert windowed.perplexity == pytest.approx(whole.perplexity, rel=0.2)  # less context, similar value
    # the scored tokens' NLLs in blocks of 64 consecutive tokens, for an interval over blocks: the same
    # blocks whatever the windows, summing to the aggregate
    detail, whole_detail = windowed.to_dict(), whole.to_dict()
    assert detail["block_size"] == 64 and len(detail["block_nll"]) == len(detail["block_tokens"]) > 1
    assert detail["block_tokens"] == whole_detail["block_tokens"] and sum(detail["block_tokens"]) == len(ids) - 1
    assert all(t == 64 for t in detail["block_tokens"][:-1])
    assert sum(detail["block_nll"]) == pytest.approx(windowed.nll, rel=1e-6)
    assert whole_detail["block_nll"] == pytest.approx(detail["block_nll"], rel=0.3)
    with pytest.raises(SsahError, match="stride"):
        perplexity(model, tokenizer, text, window=64, stride=65, progress=False)
