"""Batched greedy generation with a per-item cache that makes evaluations resumable.

- Greedy decoding only (deterministic); prompts are rendered with the model's chat template
  (`ssah.data.chat.format_prompt`), optionally with a system prompt and a prefilled reply opening.
- Inputs are sorted by token length (longest first, so an out-of-memory error shows at once).
  Batching is continuous by default (`ssah.evaluate.batching`: a finished row's slot goes to the
  next waiting prompt; `slots="auto"` lets it pick its slot count for the model and machine) and
  static under an intervention that watches `model.generate` (left-padded batches through
  `model.generate`). Neither changes a reply: batched output equals batch-size-1
  output token for token (tested on the tiny models in fp32).
- Finished replies are appended to a JSONL cache with flush + fsync, keyed by
  (model key, rendered input text, max new tokens): an interrupted run loses at most the rows in
  flight, and a rerun generates only what is missing. The rendered text covers the prompt, the system
  prompt, the prefill and the chat template.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ssah.data.chat import EncodedPair, collate_pairs, format_prompt, has_chat_template
from ssah.errors import SsahError
from ssah.evaluate.batching import choose_slots, continuous_generate
from ssah.ownership import claim

Batching = Literal["continuous", "static"]
Slots = int | Literal["auto"] | None

CACHE_VERSION = 1


@dataclass(frozen=True)
class Generation:
    """One reply: the rendered input, the decoded reply, its new token ids (up to EOS, excluded)."""

    text: str
    reply: str
    token_ids: tuple[int, ...]
    cached: bool  # True when it came from the cache rather than from the model


def cache_key(model_key: str, text: str, max_new_tokens: int) -> str:
    """The cache key of one generation: what makes its greedy output unique."""
    payload = json.dumps({"v": CACHE_VERSION, "model": model_key, "input": text,
                          "max_new_tokens": max_new_tokens, "decoding": "greedy"}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class GenerationCache:
    """An append-only JSONL file of finished generations; `path=None` caches in memory only."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    self._entries[row["key"]] = (row["reply"], tuple(row["tokens"]))
                except (ValueError, KeyError, TypeError):
                    continue  # the tail of a write cut short by a kill: regenerate that item

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[str, tuple[int, ...]] | None:
        return self._entries.get(key)

    def add(self, rows: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """Store (key, reply, token ids) rows; on disk, durably (flush + fsync) before returning."""
        for key, reply, tokens in rows:
            self._entries[key] = (reply, tokens)
        if self.path is None or not rows:
            return
        claim(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a killed write left half a line: close it off
                    handle.write(b"\n")
            lines = (json.dumps({"key": key, "reply": reply, "tokens": list(tokens)}, ensure_ascii=False)
                     for key, reply, tokens in rows)
            handle.write(("\n".join(lines) + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())


def _encode_text(tokenizer, text: str) -> list[int]:
    # Chat templates write their own BOS into the text; plain prompts get the tokenizer's.
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _generate_batch(model, tokenizer, encoded: list[list[int]], max_new_tokens: int,
                    eos_ids: list[int], watchers: Sequence = ()) -> list[tuple[int, ...]]:
    """One static batch through `model.generate`, each watcher's `watch` around the call (it may add
    logits processors and stopping criteria: the runtime monitor)."""
    from transformers import GenerationConfig

    pad_id = _pad_id(tokenizer, eos_ids)
    batch = collate_pairs([EncodedPair(ids, len(ids)) for ids in encoded], pad_id, padding_side="left")
    device = _model_device(model)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=pad_id, eos_token_id=eos_ids)
    call = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "generation_config": config}
    with contextlib.ExitStack() as stack:
        for watcher in watchers:
            call = stack.enter_context(watcher.watch(call))
        output = model.generate(**call)
    new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
    stops = set(eos_ids)
    out = []
    for row in new_tokens:
        end = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        out.append(tuple(row[:end]))
    return out


def _lookup(cache: GenerationCache, keys: list[str], texts: Sequence[str]) -> tuple[dict, dict]:
    """The cached generations by key, and the texts still to generate by key (each input once)."""
    results: dict[str, Generation] = {}
    pending: dict[str, str] = {}
    for key, text in zip(keys, texts):
        hit = cache.get(key)
        if hit is not None:
            results[key] = Generation(text, hit[0], hit[1], cached=True)
        elif key not in pending:
            pending[key] = text
    return results, pending


def _checked_batching(max_new_tokens: int, batch_size: int, rewrite, batching: Batching | None,
                      engine, slots: Slots = None, watchers: Sequence = ()) -> Batching:
    """The batching to use, after one line for settings that cannot work."""
    if max_new_tokens < 1:
        raise SsahError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise SsahError(f"batch size must be at least 1, got {batch_size}")
    if slots is not None and slots != "auto" and (isinstance(slots, bool) or not isinstance(slots, int)
                                                  or slots < 1):
        raise SsahError(f"slots must be a positive whole number or auto, got {slots!r}")
    if batching is None:
        batching = "static" if rewrite is not None or watchers else "continuous"
    if rewrite is not None and (batching == "continuous" or engine is not None):
        raise SsahError("a reply rewrite needs static batching on the hf engine")
    if watchers and (batching == "continuous" or engine is not None):
        # a watcher's per-row state belongs to one generate call of fixed rows
        raise SsahError("an intervention that follows generation needs static batching on the hf engine")
    return batching


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def weights_cast(model, dtype: str = "model"):
    """The model's floating parameters in `dtype` ("fp32", "bf16", "fp16"; "model": as they are) while the
    block runs; on exit every parameter gets back its original tensor, so nothing is lost to rounding.
    Buffers (rotary frequencies and the like) keep their dtype. Interventions that edit weights (pruning)
    must be entered before: the cast copies what the weights are at that moment."""
    target = _TORCH_DTYPES.get(dtype)
    kept = []
    if target is not None:
        with torch.no_grad():
            for param in model.parameters():  # tied weights are one parameter: cast once
                if param.is_floating_point() and param.dtype != target:
                    kept.append((param, param.data))
                    param.data = param.data.to(target)
    try:
        yield model
    finally:
        for param, original in kept:
            param.data = original


def generate_texts(model, tokenizer, texts: Sequence[str], *, model_key: str, max_new_tokens: int = 64,
                   batch_size: int = 8, cache: GenerationCache | None = None, progress: bool = True,
                   desc: str = "generating",
                   on_batch: Callable[[list[Generation]], None] | None = None,
                   rewrite: Callable[[list[str]], list[str]] | None = None,
                   batching: Batching | None = None, engine=None, slots: Slots = None,
                   watchers: Sequence = ()) -> list[Generation]:
    """Greedy replies to already rendered input texts, in input order.

    `model_key` names the model in the cache (its fingerprint, plus e.g. a prune mask id when the
    caller modified it). Cached items are not regenerated. `batching`: `continuous` (the default: a
    finished row's slot goes to the next waiting prompt, `ssah.evaluate.batching`) or `static`
    (`model.generate` per batch of `batch_size`; chosen whenever `rewrite` or `watchers`, interventions
    whose `watch` joins every `generate` call like the runtime monitor, are given). Finished replies go to
    the cache before `on_batch` (an observer, e.g. for progress reports or tests) sees them: per
    batch (static) or per decoding step at which rows ended (continuous). `rewrite` maps the decoded
    replies of a batch to the replies to keep (e.g. a runtime monitor replacing flagged replies by a
    refusal); it runs before caching, so its `model_key` must say that a rewrite is in effect.
    `engine` (e.g. `ssah.evaluate.engines.VllmEngine`) generates instead of `model`. `slots`: how many
    rows continuous batching decodes at once: a number, `auto` (`ssah.evaluate.batching.choose_slots`:
    measured once per model shape and machine, then cached), or None for `batch_size`.
    """
    batching = _checked_batching(max_new_tokens, batch_size, rewrite, batching, engine, slots, watchers)
    cache = cache if cache is not None else GenerationCache()
    keys = [cache_key(model_key, text, max_new_tokens) for text in texts]
    results, pending = _lookup(cache, keys, texts)
    if not pending:
        return [results[key] for key in keys]

    encoded = {key: _encode_text(tokenizer, text) for key, text in pending.items()}
    # Longest first: similar lengths share a batch (little padding) and memory peaks early.
    order = sorted(pending, key=lambda k: -len(encoded[k]))
    eos_ids = _eos_ids(model, tokenizer)
    unique_total = len(set(keys))
    with tqdm(total=unique_total, initial=unique_total - len(pending), desc=desc, unit="reply",
              disable=not progress, dynamic_ncols=True) as bar:

        def finish(chunk: list[str], token_rows: list[tuple[int, ...]]) -> None:
            replies = [tokenizer.decode(list(tokens), skip_special_tokens=True).strip() for tokens in token_rows]
            if rewrite is not None:
                replies = rewrite(replies)
            for key, tokens, reply in zip(chunk, token_rows, replies):
                results[key] = Generation(pending[key], reply, tokens, cached=False)
            cache.add([(key, results[key].reply, results[key].token_ids) for key in chunk])
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch([results[key] for key in chunk])

        if engine is not None:
            engine.generate([encoded[k] for k in order], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                            on_finish=lambda rows: finish([order[i] for i, _ in rows], [t for _, t in rows]))
        elif batching == "static":
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                finish(chunk, _generate_batch(model, tokenizer, [encoded[k] for k in chunk], max_new_tokens,
                                              eos_ids, watchers))
        else:
            width = choose_slots(model).slots if slots == "auto" else slots or batch_size
            continuous_generate(model, [encoded[k] for k in order], max_new_tokens=max_new_tokens,
                                eos_ids=eos_ids, pad_id=_pad_id(tokenizer, eos_ids), batch_size=width,
                                on_finish=lambda rows: finish([order[i] for i, _ in rows], [t for _, t in rows]))
    return [results[key] for key in keys]


def render_prompts(tokenizer, prompts: Sequence[str], system: str | None = None,
                   prefills: Sequence[str] | None = None) -> list[str]:
    """The chat-formatted input text for each prompt (with its system prompt and prefill)."""
    prefills = list(prefills) if prefills is not None else [""] * len(prompts)
    if len(prefills) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prefills)} prefills")
    return [format_prompt(tokenizer, prompt, system, prefill) for prompt, prefill in zip(prompts, prefills)]


