"""Stage 3, groups: safety and utility scores of the studied model, and its unit groups."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.pipeline.registry import Stage, register
from ssah.pipeline.summaries import GroupsSummary


def reads(config: RunConfig) -> dict:
    return {"scores": config.scores.model_dump(), "groups": config.groups.identity(),
            "data": [config.data.harmful_calibration, config.data.benign_calibration, config.data.scoring_refusals]}


def run(ctx) -> GroupsSummary:
    loaded = ctx.load(ctx.studied_model_spec())
    groups = ctx.score_and_group(loaded, ctx.layout.stage("groups"))
    return {"model": ctx.relative(ctx.studied_model_spec()), "model_fingerprint": loaded.fingerprint,
            "counts": groups.counts(), "total_units": groups.meta["total_units"]}


STAGE = register(Stage("groups", run, reads=reads, needs=("align",)))
