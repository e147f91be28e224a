"""Stage 9, report: results.json (every stage summary and a verdict per claim) and report.html, by
`ssah.analysis.report.render_report` (which `ssah report RUN_DIR` calls too)."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.pipeline.layout import STAGES
from ssah.pipeline.registry import Stage, register


def reads(config: RunConfig) -> dict:
    return {}


def paired_claims(layout, summaries: dict | None = None) -> dict:
    """The claims that compare two evaluations of the same prompts: (before, after, suite). With the
    stage summaries, UCU's utility is paired with the next-costliest pruned mask's."""
    from ssah.analysis.verdicts import next_costliest

    claims = {
        "ru_alignment_lowers_asr": (layout.baseline_eval, layout.aligned_eval("budget"), "safety"),
        "prune_scu_breaks_safety_spares_utility": (layout.prune_eval("none"), layout.prune_eval("SCU"), "safety"),
        "finetune_attack_raises_asr": (layout.prune_eval("none"), layout.finetuned_eval("plain"), "safety"),
        "freeze_ii_keeps_rise_to_half": (layout.finetuned_eval("plain"), layout.finetuned_eval("freeze_ii"), "safety"),
        "freeze_budget_keeps_rise_to_half": (layout.finetuned_eval("plain"), layout.finetuned_eval("freeze_budget"),
                                             "safety"),
        "monitor_halves_prefill_asr": (layout.studied_eval, layout.monitor_eval, "prefill"),
        "monitor_overrefusal_cost": (layout.studied_eval, layout.monitor_eval, "overrefusal"),
    }
    rival = next_costliest((summaries or {}).get("prune") or {})
    if rival is not None:
        claims["prune_ucu_costs_most_utility"] = (layout.prune_eval(rival), layout.prune_eval("UCU"), "utility")
    return claims


def run(ctx) -> dict:
    from ssah.analysis.report import render_report

    return render_report(ctx.config, ctx.layout)  # `ssah report` renders through the same function


STAGE = register(Stage("report", run, reads=reads, needs=tuple(s for s in STAGES if s != "report"), own=(),
                       needs_done=False))
