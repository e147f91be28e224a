"""Stage 9, report: results.json (every stage summary and a verdict per claim) and report.html, by
`ssah.analysis.report.render_report` (which `ssah report RUN_DIR` calls too)."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.pipeline.layout import STAGES
from ssah.pipeline.registry import Stage, register


def reads(config: RunConfig) -> dict:
    return {}


def run(ctx) -> dict:
    from ssah.analysis.report import render_report

    return render_report(ctx.config, ctx.layout)  # `ssah report` renders through the same function


STAGE = register(Stage("report", run, reads=reads, needs=tuple(s for s in STAGES if s != "report"), own=(),
                       needs_done=False))
