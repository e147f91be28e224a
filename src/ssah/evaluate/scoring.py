"""Log-likelihood of continuations after chat prompts, batched: one forward pass per batch.

The shared engine of the refusal score (refusal vs compliance openings) and multiple-choice accuracy.
A continuation is scored in context: the prompt is rendered with the chat template and the continuation
placed as a prefill of the reply; its tokens are the ones where the tokenisation of prompt+continuation
departs from that of the prompt alone (robust to tokenizers that merge across the boundary).
Sequences are left-padded with explicit position ids, so every continuation ends at the last position
and only the logits of the continuation tokens are computed (`logits_to_keep`): memory stays small even
with a large vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ssah.data.chat import EncodedPair, collate_pairs, format_prompt, has_chat_template
from ssah.errors import SsahError


@dataclass(frozen=True)
class ContinuationScore:
    """Sum of token log-probabilities of one continuation and its token count."""

    logprob: float
    n_tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.n_tokens


def _encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def _split_point(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Length of the common prefix of the two tokenisations."""
    limit = min(len(prompt_ids), len(full_ids))
    for i in range(limit):
        if prompt_ids[i] != full_ids[i]:
            return i
    return limit


def encode_continuations(tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                         system: str | None = None) -> list[EncodedPair]:
    """(prompt, continuation) pairs as token ids; `prompt_len` marks where the continuation starts."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    prompt_cache: dict[str, list[int]] = {}
    out = []
    for prompt, continuation in zip(prompts, continuations):
        if prompt not in prompt_cache:
            prompt_cache[prompt] = _encode_text(tokenizer, format_prompt(tokenizer, prompt, system))
        full = _encode_text(tokenizer, format_prompt(tokenizer, prompt, system, prefill=continuation))
        split = _split_point(prompt_cache[prompt], full)
        if split == len(full) or split == 0:
            raise SsahError(f"continuation {continuation!r} adds no token after the prompt; "
                            "give a non-empty continuation")
        out.append(EncodedPair(full, split))
    return out


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def _score_batch(model, batch: list[EncodedPair], pad_id: int) -> list[ContinuationScore]:
    tensors = collate_pairs(batch, pad_id, padding_side="left")
    device = next(model.parameters()).device
    input_ids = tensors["input_ids"].to(device)
    attention = tensors["attention_mask"].to(device)
    # Left padding: positions must count real tokens only, or padded rows would shift.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    tail = max(len(item.input_ids) - item.prompt_len for item in batch)
    kwargs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "use_cache": False}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = tail + 1
    logits = model(**kwargs).logits[:, -(tail + 1):-1, :].float()
    targets = input_ids[:, -tail:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = []
    for row, item in enumerate(batch):
        n = len(item.input_ids) - item.prompt_len
        out.append(ContinuationScore(float(logprobs[row, tail - n:].sum()), n))
    return out


def continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *,
                          system: str | None = None, batch_size: int = 32, progress: bool = True,
                          desc: str = "scoring") -> list[ContinuationScore]:
    """Log-probability of each continuation after its chat-formatted prompt, in input order."""
    if batch_size < 1:
        raise SsahError(f"batch size must be at least 1, got {batch_size}")
    encoded = encode_continuations(tokenizer, prompts, continuations, system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Similar lengths share a batch: less padding, and the longest batch runs first.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    scores: list[ContinuationScore | None] = [None] * len(encoded)
    with tqdm(total=len(encoded), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for index, score in zip(chunk, _score_batch(model, [encoded[i] for i in chunk], pad_id)):
                scores[index] = score
            bar.update(len(chunk))
    return scores  # type: ignore[return-value]


@dataclass(frozen=True)
class _SharedItem:
    prefix: list[int]  # the tokens every continuation of this prompt starts with
    suffixes: list[list[int]]  # per continuation: the tokens after the prefix
    scored_from: list[int]  # per continuation: index into its suffix of the first scored token


def _shared_items(tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                  system: str | None) -> list[_SharedItem]:
    items = []
    for prompt in prompts:
        encoded = encode_continuations(tokenizer, [prompt] * len(continuations), continuations, system)
        common = min(item.prompt_len for item in encoded)  # tokenizers may merge across the boundary
        items.append(_SharedItem(encoded[0].input_ids[:common], [item.input_ids[common:] for item in encoded],
                                 [item.prompt_len - common for item in encoded]))
    return items


@torch.inference_mode()
def _score_shared_batch(model, items: list[_SharedItem], pad_id: int) -> list[list[ContinuationScore]]:
    device = next(model.parameters()).device
    n_cont = len(items[0].suffixes)
    prefix = collate_pairs([EncodedPair(item.prefix, len(item.prefix)) for item in items], pad_id, padding_side="left")
    prefix_mask = prefix["attention_mask"].to(device)
    prefix_pos = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=prefix["input_ids"].to(device), attention_mask=prefix_mask, position_ids=prefix_pos,
                use_cache=True, **kwargs)
    last_logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # predicts each suffix's first token
    # transformers 5 renamed `past_key_values` to `cache`; accept both spellings.
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cache.batch_repeat_interleave(n_cont)  # row order: prompt 0 x every continuation, prompt 1 x ...

    # A suffix's last token is only predicted, never fed in: the inputs are tokens[:-1], and token 0 is
    # predicted by the prefix's last position.
    suffixes = [suffix for item in items for suffix in item.suffixes]
    width = max(len(s) for s in suffixes) - 1
    later: list[list[float]] = [[] for _ in suffixes]  # log-probs of tokens 1.. of each suffix
    if width > 0:
        inputs = collate_pairs([EncodedPair(s[:-1], len(s) - 1) for s in suffixes], pad_id, padding_side="right")
        targets = collate_pairs([EncodedPair(s[1:], len(s) - 1) for s in suffixes], pad_id, padding_side="right")
        suffix_mask = inputs["attention_mask"].to(device)
        lengths = prefix_mask.sum(-1).repeat_interleave(n_cont)
        positions = lengths.unsqueeze(-1) + torch.arange(width, device=device).unsqueeze(0)
        logits = model(input_ids=inputs["input_ids"].to(device),
                       attention_mask=torch.cat([prefix_mask.repeat_interleave(n_cont, 0), suffix_mask], dim=-1),
                       position_ids=positions, use_cache=True, **{cache_arg: cache}).logits
        gathered = torch.log_softmax(logits.float(), dim=-1).gather(
            -1, targets["input_ids"].to(device).unsqueeze(-1)).squeeze(-1).tolist()
        later = [row[:len(s) - 1] for row, s in zip(gathered, suffixes)]

    results: list[list[ContinuationScore]] = []
    row = 0
    for p, item in enumerate(items):
        scores = []
        for tokens, first in zip(item.suffixes, item.scored_from):
            values = [float(last_logprobs[p, tokens[0]])] + later[row]
            scores.append(ContinuationScore(sum(values[first:]), len(tokens) - first))
            row += 1
        results.append(scores)
    return results


def shared_continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *,
                                 system: str | None = None, prompt_batch_size: int = 8, progress: bool = True,
                                 desc: str = "scoring") -> list[list[ContinuationScore]]:
    """Score every continuation after every prompt: result[i][j] is continuation j after prompt i.

    The prompt is run once per batch and its key/value cache shared by all continuations (two forward
    passes per batch of `prompt_batch_size` prompts), which makes scoring many short openings after long
    prompts several times cheaper than `continuation_logprobs` on all pairs; results agree with it.
    """
    if prompt_batch_size < 1:
        raise SsahError(f"batch size must be at least 1, got {prompt_batch_size}")
    if not continuations:
        raise SsahError("no continuation to score")
    items = _shared_items(tokenizer, prompts, continuations, system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prefix))
    scores: list[list[ContinuationScore] | None] = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), prompt_batch_size):
            chunk = order[start:start + prompt_batch_size]
            for index, row in zip(chunk, _score_shared_batch(model, [items[i] for i in chunk], pad_id)):
                scores[index] = row
            bar.update(len(chunk))
    return scores  # type: ignore[return-value]
