"""Stage 1, baseline: evaluate the model as given."""

from __future__ import annotations

from ssah.pipeline.registry import Stage, common, register
from ssah.pipeline.summaries import BaselineSummary, headline


def run(ctx) -> BaselineSummary:
    loaded = ctx.load()
    report = ctx.evaluate(loaded, ctx.layout.baseline_eval, "base model", as_loaded=True,
                            suites=ctx.suites_for("baseline"))
    return {"eval": headline(report), "model_fingerprint": loaded.fingerprint}


STAGE = register(Stage("baseline", run, reads=common))
