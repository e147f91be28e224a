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
    summary = {"none": headline(ctx.evaluate(loaded, none_dir, "studied model, nothing pruned"))}
    for expression in ctx.config.prune.masks:
        mask = mask_from_expression(groups, expression, seed=ctx.config.seed)
        report = ctx.evaluate(loaded, layout.prune_eval(expression), f"pruned {expression}",
                              interventions=[pruned(loaded.model, loaded.layout, mask)])
        summary[expression] = {**headline(report), "units": mask.count(), "share": mask.share()}
    return summary


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
