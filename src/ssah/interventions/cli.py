"""`ssah prune`: zero a unit mask for good and save a normal Hugging Face folder."""

from __future__ import annotations

import click

from ssah.cli_common import SEED, check_model_spec, load_from_options, model_options, output_folder
from ssah.models.spec import SAVED_MODEL_FILES
from ssah.outputs import OutputKind

PRUNE_RECORD = "ssah_prune.json"
# a saved pruned model: the files save_pretrained writes, and its record
PRUNED_MODEL = OutputKind("pruned model", (PRUNE_RECORD, *SAVED_MODEL_FILES), record=PRUNE_RECORD, whole=True)


@click.command("prune")
@model_options
@click.option("--groups", "groups_dir", required=True, type=click.Path(), help="folder written by `ssah groups`")
@click.option("--mask", "expression", required=True, help="mask expression, e.g. SCU, SCU+CU:top=0.06, random:like=SCU")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed for random masks")
@click.option("--out", required=True, type=click.Path(), help="output model folder")
@click.option("--force", is_flag=True, help="replace an output folder ssah wrote from other inputs")
def prune(model_args: dict, groups_dir: str, expression: str, seed: int, out: str, force: bool) -> None:
    """Permanently zero the units of a mask; `from_pretrained(OUT)` then computes the pruned model."""
    from ssah.artifacts import Artifact
    from ssah.interventions.expressions import parse_mask_expression
    from ssah.interventions.masks import load_mask
    from ssah.interventions.prune import prune_
    parse_mask_expression(expression)
    mask = load_mask(groups_dir, expression, seed)
    folder = output_folder(out, PRUNED_MODEL, inputs=[groups_dir, model_args["spec"]], force=force,
                           need_bytes=check_model_spec(model_args).weight_bytes)
    loaded = load_from_options(model_args)
    mask.check_model(loaded.fingerprint, loaded.layout)
    identity = {"model": loaded.fingerprint, "mask": mask.digest(), "expression": expression,
                "groups": mask.groups_digest, "seed": seed}
    artifact = Artifact(folder.path / PRUNE_RECORD, "a pruned model", identity)
    with folder:
        if artifact.lookup(force=force) is not None:
            click.echo(f"{out} already holds this pruned model; nothing to do")
            return
        zeroed = prune_(loaded.model, loaded.layout, mask)
        with folder.swap() as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            Artifact(tmp / PRUNE_RECORD, artifact.kind, identity).save(
                {"units_pruned": mask.count(), "unit_share": mask.share(), "entries_zeroed": zeroed,
                 "source_model": loaded.spec})
    click.echo(f"pruned {mask.count()} units ({mask.share():.2%}) = {zeroed:,} entries; saved {out}")
