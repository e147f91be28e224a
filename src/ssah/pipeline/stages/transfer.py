"""Stage 7, transfer: regroup the model after the fine-tuning attack (and the unaligned model, after
alignment) with the same sizes and cross-tabulate old against new labels (Figures 5, 6)."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.io import write_json_atomic
from ssah.pipeline.context import release
from ssah.pipeline.registry import Stage, register


def reads(config: RunConfig) -> dict:
    return {}


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
                                    before.meta["sizes"], normalize=g.normalize, ranking=g.ranking)
        table = transfer_summary(unaligned, before)
        plot_transfer(table, layout.transfer_plot("alignment"), "after alignment (Fig. 6)")
        summary["alignment"] = table
    write_json_atomic(layout.transfer_record, summary)
    return summary


STAGE = register(Stage("transfer", run, reads=reads, needs=("groups", "finetune")))
