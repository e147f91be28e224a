"""`ssah transfer`: cross-tabulate unit groups before and after training; `ssah report`: render a run
folder's report again."""

from __future__ import annotations

import click


@click.command("transfer")
@click.option("--before", "before_dir", required=True, type=click.Path(), help="groups of the model before training")
@click.option("--after", "after_dir", required=True, type=click.Path(),
              help="groups of the trained model, made with the same sizes and normalisation")
@click.option("--out", required=True, type=click.Path(), help="folder for transfer.json and transfer.png")
def transfer(before_dir: str, after_dir: str, out: str) -> None:
    """Share of all units moving between SCU/UCU/CU/RU (the paper's Figures 5 and 6)."""
    from pathlib import Path

    from ssah.analysis.transfer import TRANSFER, plot_transfer, transfer_summary
    from ssah.cli_common import output_folder
    from ssah.errors import SsahError
    from ssah.io import write_json_atomic
    from ssah.units.groups import Groups

    before, after = Groups.load(before_dir), Groups.load(after_dir)
    for key in ("sizes", "normalize", "ranking"):
        if before.meta[key] != after.meta[key]:
            raise SsahError(f"the two groupings differ in {key} ({before.meta[key]} vs {after.meta[key]}); "
                            "regroup the trained model with the same settings")
    summary = transfer_summary(before, after)
    with output_folder(out, TRANSFER, inputs=[before_dir, after_dir]):
        plot_transfer(summary, Path(out) / "transfer.png")
        write_json_atomic(Path(out) / "transfer.json", summary)
    click.echo("rows: before, columns: after (% of all units)")
    click.echo("       " + "".join(f"{g:>8}" for g in summary["groups"]))
    for name, row in zip(summary["groups"], summary["table_percent"]):
        click.echo(f"{name:>6} " + "".join(f"{v:8.2f}" for v in row))
    for name, share in summary["share_left_group"].items():
        if share is not None:
            click.echo(f"{name} units that left the group: {share:.1%}")


@click.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(),
              help="write the HTML here instead (RUN_DIR is then left as it is)  [default: RUN_DIR/report.html]")
def report(run_dir: str, out: str | None) -> None:
    """Render a run folder's report.html and results.json again from the stages that finished (runs no stage)."""
    from ssah.pipeline.stages.report import rerender

    for path in rerender(run_dir, out):
        click.echo(f"wrote {path}")
