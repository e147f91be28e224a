"""Evaluation: safety (ASR per named rule, refusal score, prefill attacks), over-refusal, utility.

    from ssah.evaluate import evaluate_model, EvalSettings
    report = evaluate_model(model, tokenizer, model_key=fingerprint, out_dir="runs/eval",
                            settings=EvalSettings(limit=32, max_new_tokens=32))
    report["asr"]["prefix"], report["ci"]["asr"]["prefix"], report["utility"]["perplexity"]

Building blocks: `generate_replies` (batched greedy generation, cached and resumable),
`is_refusal` / `attack_success` / `verdict` (the `prefix` and `keywords` rules), `refusal_score`,
`wilson_interval`, `perplexity`, `task_accuracy`, `multiple_choice_accuracy`, `run_lm_eval`, and model
judges (`load_judge`, `register_judge`, `apply_judge`).
"""

from ssah.evaluate.generation import Generation, GenerationCache, generate_items, generate_replies, generate_texts
from ssah.evaluate.judges import JUDGES, JudgeVerdict, load_judge, parse_guard_output, register_judge
from ssah.evaluate.lm_eval_bridge import run_lm_eval
from ssah.evaluate.refusal_score import RefusalScore, refusal_score
from ssah.evaluate.rules import REFUSAL_OPENINGS, REFUSAL_PHRASES, RULES, attack_success, is_refusal, verdict
from ssah.evaluate.runner import (
    DEFAULT_SUITES, SUITES, EvalSettings, apply_judge, evaluate_model, load_eval_data, read_replies, read_report,
)
from ssah.evaluate.safety import DEFAULT_SYSTEM_PROMPT, attack_success_rate, overrefusal_rate, run_prompts
from ssah.evaluate.scoring import continuation_logprobs, shared_continuation_logprobs
from ssah.evaluate.stats import Rate, paired_exact_test, wilson_interval
from ssah.evaluate.utility import MultipleChoiceItem, Perplexity, multiple_choice_accuracy, perplexity, task_accuracy

__all__ = [
    "DEFAULT_SUITES", "DEFAULT_SYSTEM_PROMPT", "JUDGES", "REFUSAL_OPENINGS", "REFUSAL_PHRASES", "RULES", "SUITES",
    "EvalSettings", "Generation", "GenerationCache", "JudgeVerdict", "MultipleChoiceItem", "Perplexity", "Rate",
    "RefusalScore", "apply_judge", "attack_success", "attack_success_rate", "continuation_logprobs",
    "evaluate_model", "generate_items", "generate_replies", "generate_texts", "is_refusal", "load_eval_data",
    "load_judge", "multiple_choice_accuracy", "overrefusal_rate", "paired_exact_test", "parse_guard_output", "perplexity",
    "read_replies", "read_report", "refusal_score", "register_judge", "run_lm_eval", "run_prompts",
    "shared_continuation_logprobs", "task_accuracy", "verdict", "wilson_interval",
]
