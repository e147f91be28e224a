"""Stage 4, prune: evaluate the studied model with each group (and size-matched random controls)
pruned, reversibly (the paper's Table 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ssah.config import RunConfig
from ssah.io import atomic_dir
from ssah.ownership import owned
from ssah.pipeline.registry import Stage, register
from ssah.pipeline.summaries import Headline, headline


def reads(config: RunConfig) -> dict:
    return {"prune": config.prune.model_dump()}


def run(ctx) -> dict[str, Headline]:
    from ssah.interventions.masks import mask_from_expression
    from ssah.interventions.prune import pruned
    from ssah.units.groups import Groups

    layout = ctx.layout
    loaded = ctx.load(ctx.studied_model_spec())
    groups = Groups.load(layout.groups)
    none_dir = layout.prune_eval("none")
    _copy_finished_eval(layout.studied_eval, none_dir)
    # the unpruned model runs every suite a pruned one does, so each has its reference
    suites = _union(ctx.suites_for("prune"), ctx.suites_for("prune_controls"), ctx.config.eval.suites)
    summary = {"none": headline(ctx.evaluate(loaded, none_dir, "studied model, nothing pruned", suites=suites))}
    for expression in ctx.config.prune.masks:
        mask = mask_from_expression(groups, expression, seed=ctx.config.seed)
        kind = "prune_controls" if expression.strip().lower().startswith("random") else "prune"
        report = ctx.evaluate(loaded, layout.prune_eval(expression), f"pruned {expression}",
                              interventions=[pruned(loaded.model, loaded.layout, mask)], suites=ctx.suites_for(kind))
        summary[expression] = {**headline(report), "units": mask.count(), "share": mask.share()}
    return summary


def _union(prune: list[str] | None, controls: list[str] | None, every: list[str]) -> list[str]:
    """The suites of `prune` and `controls` (None: every suite), in the order of `every`."""
    if prune is None or controls is None:
        return list(every)
    return [suite for suite in every if suite in prune or suite in controls]


def _copy_finished_eval(source: Path, target: Path) -> None:
    """Start from the studied model's finished evaluation (the align or baseline stage made it with
    the same settings and data): the evaluation of the unpruned model then reuses it, and a copy
    whose identity does not match is simply redone."""
    if (target / "eval.json").is_file() or not (source / "eval.json").is_file():
        return
    # a partial evaluation in `target` is replaced: its cached replies are in the copy's cache anyway
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=_not_ssahs)


def _not_ssahs(folder: str, names: list[str]) -> list[str]:
    """What a user put beside ssah's files is not copied (the copy is recorded as ssah's)."""
    return [name for name in names if not owned(Path(folder) / name)]


STAGE = register(Stage("prune", run, reads=reads, needs=("groups", "baseline")))
