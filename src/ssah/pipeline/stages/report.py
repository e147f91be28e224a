"""Stage 8, report: results.json (every stage summary and a verdict per claim) and report.html."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.pipeline.layout import STAGES
from ssah.pipeline.registry import Stage, register, stage_summary


def reads(config: RunConfig) -> dict:
    return {}


def paired_claims(layout) -> dict:
    """The claims that compare two evaluations of the same prompts: (before, after, suite)."""
    return {
        "ru_alignment_lowers_asr": (layout.baseline_eval, layout.aligned_eval("budget"), "safety"),
        "prune_scu_breaks_safety_spares_utility": (layout.prune_eval("none"), layout.prune_eval("SCU"), "safety"),
        "finetune_attack_raises_asr": (layout.prune_eval("none"), layout.finetuned_eval("plain"), "safety"),
        "monitor_halves_prefill_asr": (layout.studied_eval, layout.monitor_eval, "prefill"),
    }


def run(ctx) -> dict:
    from ssah.analysis.report import write_report
    from ssah.analysis.verdicts import compute_verdicts, paired_tests
    layout = ctx.layout
    summaries = {stage: stage_summary(stage, ctx.config, layout) for stage in STAGES if stage != "report"}
    verdicts = compute_verdicts(summaries, paired_tests(paired_claims(layout)))
    images = {"groups": [layout.groups / "groups_per_layer.png"],
              "probe": sorted(layout.probe_study.glob("*.png")),
              "transfer": sorted(layout.stage("transfer").glob("*.png")),
              "attacks": sorted(layout.attack_grid.glob("*.png"))}
    return write_report(ctx.config.to_dict(), summaries, verdicts, ctx.out, images)


STAGE = register(Stage("report", run, reads=reads, needs=tuple(s for s in STAGES if s != "report"), own=(),
                       needs_done=False))
