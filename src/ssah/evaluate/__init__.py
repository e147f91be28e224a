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

import importlib

# name -> module; imported on first use, so `ssah.evaluate.settings` stays importable without torch
_EXPORTS = {
    **dict.fromkeys(("Generation", "GenerationCache", "generate_items", "generate_replies", "generate_texts"),
                    "generation"),
    **dict.fromkeys(("JUDGES", "JudgeVerdict", "apply_judge", "load_judge", "parse_guard_output", "register_judge"),
                    "judges"),
    "run_lm_eval": "lm_eval_bridge",
    "RefusalScore": "refusal", "refusal_score": "refusal",
    **dict.fromkeys(("REFUSAL_OPENINGS", "REFUSAL_PHRASES", "RULES", "attack_success", "is_refusal", "verdict"),
                    "rules"),
    **dict.fromkeys(("evaluate_model", "load_eval_data", "read_replies", "read_report"), "runner"),
    **dict.fromkeys(("DATA_ROLES", "DEFAULT_SYSTEM_PROMPT", "EvalSettings"), "settings"),
    **dict.fromkeys(("attack_success_rate", "overrefusal_rate", "run_prompts"), "safety"),
    **dict.fromkeys(("continuation_logprobs", "shared_continuation_logprobs"), "scoring"),
    **dict.fromkeys(("Rate", "paired_exact_test", "wilson_interval"), "stats"),
    **dict.fromkeys(("MultipleChoiceItem", "Perplexity", "multiple_choice_accuracy", "perplexity", "task_accuracy"),
                    "utility"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
