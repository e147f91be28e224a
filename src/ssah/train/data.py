"""Training data for alignment: refusals to harmful prompts, benign answers, borderline prompts
answered by the model itself, and recovery examples (a refusal after a compliant start).

`alignment_data` assembles all of it for `ssah align` and the pipeline's align stage alike; the
model's own replies are generated greedily and, with a cache folder, written there so a resumed
run generates nothing twice. No reply is written by us: harmful prompts get the built-in
refusals, and the compliant starts of recovery examples are the unaligned model's own words.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from ssah.errors import SsahError

log = logging.getLogger(__name__)

Pair = tuple[str, ...]  # (prompt, response) or (prompt, response, prefill)
# the model's own replies, cached in `alignment_data(cache_dir=...)`
BORDERLINE_CACHE, HARMFUL_CACHE = "borderline-replies.jsonl", "harmful-replies.jsonl"


def refusal_texts(refusals) -> list[str]:
    """The reply text of each record of a refusals dataset (its response, else its prompt field)."""
    return [r.response or r.prompt for r in refusals]


def refusals_to_avoid(borderline: list[tuple[str, str]], refusals) -> dict[str, list[str]]:
    """Every refusal as an opening to avoid in the reply to each borderline prompt (`train_sft(avoid=...)`)."""
    texts = refusal_texts(refusals)
    return {prompt: texts for prompt, _ in borderline}


def alignment_pairs(harmful, benign, refusals, seed: int = 0,
                    borderline: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Harmful prompts paired with built-in refusals, mixed with benign (prompt, answer) pairs.

    Refusals are assigned round-robin over a seeded shuffle, so every reserved option is used.
    `borderline` pairs (safe prompts that sound unsafe, answered) teach the model where refusing stops.
    """
    rng = random.Random(seed)
    replies = refusal_texts(refusals)
    rng.shuffle(replies)
    pairs = [(r.prompt, replies[i % len(replies)]) for i, r in enumerate(harmful)]
    pairs += [(r.prompt, r.response) for r in benign if r.response]
    pairs += list(borderline)
    rng.shuffle(pairs)
    return pairs


def recovery_examples(tokenizer, prompts: list[str], replies: list[str], refusals, lengths=(2, 4, 6, 8, 10),
                      seed: int = 0) -> list[tuple[str, str, str]]:
    """Deeper-alignment data: (harmful prompt, refusal, first k tokens of a compliant reply).

    Trained with the compliant start as a prefill (no loss on it), they teach the model to turn back
    to a refusal after it has begun to comply, the failure a prefill attack exploits. k cycles over
    `lengths`; replies that open with a refusal (prefix rule) or are shorter than k tokens are skipped.
    `replies` are the model's own greedy answers (an unaligned model complies), so no harmful text
    is written by us.
    """
    from ssah.evaluate.rules import is_refusal

    if not lengths or min(lengths) < 1:
        raise SsahError(f"recovery lengths must be positive token counts, got {list(lengths)}")
    rng = random.Random(seed + 1)
    texts = refusal_texts(refusals)
    out = []
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        k = lengths[i % len(lengths)]
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if is_refusal(reply) or len(ids) < k:
            continue
        out.append((prompt, rng.choice(texts), tokenizer.decode(ids[:k]).strip()))
    return out


@dataclass
class AlignmentData:
    """The pairs to train on, the openings to avoid per borderline prompt, and how many of each kind."""

    pairs: list[Pair]
    avoid: dict[str, list[str]]
    counts: dict[str, int] = field(default_factory=dict)


def _own_replies(loaded, prompts: list[str], max_new_tokens: int, batch_size: int, cache: Path | None,
                 generation_dtype: str = "model") -> list[str]:
    from ssah.evaluate.generation import generate_replies, weights_cast

    # replies generated in another dtype are other replies: cached under their own key
    key = loaded.fingerprint
    if generation_dtype != "model":
        key = f"{key}|generation_dtype={generation_dtype}"
    with weights_cast(loaded.model, generation_dtype):
        return generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=key,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, cache=cache, slots="auto")


def alignment_data(loaded, harmful, benign, refusals, *, borderline=None, borderline_tokens: int = 48,
                   borderline_repeats: int = 1, recovery_lengths=(), seed: int = 0, batch_size: int = 8,
                   cache_dir: str | Path | None = None, generation_dtype: str = "model") -> AlignmentData:
    """Everything alignment trains on (see the module docstring), from datasets and the model itself.

    `borderline`: safe prompts that sound unsafe, trained on the model's own answers
    (`borderline_tokens` long, each pair `borderline_repeats` times). `recovery_lengths`: compliant
    starts of these many tokens for recovery examples. `cache_dir`: where the model's replies are
    cached (borderline-replies.jsonl, harmful-replies.jsonl). `generation_dtype`: the weights' dtype while
    the model writes its own replies (see `ssah.evaluate.generation.weights_cast`).
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    own: list[tuple[str, str]] = []
    if borderline is not None:
        prompts = borderline.prompts()
        replies = _own_replies(loaded, prompts, borderline_tokens, batch_size,
                               cache / BORDERLINE_CACHE if cache else None, generation_dtype)
        own = [(p, r) for p, r in zip(prompts, replies) if r.strip()]
        log.info("%d borderline prompts answered by the model itself", len(own))
    pairs: list[Pair] = alignment_pairs(harmful, benign, refusals, seed=seed, borderline=own * borderline_repeats)
    recovery: list[Pair] = []
    if recovery_lengths:
        prompts = harmful.prompts()
        replies = _own_replies(loaded, prompts, max(recovery_lengths) + 8, batch_size,
                               cache / HARMFUL_CACHE if cache else None, generation_dtype)
        recovery = recovery_examples(loaded.tokenizer, prompts, replies, refusals, list(recovery_lengths), seed=seed)
        log.info("%d recovery examples (of %d harmful prompts; the others were refused or too short)",
                 len(recovery), len(prompts))
    if recovery:
        pairs = pairs + recovery
        random.Random(seed).shuffle(pairs)
    counts = {"pairs": len(pairs), "harmful": len(harmful), "benign": len(benign), "borderline": len(own),
              "recovery": len(recovery)}
    return AlignmentData(pairs, refusals_to_avoid(own, refusals), counts)
