"""`ssah prune`: zero a unit mask for good and save a normal Hugging Face folder; `ssah restore`: the share
of the ASR rise each parameter group's aligned weights take back."""

from __future__ import annotations

import click

from ssah.analysis.restore import DEFAULT_PARTS
from ssah.cli_common import SEED, check_model_spec, device_option, load_from_options, model_options, output_folder
from ssah.defaults import DTYPES, RULES, SYSTEM_PROMPT_MODES
from ssah.evaluate.settings import EvalSettings
from ssah.models.spec import SAVED_MODEL_FILES
from ssah.outputs import OutputKind

_EVAL_DEFAULTS = {name: field.get_default(call_default_factory=True)
                  for name, field in EvalSettings.model_fields.items()}

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


@click.command("restore")
@click.option("--aligned", "aligned_spec", required=True, metavar="SPEC", help="the model before the attack")
@click.option("--attacked", "attacked_spec", required=True, metavar="SPEC",
              help="the same model after the attack (e.g. a plain fine-tuning's output folder)")
@click.option("--groups", "groups_dir", required=True, type=click.Path(),
              help="folder written by `ssah groups` on the aligned model")
@click.option("--parts", default=",".join(DEFAULT_PARTS), show_default=True,
              help="comma-separated parts to restore one at a time: unit groups, embeddings, norms, qk, other, "
                   "and unions joined by + (SCU+CU, SCU+embeddings)")
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--harmful", default=None, metavar="DATA", help="harmful prompts (default harmful:test)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="use the first N harmful prompts")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=_EVAL_DEFAULTS["max_new_tokens"],
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_EVAL_DEFAULTS["batch_size"], show_default=True)
@click.option("--system-prompt", "system_mode", default=_EVAL_DEFAULTS["system_prompt"], show_default=True,
              type=click.Choice(SYSTEM_PROMPT_MODES), help="evaluate without a system prompt, with it, or both")
@click.option("--rule", default="prefix", show_default=True, type=click.Choice(RULES),
              help="refusal rule that decides attack success")
@click.option("--resamples", type=click.IntRange(min=1), default=2000, show_default=True,
              help="bootstrap resamples of the prompts for each share's interval")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the bootstrap")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="auto: bf16 on CUDA, fp32 on CPU")
@click.option("--device", default="auto", show_default=True, callback=device_option,
              help="auto: cuda if present, else cpu; or cpu, cuda, cuda:N, mps")
@click.option("--force", is_flag=True, help="replace evaluations in OUT that ssah wrote from other models")
def restore(aligned_spec, attacked_spec, groups_dir, parts, out, harmful, limit, max_new_tokens, batch_size,
            system_mode, rule, resamples, seed, dtype, device, force) -> None:
    """Put the aligned weights of one parameter group at a time back into the attacked model and
    measure the share of the ASR rise each takes back (paired bootstrap 95% intervals); writes
    OUT/restore.json and one evaluation folder per state."""
    from ssah.analysis.restore import RESTORE, check_parts, restore_table
    from ssah.evaluate.runner import load_eval_data
    from ssah.interventions.restore import aligned_tensors
    from ssah.models.loading import load_model
    from ssah.models.spec import resolve_model_spec
    from ssah.units.groups import Groups

    part_list = check_parts(parts.split(","))
    settings = EvalSettings.from_dict({"suites": ["safety"], "rules": [rule], "max_new_tokens": max_new_tokens,
                                       "batch_size": batch_size, "system_prompt": system_mode, "limit": limit})
    data = load_eval_data(settings.suites, settings.limit, harmful=harmful)
    groups = Groups.load(groups_dir)
    for spec in (aligned_spec, attacked_spec):
        resolve_model_spec(spec)  # a wrong spec fails before the output folder is made
    folder = output_folder(out, RESTORE, inputs=[groups_dir, aligned_spec, attacked_spec,
                                                 harmful and harmful.partition(":")[2]], force=force)
    aligned = load_model(aligned_spec, dtype=dtype, device=device)
    attacked = load_model(attacked_spec, dtype=dtype, device=device)
    aligned_tensors(aligned.model, attacked.layout)  # two versions of one model, or one line before OUT is made
    with folder:
        table = restore_table(aligned, attacked, groups, part_list, out, settings, data, rule, resamples, seed,
                              force)
    click.echo(format_restore(table))
    click.echo(f"wrote  {out}/restore.json")


def format_restore(table: dict) -> str:
    """The restore table as text: one line per part."""
    def share(row: dict) -> str:
        if row["share"] is None:
            return "n/a"
        ci = row["share_ci"]
        return f"{row['share']:+.0%}" + (f" [{ci[0]:+.0%}, {ci[1]:+.0%}]" if ci else "")

    lines = [f"ASR ({table['rule']} rule, {table['n']} prompts): aligned {table['aligned']['asr']:.1%}, "
             f"attacked {table['attacked']['asr']:.1%}",
             f"{'part':<24} {'ASR':>7}  share of the rise restored [95% CI]"]
    lines += [f"{row['part']:<24} {row['asr']:>7.1%}  {share(row)}" for row in table["parts"]]
    reasons = {row["share_reason"] for row in table["parts"] if row["share_reason"]}
    lines += [f"share undefined: {reason}" for reason in sorted(reasons)]
    return "\n".join(lines)
