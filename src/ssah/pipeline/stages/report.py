"""Stage 9, report: results.json (every stage summary and a verdict per claim) and report.html, by
`ssah.analysis.report.render_report` (which `ssah report RUN_DIR` calls too)."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.pipeline.registry import Stage, register, stage_summary

# the stages whose summaries the report reads, in pipeline order
REPORTED = ("baseline", "align", "groups", "prune", "finetune", "probe", "transfer", "attacks")


def reads(config: RunConfig) -> dict:
    return {}


def finished_summaries(config: RunConfig, layout) -> dict:
    """{stage: summary} of each reported stage ({} for one that has not finished with this config)."""
    return {stage: stage_summary(stage, config, layout) for stage in REPORTED}


def run(ctx) -> dict:
    from ssah.analysis.report import render_report

    # `ssah report` renders through the same function
    return render_report(ctx.config, ctx.layout, finished_summaries(ctx.config, ctx.layout))


STAGE = register(Stage("report", run, reads=reads, needs=REPORTED, needs_done=False))
