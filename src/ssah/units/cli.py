"""`ssah units`: print a model's unit layout."""

from __future__ import annotations

import json

import click

from ssah.cli_common import load_from_options, model_options


@click.command("units")
@model_options
@click.option("--attn-unit", type=click.Choice(["channel", "head"]), default="channel", show_default=True,
              help="attention unit: one o_proj input channel, or one whole head")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def units(model_args: dict, attn_unit: str, as_json: bool) -> None:
    """Print the unit layout: model type, layers, units per kind and layer, owned parameters."""
    from ssah.units.layout import UnitLayout

    loaded = load_from_options(model_args)
    summary = UnitLayout.from_model(loaded.model, attn_unit=attn_unit).summary()
    summary["model"] = loaded.spec
    summary["fingerprint"] = loaded.fingerprint
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"model        {loaded.spec}  ({summary['model_type']}, fingerprint {loaded.fingerprint})")
    click.echo(f"layers       {summary['num_layers']}")
    for kind, count in summary["units_per_layer"].items():
        click.echo(f"{kind:<12} {count} units/layer, {summary['units_per_kind'][kind]} in all")
    click.echo(f"total units  {summary['total_units']}")
    share = summary["parameters_owned_by_units"] / summary["parameters_total"]
    click.echo(f"parameters   {summary['parameters_total']:,} total, "
               f"{summary['parameters_owned_by_units']:,} owned by units ({share:.1%}), "
               f"{summary['parameters_not_owned']:,} not (embeddings, norms, q/k, shared v, biases of B)")
