"""`run_pipeline`: every stage of the study in order, each finished stage reused.

Before the first stage, the whole run is checked (`ssah.pipeline.preflight`) and the run folder is
locked against a second writer. A stage whose identity (what it reads of the config, and the stages
it needs) matches its done.json is skipped; any other stage runs, and inside it every artifact still
valid is reused. A run folder made for another model is refused. `--force STAGE` / `--from STAGE`
redo stages from scratch: their folders are removed first, and only when the run folder's record says
ssah wrote everything in them (hidden files and sub-folders included; `ssah.ownership`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import yaml

import ssah.pipeline.stages  # noqa: F401  (registers every stage)
from ssah.config import RunConfig
from ssah.errors import SsahError
from ssah.io import write_text_atomic
from ssah.outputs import OutputFolder
from ssah.ownership import check_removable, make_dirs, remove
from ssah.pipeline.context import RunContext
from ssah.pipeline.layout import RUN, STAGES, RunLayout
from ssah.pipeline.preflight import check_run
from ssah.pipeline.registry import STAGE_REGISTRY, done_record

log = logging.getLogger("ssah.pipeline")


def _check_model(config: RunConfig, layout: RunLayout, config_file: str | Path | None) -> None:
    """Refuse a run folder that holds a run of another model; record this run's config in it (unless
    the config given is that very file: a user's edits and comments in it are kept)."""
    if layout.config.is_file():
        try:
            stored = yaml.safe_load(layout.config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            stored = {}
        model = stored.get("model") if isinstance(stored, dict) else None
        if model is not None and model != config.model:
            raise SsahError(f"{layout.root} holds a run of model {model!r}, not {config.model!r}; use another --out")
        if config_file is not None and os.path.samefile(config_file, layout.config):
            return
    write_text_atomic(layout.config, yaml.safe_dump(config.to_dict(), sort_keys=True))




def _plan(from_stage: str | None, force: tuple[str, ...], only: tuple[str, ...] | None) -> tuple[list[str], set]:
    for name in (*force, *([from_stage] if from_stage else []), *(only or ())):
        if name not in STAGES:
            raise SsahError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    redo = set(force)
    if from_stage:
        redo |= set(STAGES[STAGES.index(from_stage):])
    return [stage for stage in STAGES if only is None or stage in only], redo


def _check_needs(stage: str, planned: list[str], config: RunConfig, layout: RunLayout) -> None:
    if not STAGE_REGISTRY[stage].needs_done:
        return
    for need in STAGE_REGISTRY[stage].needs:
        if need not in planned and done_record(need, config, layout).lookup(replace=True) is None:
            raise SsahError(f"stage {stage} needs the {need} stage, which is not done for this config; "
                            f"run it too (add --only {need}, or drop --only)")


def run_pipeline(config: RunConfig, out: str | Path, from_stage: str | None = None,
                 force: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                 config_file: str | Path | None = None) -> dict:
    """Run every unfinished stage in order; returns {stage: summary}. `config_file`: the file
    `config` was read from, if any."""
    planned, redo = _plan(from_stage, force, only)
    ctx = RunContext(config, out)
    layout = ctx.layout
    for stage in planned:
        _check_needs(stage, planned, config, layout)
    check_run(config, layout.root)
    summaries = {}
    with OutputFolder(layout.root, RUN, command="ssah run"):
        for stage in planned:  # every folder to redo is checked before any work
            if stage in redo:
                check_removable(layout.stage(stage))
        _check_model(config, layout, config_file)
        for stage in planned:
            if stage in redo:
                remove(layout.stage(stage))
            summaries[stage] = _run_stage(ctx, stage)
    return summaries


def _run_stage(ctx: RunContext, stage: str) -> dict:
    record = done_record(stage, ctx.config, ctx.layout)
    found = record.lookup(replace=True)
    if found is not None:
        log.info("[%s] done earlier, skipped", stage)
        return found["summary"]
    log.info("[%s] running", stage)
    start = time.perf_counter()
    make_dirs(ctx.layout.stage(stage))
    summary = STAGE_REGISTRY[stage].run(ctx)
    seconds = round(time.perf_counter() - start, 1)
    record.save({"stage": stage, "seconds": seconds, "summary": summary})
    log.info("[%s] finished in %.0fs", stage, seconds)
    return summary
