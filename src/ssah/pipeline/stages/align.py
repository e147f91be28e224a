"""Stage 2, align (for a model without safety behaviour): group the unaligned model's units, align
inside the budget (align.budget, e.g. RU), inside random budgets of the same per-layer, per-kind sizes
(one per seed of align.random_budget_seeds: does the choice of units matter?) and, for comparison, with
all parameters (the alignment tax); evaluate each."""

from __future__ import annotations

import logging
from typing import TypedDict

from ssah.config import RunConfig
from ssah.defaults import random_draws
from ssah.pipeline.context import release
from ssah.pipeline.registry import Stage, common, register
from ssah.pipeline.summaries import Headline, TrainSummary, headline, train_summary

log = logging.getLogger("ssah.pipeline")


class AlignedModel(TypedDict, total=False):
    mask: str
    units: int
    share: float
    trainable_share: float | None  # share of parameter entries the training could change
    seed: int  # random budgets: the draw's seed
    overlap_with_budget: float  # random budgets: share of its units inside the budget (0: drawn outside it)
    train: TrainSummary
    eval: Headline


class AlignSummary(TypedDict, total=False):
    skipped: str
    pairs: int
    harmful: int
    benign: int
    borderline: int
    recovery: int
    budget: AlignedModel
    random_budget: dict[str, AlignedModel]  # random_budget_s{seed} -> its model
    full: AlignedModel


def reads(config: RunConfig) -> dict:
    groups = {**config.groups.identity(), "sizes": config.align.group_sizes or config.groups.sizes}
    return {**common(config), "align": config.align.model_dump(), "scores": config.scores.model_dump(),
            "groups": groups}


def inputs(ctx):
    """What alignment trains on, from the config (see `ssah.train.recipes.AlignInputs`)."""
    from ssah.data import load_dataset
    from ssah.train.recipes import AlignInputs, limited

    c, d = ctx.config, ctx.config.data
    return AlignInputs(harmful=load_dataset(d.harmful_train),
                       benign=limited(load_dataset(d.benign_train), c.align.benign_limit, c.seed),
                       refusals=load_dataset(d.align_refusals),
                       borderline=load_dataset(d.borderline_train) if d.borderline_train else None,
                       borderline_tokens=c.align.borderline_reply_tokens,
                       borderline_repeats=c.align.borderline_repeats, recovery_lengths=c.align.recovery_lengths,
                       avoid_weight=c.align.refusal_unlikelihood, generation_dtype=c.eval.generation_dtype)


def run(ctx) -> AlignSummary:
    from ssah.interventions.masks import mask_from_expression, overlap, random_like
    from ssah.train.data import alignment_data
    from ssah.train.recipes import align

    c, layout = ctx.config, ctx.layout
    if not c.align.enabled:
        return {"skipped": "align.enabled is false"}
    given = inputs(ctx)
    loaded = ctx.load()
    data = alignment_data(loaded, given.harmful, given.benign, given.refusals, borderline=given.borderline,
                          borderline_tokens=given.borderline_tokens, borderline_repeats=given.borderline_repeats,
                          recovery_lengths=given.recovery_lengths, seed=c.seed, batch_size=c.eval.batch_size,
                          cache_dir=layout.alignment_cache, generation_dtype=given.generation_dtype)
    summary: AlignSummary = dict(data.counts)  # type: ignore[assignment]
    # The budget: groups of the unaligned model from a score on the harmful prompts (paired with
    # refusals) and a utility score; RU units matter least for both.
    groups = ctx.score_and_group(loaded, layout.unaligned_groups, ctx.budget_sizes())
    mask = mask_from_expression(groups, c.align.budget, seed=c.seed)
    log.info("  aligning inside the %s budget (%d units, %.1f%%)", c.align.budget, mask.count(), 100 * mask.share())
    record = align(loaded, given, c.align.train, layout.aligned_model("budget"), budget=mask, seed=c.seed, data=data,
                   replace=True)
    summary["budget"] = {"mask": c.align.budget, "units": mask.count(), "share": mask.share(),
                         "trainable_share": record.get("trainable_share"), "train": train_summary(record)}
    del loaded
    release()
    summary["budget"]["eval"] = _evaluate(ctx, "budget", "aligned (budget)", studied=c.align.study == "budget")
    if c.align.random_budget_seeds:
        summary["random_budget"] = {}
    for kind, seed in zip(random_draws("random_budget", c.align.random_budget_seeds), c.align.random_budget_seeds):
        drawn = random_like(mask, seed, outside=True)
        loaded = ctx.load()
        log.info("  aligning inside a random budget of the same sizes (seed %d)", seed)
        record = align(loaded, given, c.align.train, layout.aligned_model(kind), budget=drawn, seed=c.seed,
                       data=data, replace=True)
        del loaded
        release()
        summary["random_budget"][kind] = {
            "mask": drawn.expression, "seed": seed, "units": drawn.count(), "share": drawn.share(),
            "overlap_with_budget": overlap(drawn, mask), "trainable_share": record.get("trainable_share"),
            "train": train_summary(record), "eval": _evaluate(ctx, kind, f"aligned (random budget, seed {seed})")}
    if c.align.compare_full:
        loaded = ctx.load()
        log.info("  aligning all parameters (comparison)")
        record = align(loaded, given, c.align.train, layout.aligned_model("full"), seed=c.seed, data=data,
                       replace=True)
        del loaded
        release()
        summary["full"] = {"trainable_share": record.get("trainable_share"), "train": train_summary(record),
                           "eval": _evaluate(ctx, "full", "aligned (all parameters)",
                                             studied=c.align.study == "full")}
    return summary


def _evaluate(ctx, kind: str, label: str, studied: bool = False) -> Headline:
    """Evaluate one aligned model: the studied one with the `align` suites, the others as controls."""
    aligned = ctx.load(ctx.layout.aligned_model(kind))
    report = ctx.evaluate(aligned, ctx.layout.aligned_eval(kind), label, as_loaded=True,
                          suites=ctx.suites_for("align" if studied else "align_controls"))
    del aligned
    release()
    return headline(report)


STAGE = register(Stage("align", run, reads=reads))
