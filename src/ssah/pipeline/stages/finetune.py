"""Stage 5, finetune: the benign fine-tuning attack, plain, with frozen units (the paper's settings
(i) and (ii), and the alignment budget), and with LoRA; each fine-tuned model evaluated (Table 2)."""

from __future__ import annotations

import logging

from ssah.config import RunConfig
from ssah.pipeline.context import release
from ssah.pipeline.registry import Stage, register
from ssah.pipeline.summaries import Headline, headline, train_summary

log = logging.getLogger("ssah.pipeline")
FROZEN = ("freeze_i", "freeze_ii", "freeze_budget")


def reads(config: RunConfig) -> dict:
    return {"finetune": config.finetune.model_dump(), "data": config.data.finetune}


def _budget(ctx):
    """The units the alignment stage trained (from the unaligned model's groups; the studied model is
    that model plus changes inside them, so layout and units match), or None."""
    from ssah.interventions.masks import mask_from_expression
    from ssah.units.groups import Groups

    if ctx.layout.study != "budget":
        return None
    return mask_from_expression(Groups.load(ctx.layout.unaligned_groups / "groups"), ctx.config.align.budget,
                                seed=ctx.config.seed)


def _mask(ctx, setting: str, groups, budget):
    from ssah.interventions.masks import mask_from_expression

    if setting == "freeze_budget":
        return budget
    if setting in FROZEN:
        return mask_from_expression(groups, getattr(ctx.config.finetune, setting), seed=ctx.config.seed)
    return None


def run(ctx) -> dict[str, Headline]:
    from ssah.data import load_dataset
    from ssah.train.recipes import finetune
    from ssah.units.groups import Groups

    c, layout = ctx.config, ctx.layout
    data = load_dataset(c.data.finetune)
    groups = Groups.load(layout.groups)
    # what each frozen set covers of the alignment budget says whether freezing can keep what
    # alignment put there
    budget = _budget(ctx)
    summary: dict = {}
    for setting in c.finetune.settings:
        loaded = ctx.load(ctx.studied_model_spec())
        mask = _mask(ctx, setting, groups, budget)
        log.info("  fine-tuning: %s", setting)
        record = finetune(loaded, data, c.finetune.train, layout.finetuned_model(setting), seed=c.seed, freeze=mask,
                          lora=setting == "lora", frozen_multiplier=c.finetune.frozen_epochs_multiplier, replace=True)
        del loaded
        release()
        tuned = ctx.load(layout.finetuned_model(setting))
        report = ctx.evaluate(tuned, layout.finetuned_eval(setting), f"fine-tuned ({setting})", as_loaded=True)
        summary[setting] = {**headline(report), "train": train_summary(record)}
        if mask is not None and budget is not None:
            summary[setting]["alignment_budget_frozen"] = \
                sum(int((mask.units[k] & budget.units[k]).sum()) for k in budget.units) / budget.count()
        del tuned
        release()
    return summary


STAGE = register(Stage("finetune", run, reads=reads, needs=("groups",), own=("model-*", "eval-*")))
