"""Stage 5, finetune: the benign fine-tuning attack, plain, with frozen units (the paper's settings
(i) and (ii), the alignment budget, and freeze_ii_strict: freeze_ii's units and every parameter no
unit owns), with LoRA, and the control of freeze_ii: units of its per-layer, per-kind sizes drawn at
random (one row per seed, freeze_random_s{seed}), trained the same way. Each fine-tuned model is
evaluated (Table 2); each row reports the share of parameter entries its training could change."""

from __future__ import annotations

import logging

from ssah.config import RunConfig, finetune_rows
from ssah.pipeline.context import release
from ssah.pipeline.registry import Stage, register
from ssah.pipeline.summaries import Headline, headline, train_summary

log = logging.getLogger("ssah.pipeline")
FROZEN = ("freeze_i", "freeze_ii", "freeze_budget")
RANDOM = "freeze_random"


def reads(config: RunConfig) -> dict:
    return {"finetune": config.finetune.model_dump(), "data": config.data.finetune}


def rows(config: RunConfig) -> list[str]:
    """The stage's rows in order: each setting, freeze_random expanded into one row per seed."""
    return finetune_rows(config.finetune)


def _budget(ctx):
    """The units the alignment stage trained (from the unaligned model's groups; the studied model is
    that model plus changes inside them, so layout and units match), or None."""
    from ssah.interventions.masks import mask_from_expression
    from ssah.units.groups import Groups

    if ctx.layout.study != "budget":
        return None
    return mask_from_expression(Groups.load(ctx.layout.unaligned_groups / "groups"), ctx.config.align.budget,
                                seed=ctx.config.seed)


def _masks(ctx, row: str, groups, budget) -> tuple[object, object, dict]:
    """(units frozen, the only units trained, what the row records about them) for one row."""
    from ssah.interventions.masks import complement, mask_from_expression, overlap, random_like

    c = ctx.config.finetune
    if row == "freeze_budget":
        return budget, None, {"units_frozen": budget.count()}
    if row in FROZEN:
        mask = mask_from_expression(groups, getattr(c, row), seed=ctx.config.seed)
        return mask, None, {"units_frozen": mask.count()}
    freeze_ii = mask_from_expression(groups, c.freeze_ii, seed=ctx.config.seed)
    if row == "freeze_ii_strict":
        trainable = complement(freeze_ii)
        return None, trainable, {"units_trainable": trainable.count()}
    if row.startswith(RANDOM + "_s"):
        seed = int(row.removeprefix(RANDOM + "_s"))
        # freeze_ii covers most units, so its control is drawn over all units of each layer and kind
        mask = random_like(freeze_ii, seed, outside=False)
        return mask, None, {"units_frozen": mask.count(), "control_of": "freeze_ii", "seed": seed,
                            "overlap": overlap(mask, freeze_ii)}
    return None, None, {}


def run(ctx) -> dict[str, Headline]:
    from ssah.data import load_dataset
    from ssah.units.groups import Groups

    c, layout = ctx.config, ctx.layout
    data = load_dataset(c.data.finetune)
    groups = Groups.load(layout.groups)
    # what each frozen set covers of the alignment budget says whether freezing can keep what
    # alignment put there
    budget = _budget(ctx)
    return {row: run_row(ctx, row, data, groups, budget) for row in rows(c)}


def run_row(ctx, row: str, data, groups, budget=None, model: str | None = None) -> dict:
    """Fine-tune the studied model as `row` says (a setting, or freeze_random_s{seed}) into the run's
    folder for it, evaluate it, and return the row's summary. `groups`: the studied model's; `budget`:
    the alignment budget's units, or None; `model`: the studied model's spec (default: the run's)."""
    from ssah.train.recipes import finetune

    c, layout = ctx.config, ctx.layout
    loaded = ctx.load(model or ctx.studied_model_spec())
    mask, trainable, about = _masks(ctx, row, groups, budget)
    log.info("  fine-tuning: %s", row)
    record = finetune(loaded, data, c.finetune.train_settings(row), layout.finetuned_model(row), seed=c.seed,
                      freeze=mask, trainable=trainable, lora=row == "lora",
                      frozen_multiplier=c.finetune.frozen_epochs_multiplier, replace=True)
    del loaded
    release()
    tuned = ctx.load(layout.finetuned_model(row))
    report = ctx.evaluate(tuned, layout.finetuned_eval(row), f"fine-tuned ({row})", as_loaded=True,
                          suites=ctx.suites_for("finetune_controls" if row.startswith(RANDOM + "_s") else "finetune"))
    summary = {**headline(report), "train": train_summary(record), "trainable_share": record.get("trainable_share"),
               **about}
    if mask is not None and budget is not None:
        summary["alignment_budget_frozen"] = \
            sum(int((mask.units[k] & budget.units[k]).sum()) for k in budget.units) / budget.count()
    del tuned
    release()
    return summary


STAGE = register(Stage("finetune", run, reads=reads, needs=("groups",)))
