"""Utility metrics: checkable-task accuracy, multiple-choice accuracy by log-likelihood, perplexity.

Perplexity follows the standard Hugging Face sliding-window recipe ("Perplexity of fixed-length
models"): the text is tokenised once, windows of `window` tokens start every `stride` tokens, and each
window scores only the tokens the previous window did not, so every token after the first window is
predicted with at least `window - stride` tokens of context. Every token but the first is scored exactly
once; perplexity = exp(total NLL / scored tokens). Defaults: window 512, stride 256 (the window is capped
at the model's maximum context length). Beside the total, the scored tokens' NLLs are summed in blocks of
`PERPLEXITY_BLOCK` consecutive tokens: the units a paired block bootstrap resamples to put an interval
on the ratio of two perplexities of the same text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ssah.data import Record, check_answer
from ssah.errors import SsahError
from ssah.evaluate.generation import Generation, GenerationCache, generate_items
from ssah.evaluate.scoring import continuation_logprobs
from ssah.evaluate.settings import DEFAULT_STRIDE, DEFAULT_WINDOW
from ssah.evaluate.stats import Rate

PERPLEXITY_BLOCK = 64  # scored tokens per block of the perplexity-ratio interval


@dataclass(frozen=True)
class TaskAccuracy:
    """Accuracy over checkable records, with each reply and whether it was correct."""

    accuracy: Rate
    generations: tuple[Generation, ...]
    correct: tuple[bool, ...]


def checkable(records: Sequence[Record]) -> list[Record]:
    """The records that carry an answer (the only ones `check_answer` can grade)."""
    return [record for record in records if record.answer is not None]


def task_accuracy(model, tokenizer, records: Sequence[Record], *, model_key: str, system: str | None = None,
                  max_new_tokens: int = 64, batch_size: int = 8, cache: GenerationCache | None = None,
                  progress: bool = True, rewrite=None, engine=None, slots=None,
                  watchers=()) -> TaskAccuracy:
    """Exact-match accuracy on checkable records: greedy reply, then `check_answer` (the record's
    normaliser). Records without an answer are an error: filter them with `checkable` first.
    `rewrite`, `engine`, `slots`, `watchers`: see `generate_texts` (e.g. a runtime monitor's refusals count as wrong
    answers)."""
    if not records:
        raise SsahError("task accuracy needs at least one record with an answer")
    missing = [record.id for record in records if record.answer is None]
    if missing:
        raise SsahError(f"record {missing[0]!r} has no answer; task accuracy needs checkable records")
    generations = generate_items(model, tokenizer, [record.prompt for record in records], model_key=model_key,
                                 system=system, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 cache=cache, progress=progress, desc="tasks", rewrite=rewrite, engine=engine,
                                 slots=slots, watchers=watchers)
    correct = tuple(check_answer(record, gen.reply) for record, gen in zip(records, generations))
    return TaskAccuracy(Rate.of(correct), tuple(generations), correct)


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A question, its answer choices, and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int


def multiple_choice_accuracy(model, tokenizer, items: Sequence[MultipleChoiceItem | tuple[str, Sequence[str], int]],
                             *, system: str | None = None, length_normalized: bool = False,
                             batch_size: int = 32, progress: bool = True) -> Rate:
    """Accuracy when the model picks the choice it finds most likely as its reply to the question.

    Each choice is scored as the opening of the assistant's reply (chat template): the sum of its token
    log-probabilities (lm-evaluation-harness `acc`), or the mean per token with
    `length_normalized=True`. Ties go to the first choice.
    """
    parsed = [item if isinstance(item, MultipleChoiceItem) else MultipleChoiceItem(item[0], tuple(item[1]), item[2])
              for item in items]
    if not parsed:
        raise SsahError("multiple-choice accuracy needs at least one item")
    for number, item in enumerate(parsed):
        if len(item.choices) < 2 or not 0 <= item.answer < len(item.choices):
            raise SsahError(f"multiple-choice item {number}: needs 2+ choices and an answer index in range, "
                            f"got {len(item.choices)} choices and answer {item.answer}")
    prompts = [item.question for item in parsed for _ in item.choices]
    choices = [choice for item in parsed for choice in item.choices]
    scores = continuation_logprobs(model, tokenizer, prompts, choices, system=system, batch_size=batch_size,
                                   progress=progress, desc="multiple choice")
    hits, offset = [], 0
    for item in parsed:
        values = [s.mean_logprob if length_normalized else s.logprob
                  for s in scores[offset:offset + len(item.choices)]]
        offset += len(item.choices)
        hits.append(max(range(len(values)), key=lambda i: (values[i], -i)) == item.answer)
    return Rate.of(hits)


@dataclass(frozen=True)
class Perplexity:
    """exp(mean NLL) over `n_tokens` scored tokens, with the window and stride used, and the summed NLL
    and token count of each block of `PERPLEXITY_BLOCK` consecutive scored tokens."""

    perplexity: float
    nll: float
    n_tokens: int
    window: int
    stride: int
    block_nll: tuple[float, ...] = ()
    block_tokens: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.nll / self.n_tokens, "n_tokens": self.n_tokens,
                "window": self.window, "stride": self.stride, "block_size": PERPLEXITY_BLOCK,
                "block_nll": list(self.block_nll), "block_tokens": list(self.block_tokens)}


def _max_context(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, *, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
               batch_size: int = 4, progress: bool = True) -> Perplexity:
    """Sliding-window perplexity of `text` (recipe in the module docstring)."""
    context = _max_context(model)
    window = min(window, context) if context else window
    if not 0 < stride <= window:
        raise SsahError(f"perplexity stride must be between 1 and the window ({window}), got {stride}")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) < 2:
        raise SsahError("perplexity needs a text of at least two tokens")
    # (start, end, first scored position within the window)
    spans, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        spans.append((begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == len(ids):
            break
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    window_nll, window_tokens = [], []
    n_blocks = (len(ids) - 2) // PERPLEXITY_BLOCK + 1  # target positions 1 .. len - 1
    block_nll = torch.zeros(n_blocks, dtype=torch.float64)
    block_tokens = torch.zeros(n_blocks, dtype=torch.long)
    for start in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        chunk = spans[start:start + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (begin, end, _) in enumerate(chunk):  # right padding: real positions are unchanged
            input_ids[row, :end - begin] = torch.tensor(ids[begin:end])
            attention[row, :end - begin] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        for row, (begin, end, first) in enumerate(chunk):
            n = end - begin
            logprobs = torch.log_softmax(logits[row, first - 1:n - 1].float(), dim=-1)
            targets = input_ids[row, first:n].to(device)
            token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            window_nll.append(-float(token_logprobs.sum()))
            window_tokens.append(n - first)
            blocks = (torch.arange(begin + first, begin + n) - 1) // PERPLEXITY_BLOCK
            block_nll.index_add_(0, blocks, -token_logprobs.double().cpu())
            block_tokens.index_add_(0, blocks, torch.ones_like(blocks))
    total_nll, total_tokens = sum(window_nll), sum(window_tokens)
    return Perplexity(math.exp(total_nll / total_tokens), total_nll, total_tokens, window, stride,
                      tuple(block_nll.tolist()), tuple(int(t) for t in block_tokens.tolist()))