def generate_items(model, tokenizer, prompts: Sequence[str], *, model_key: str, system: str | None = None,
                   prefills: Sequence[str] | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                   cache: GenerationCache | None = None, progress: bool = True, desc: str = "generating",
                   on_batch: Callable[[list[Generation]], None] | None = None,
                   rewrite: Callable[[list[str]], list[str]] | None = None,
                   batching: Batching | None = None, engine=None, slots: Slots = None,
                   watchers: Sequence = ()) -> list[Generation]:
    """Greedy replies to user prompts (chat template, optional system prompt and prefills), in order.

    With prefills, each reply is the model's continuation after the prefill text (which is not part
    of the reply). See `generate_texts` for caching and `on_batch`.
    """
    texts = render_prompts(tokenizer, prompts, system, prefills)
    return generate_texts(model, tokenizer, texts, model_key=model_key, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, cache=cache, progress=progress, desc=desc, on_batch=on_batch,
                          rewrite=rewrite, batching=batching, engine=engine, slots=slots, watchers=watchers)


def generate_replies(model, tokenizer, prompts: Sequence[str], *, model_key: str, system: str | None = None,
                     prefills: Sequence[str] | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                     cache: GenerationCache | str | Path | None = None, progress: bool = True,
                     slots: Slots = None) -> list[str]:
    """The reply text for each prompt (see `generate_items`); `cache` may be a JSONL path."""
    if cache is not None and not isinstance(cache, GenerationCache):
        cache = GenerationCache(cache)
    items = generate_items(model, tokenizer, prompts, model_key=model_key, system=system, prefills=prefills,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, cache=cache, progress=progress,
                           slots=slots)
    return [item.reply for item in items]
