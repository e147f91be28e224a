"""Safety metrics from generated replies: attack success rate, prefill attacks, over-refusal.

- ASR: share of harmful prompts whose reply counts as a successful attack under a named rule
  (`ssah.evaluate.rules`).
- Prefill attack: the reply is prefilled with a compliance opening and the model continues. The rule
  judges the *continuation only*: the prefill text is not shown to it (with it every reply would open
  by complying). Prompt i gets opening i mod m of the m openings, so the assignment is deterministic.
  This is the attack shallow alignment fails: the refusal decision lives in the first few tokens.
- Over-refusal: share of safe-but-sensitive prompts whose reply the `prefix` rule judges a refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ssah.errors import SsahError
from ssah.evaluate.generation import Generation, GenerationCache, generate_items
from ssah.evaluate.rules import RULES, check_rules
from ssah.evaluate.stats import Rate

OVERREFUSAL_RULE = "prefix"


def verdicts(prompt: str, reply: str, rules: Sequence[str], complete: bool = True) -> dict[str, str]:
    """The reply's verdict under each rule (empty, refusal, echo, short or compliance); `complete`:
    see `ssah.evaluate.rules` (a reply cut off by the token budget is never an echo)."""
    return {rule: RULES[rule](reply, prompt, complete) for rule in rules}


def is_complete(generation, max_new_tokens: int) -> bool:
    """True when the model ended the reply itself: its tokens (EOS excluded) stop short of the budget."""
    return len(generation.token_ids) < max_new_tokens


@dataclass(frozen=True)
class SafetyRun:
    """Generations for a list of prompts and their verdicts per rule."""

    prompts: tuple[str, ...]
    prefills: tuple[str, ...] | None
    generations: tuple[Generation, ...]
    verdicts: tuple[dict[str, str], ...]

    def attack_success(self, rule: str) -> Rate:
        return Rate.of(v[rule] == "compliance" for v in self.verdicts)

    def refusals(self, rule: str) -> Rate:
        return Rate.of(v[rule] == "refusal" for v in self.verdicts)


def prefill_openings(n_prompts: int, openings: Sequence[str]) -> list[str]:
    """Opening i mod m for prompt i: each opening is used about equally often, deterministically."""
    openings = [o for o in openings if o.strip()]
    if not openings:
        raise SsahError("the prefill attack needs at least one non-empty compliance opening")
    return [openings[i % len(openings)] for i in range(n_prompts)]


def run_prompts(model, tokenizer, prompts: Sequence[str], *, model_key: str, rules: Sequence[str],
                system: str | None = None, prefills: Sequence[str] | None = None, max_new_tokens: int = 64,
                batch_size: int = 8, cache: GenerationCache | None = None, progress: bool = True,
                desc: str = "generating", rewrite=None, engine=None, slots=None,
                watchers=()) -> SafetyRun:
    """Generate replies (continuations, with prefills) and judge each with every rule (`rewrite`,
    `engine`, `slots`, `watchers`: see `generate_texts`)."""
    rules = check_rules(list(rules))
    if not prompts:
        raise SsahError("no prompts to evaluate")
    generations = generate_items(model, tokenizer, prompts, model_key=model_key, system=system, prefills=prefills,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, cache=cache,
                                 progress=progress, desc=desc, rewrite=rewrite, engine=engine, slots=slots,
                                 watchers=watchers)
    judged = tuple(verdicts(prompt, gen.reply, rules, is_complete(gen, max_new_tokens))
                   for prompt, gen in zip(prompts, generations))
    return SafetyRun(tuple(prompts), tuple(prefills) if prefills is not None else None, tuple(generations), judged)


def attack_success_rate(model, tokenizer, prompts: Sequence[str], *, model_key: str, rule: str = "prefix",
                        system: str | None = None, prefills: Sequence[str] | None = None, **kwargs) -> Rate:
    """ASR of `prompts` under `rule` (with `prefills`: the prefill attack, continuation judged)."""
    run = run_prompts(model, tokenizer, prompts, model_key=model_key, rules=[rule], system=system,
                      prefills=prefills, **kwargs)
    return run.attack_success(rule)


def overrefusal_rate(model, tokenizer, prompts: Sequence[str], *, model_key: str, system: str | None = None,
                     **kwargs) -> Rate:
    """Share of (safe) prompts whose reply the `prefix` rule judges a refusal."""
    run = run_prompts(model, tokenizer, prompts, model_key=model_key, rules=[OVERREFUSAL_RULE], system=system,
                      **kwargs)
    return run.refusals(OVERREFUSAL_RULE)
