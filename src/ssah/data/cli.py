"""`ssah data`: list the built-in datasets and show the records of any dataset spec."""

from __future__ import annotations

import json

import click

from ssah.data.loading import SPEC_HELP


@click.group("data")
def data() -> None:
    """List built-in datasets; show the records, count and fingerprint of any dataset spec."""


@data.command("list")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def list_datasets(as_json: bool) -> None:
    """Every built-in dataset with its splits and record counts."""
    from ssah.data.catalog import builtin_names

    infos = builtin_names()
    if as_json:
        click.echo(json.dumps({name: info.to_dict() for name, info in infos.items()}, indent=2))
        return
    for name, info in infos.items():
        splits = ", ".join(f"{split} {count}" for split, count in info.splits.items())
        click.echo(f"{name:<20} {info.total:>5}  ({splits})")
        click.echo(f"{'':<20}        {info.description}")


def _one_line(text: str | None, width: int = 100) -> str:
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


@data.command("show", help=f"Show the records of SPEC with its count and fingerprint. SPEC: {SPEC_HELP}.")
@click.argument("spec")
@click.option("--limit", default=10, show_default=True, type=click.IntRange(min=0),
              help="records to show (0 = all)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (records limited by --limit)")
def show(spec: str, limit: int, as_json: bool) -> None:
    from ssah.data.loading import load_dataset

    dataset = load_dataset(spec)
    shown = dataset.records if limit == 0 else dataset.records[:limit]
    if as_json:
        click.echo(json.dumps({"name": dataset.name, "count": len(dataset), "fingerprint": dataset.fingerprint,
                               "categories": dataset.categories(),
                               "records": [record.to_dict() for record in shown]}, indent=2, ensure_ascii=False))
        return
    click.echo(f"dataset      {dataset.name}")
    click.echo(f"records      {len(dataset)}")
    click.echo(f"fingerprint  {dataset.fingerprint}")
    categories = dataset.categories().items()
    click.echo("categories   " + ", ".join(f"{name or '(none)'} {count}" for name, count in categories))
    for record in shown:
        click.echo("")
        click.echo(f"[{record.id}] category={record.category or '-'} source={record.source}"
                   + (f" answer={record.answer!r} normalizer={record.normalizer}" if record.answer is not None else ""))
        click.echo(f"  prompt:   {_one_line(record.prompt)}")
        if record.response is not None:
            click.echo(f"  response: {_one_line(record.response)}")
    if len(shown) < len(dataset):
        click.echo(f"\n... {len(dataset) - len(shown)} more (--limit 0 shows all)")
