"""Stage 7, transfer: what the fine-tuning attack changed. Regroup the model after the attack (and the
unaligned model, after alignment) with the same sizes and cross-tabulate old against new labels
(Figures 5, 6); with `restore.enabled`, put the studied model's weights of one part at a time back into
the attacked model and measure the share of the ASR rise each part takes back (`restore_table`)."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.io import write_json_atomic
from ssah.pipeline.context import release
from ssah.pipeline.registry import Stage, common, register


def reads(config: RunConfig) -> dict:
    # without the restore table the stage reads nothing of the config (the identity of earlier runs)
    return {"restore": config.restore.model_dump(), "eval": common(config)} if config.restore.enabled else {}


def run(ctx) -> dict:
    from ssah.analysis.transfer import plot_transfer, transfer_summary
    from ssah.units.groups import Groups, make_groups
    from ssah.units.scores import Scores

    layout = ctx.layout
    before = Groups.load(layout.groups)
    summary = {}
    attack = layout.finetuned_model("plain")
    if attack.is_dir():
        loaded = ctx.load(attack)
        after = ctx.score_and_group(loaded, layout.regrouped_after_finetune)
        del loaded
        release()
        table = transfer_summary(before, after)
        plot_transfer(table, layout.transfer_plot("finetune"), "after benign fine-tuning (Fig. 5)")
        summary["finetune"] = table
    base = layout.unaligned_groups
    if (base / "groups" / "groups.json").is_file():
        unaligned = Groups.load(base / "groups")
        if ctx.budget_sizes() != ctx.config.groups.sizes:
            # The table compares groups of the same sizes: regroup the unaligned model's saved scores.
            g = ctx.config.groups
            unaligned = make_groups(Scores.load(base / "scores-safety"), Scores.load(base / "scores-utility"),
                                    before.meta["sizes"], normalize=g.normalize, ranking=g.ranking,
                                    ru_normalize=g.ru_normalize, ru_ranking=g.ru_ranking)
        table = transfer_summary(unaligned, before)
        plot_transfer(table, layout.transfer_plot("alignment"), "after alignment (Fig. 6)")
        summary["alignment"] = table
    if ctx.config.restore.enabled:
        summary["restore"] = restore(ctx)
    write_json_atomic(layout.transfer_record, summary)
    return summary


def restore(ctx) -> dict:
    """The restore table of the `restore.attacked` row's model against the studied model, on the run's
    harmful test prompts under the verdict rule (the first evaluated rule when a judge gives verdicts)."""
    from ssah.analysis.restore import restore_table
    from ssah.units.groups import Groups

    c, layout = ctx.config, ctx.layout
    settings = ctx.eval_settings(["safety"])
    rule = c.eval.verdict_rule if c.eval.verdict_rule in settings.rules else settings.rules[0]
    data = {role: dataset for role, dataset in ctx.eval_data.items() if role == "harmful"}
    aligned = ctx.load(ctx.studied_model_spec())
    attacked = ctx.load(layout.finetuned_model(c.restore.attacked))
    table = restore_table(aligned, attacked, Groups.load(layout.groups), c.restore.parts, layout.restore, settings,
                          data, rule=rule, seed=c.seed)
    del aligned, attacked
    release()
    return {"attacked_row": c.restore.attacked,
            **{key: table[key] for key in ("rule", "n", "undecided", "aligned", "attacked", "asr_rise", "parts")}}


STAGE = register(Stage("transfer", run, reads=reads, needs=("groups", "finetune")))
