"""Stage 8, attacks: the fine-tuning attack grid on the studied model, every defense under every
attack of the strength sweep (`ssah.attacks`); off unless `attacks.enabled`."""

from __future__ import annotations

from ssah.config import RunConfig
from ssah.io import write_json_atomic, write_text_atomic
from ssah.pipeline.registry import Stage, register


def reads(config: RunConfig) -> dict:
    return {"attacks": config.attacks.model_dump(), "refusals": config.data.grid_refusals,
            "eval": config.eval.model_dump(exclude={"slots"})}


def run(ctx) -> dict:
    from ssah.attacks import matrix, plots, tables
    from ssah.attacks.schedule import run_grid

    if not ctx.config.attacks.enabled:
        return {"skipped": "attacks.enabled is false"}
    stage = ctx.layout.attack_grid
    grid = run_grid(ctx, stage)
    summary = matrix.summary(grid.table, grid.before, stage, ctx.config.eval.verdict_rule, grid.combination,
                             ctx.config.seed)
    plots.plot_heatmap(summary, stage / plots.HEATMAP)
    plots.plot_worst_bars(summary, stage / plots.WORST_BARS)
    write_text_atomic(stage / "attacks.md", tables.markdown_table(summary))
    write_json_atomic(stage / "attacks.json", summary)
    return summary


STAGE = register(Stage("attacks", run, reads=reads, needs=("groups",)))
