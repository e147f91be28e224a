"""`ssah prune`: zero a unit mask for good and save a normal Hugging Face folder."""

from __future__ import annotations

import click

from ssah.cli_common import load_from_options, model_options


@click.command("prune")
@model_options
@click.option("--groups", "groups_dir", required=True, type=click.Path(), help="folder written by `ssah groups`")
@click.option("--mask", "expression", required=True, help="mask expression, e.g. SCU, SCU+CU:top=0.06, random:like=SCU")
@click.option("--seed", default=0, show_default=True, help="seed for random masks")
@click.option("--out", required=True, type=click.Path(), help="output model folder")
@click.option("--force", is_flag=True, help="overwrite an output folder made from other inputs")
def prune(model_args: dict, groups_dir: str, expression: str, seed: int, out: str, force: bool) -> None:
    """Permanently zero the units of a mask; `from_pretrained(OUT)` then computes the pruned model."""
    from ssah.interventions.masks import load_mask
    from ssah.interventions.prune import prune_
    from ssah.io import atomic_dir, existing_run, write_json_atomic

    loaded = load_from_options(model_args)
    mask = load_mask(groups_dir, expression, seed)
    identity = {"model_fingerprint": loaded.fingerprint, "mask": expression, "groups": mask.groups_digest, "seed": seed}
    if existing_run(out, "ssah_prune.json", identity, force):
        click.echo(f"{out} already holds this pruned model; nothing to do")
        return
    zeroed = prune_(loaded.model, loaded.layout, mask)
    record = {"identity": identity, "units_pruned": mask.count(), "unit_share": mask.share(),
              "entries_zeroed": zeroed, "source_model": loaded.spec}
    with atomic_dir(out) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "ssah_prune.json", record)
    click.echo(f"pruned {mask.count()} units ({mask.share():.2%}) = {zeroed:,} entries; saved {out}")
