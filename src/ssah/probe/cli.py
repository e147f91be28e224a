"""`ssah probe`: the reasoning-direction probe for one model, or two on the same plots."""

from __future__ import annotations

import click

from ssah.cli_common import SEED, check_model_spec, load_from_options, model_options, output_folder
from ssah.errors import SsahError


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SsahError(f"{option} {text!r} must be comma-separated integers, e.g. 2,4,6") from None


@click.command("probe")
@model_options
@click.option("--compare", "compare_spec", default=None, metavar="SPEC",
              help="a second model (e.g. the same model before/after alignment) put on the same plots")
@click.option("--harmful", default="harmful:calibration", show_default=True, metavar="DATA",
              help="harmful prompts: the probe's queries and the harmful side of the directions")
@click.option("--benign", default="benign:calibration", show_default=True, metavar="DATA",
              help="benign prompts: the other side of the directions and the linear probe")
@click.option("--refusals", default="refusals:openings", show_default=True, metavar="DATA",
              help="refusal replies; their first tokens are the refusal openings")
@click.option("--compliance", default="compliance_openings", show_default=True, metavar="DATA",
              help="compliance openings ('Sure, here is ...')")
@click.option("--limit", type=click.IntRange(min=1), default=32, show_default=True,
              help="use N harmful and N benign prompts (a sample seeded by --seed, kept in dataset order)")
@click.option("--lengths", default="2,4,6,8,10", show_default=True, help="opening lengths in tokens")
@click.option("--layers", default=None,
              help="comma-separated layer indices (negative counts from the end); default all")
@click.option("--position", type=click.Choice(["last", "mean"]), default="last", show_default=True,
              help="state compared: the last token's, or the mean over the opening's tokens")
@click.option("--baseline", type=click.Choice(["none", "neutral"]), default="none", show_default=True,
              help="neutral: subtract the distance of a neutral continuation of the same length")
@click.option("--allow-short-openings", is_flag=True,
              help="keep openings shorter than the longest length (used whole there); default: drop them")
@click.option("--system", default=None, help="system prompt for every query")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="pairs openings with prompts; splits the probe data")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(), help="output folder")
def probe(model_args: dict, compare_spec: str | None, harmful: str, benign: str, refusals: str, compliance: str,
          limit: int, lengths: str, layers: str | None, position: str, baseline: str, allow_short_openings: bool,
          system: str | None,
          seed: int, batch_size: int, out_dir: str) -> None:
    """Reasoning-direction probe (paper Sec. 3) plus per-layer directions and linear probes.

    For each harmful prompt: cosine distance of the state after a refusal opening and after a
    compliance opening (2..10 tokens) from the clean prompt's state, at every layer. Writes
    probe.json, directions.safetensors (directions_compare.safetensors for --compare) and two plots.
    The default data are calibration splits, so the directions can feed the runtime monitor;
    pass --harmful harmful:test to measure on held-out prompts.
    """
    from ssah.probe.reasoning import ReasoningConfig
    from ssah.probe.study import PROBE, probe_data, run_probe

    config = ReasoningConfig(lengths=tuple(_int_list(lengths, "--lengths") or ()), position=position,
                             baseline=baseline, layers=_int_list(layers, "--layers"), seed=seed,
                             batch_size=batch_size, full_length_only=not allow_short_openings, system=system)
    data = probe_data(harmful, benign, refusals, compliance, limit=limit, seed=seed)
    specs = [model_args["spec"]] + ([compare_spec] if compare_spec else [])
    from ssah.models.spec import check_layers

    for spec in specs:
        check_layers(config.layers, check_model_spec({**model_args, "spec": spec}), "--layers")
    with output_folder(out_dir, PROBE, inputs=specs):
        run_probe(specs, data, config, out_dir, load=lambda spec: load_from_options({**model_args, "spec": spec}))
