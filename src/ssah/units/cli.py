"""`ssah units`: print a model's unit layout."""

from __future__ import annotations

import json
import time

import click

from ssah.cli_common import SEED, check_model_spec, device_option, load_from_options, model_options, output_folder
from ssah.defaults import (
    ATTN_UNITS,
    DEFAULT_NORMALIZATION,
    DEFAULT_RANKING,
    DEFAULT_SCORER,
    DEFAULT_SIZES_TEXT,
    DTYPES,
    NORMALIZATIONS,
    RANKINGS,
    RESPONSE_SOURCES,
    TOKEN_SCOPES,
)


@click.command("units")
@model_options
@click.option("--attn-unit", type=click.Choice(ATTN_UNITS), default="channel", show_default=True,
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
    if any(summary["post_norms"].values()):
        names = ", ".join(f"{kind}: {name}" for kind, name in summary["post_norms"].items() if name)
        click.echo(f"post norms   {names} (each sublayer's output is RMS-normalised before the residual add: "
                   "scores include the norm; pruning units rescales the rest of their sublayer)")


@click.command("score")
@model_options
@click.option("--data", "data_spec", required=True, metavar="DATA",
              help="dataset spec, e.g. harmful:calibration, benign:calibration, jsonl:PATH (see `ssah data`)")
@click.option("--scorer", default=DEFAULT_SCORER, show_default=True,
              help="variance (paper Eq. 1), wanda, snip, activation, or any registered scorer")
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--responses", type=click.Choice(RESPONSE_SOURCES), default="dataset", show_default=True,
              help="replies to score: the dataset's, built-in scoring refusals (paired by --seed), "
              "the model's own greedy ones, or only those of them that refuse (own-refusals)")
@click.option("--token-scope", type=click.Choice(TOKEN_SCOPES), default=None,
              help="tokens that count: all non-padding (default; snip: response), prompt or response only")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True,
              help="tokens per pair; the response is cut first")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="reply length with --responses self or own-refusals")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="score only the first N records")
@click.option("--seed", type=SEED, default=0, show_default=True, help="pairs prompts with refusals")
@click.option("--system", default=None, metavar="TEXT", help="system prompt for every pair")
@click.option("--attn-unit", type=click.Choice(ATTN_UNITS), default="channel", show_default=True,
              help="attention unit: one o_proj input channel, or one whole head")
@click.option("--force", is_flag=True, help="recompute and replace the scores ssah wrote in the output folder")
def score(model_args: dict, data_spec: str, scorer: str, out: str, responses: str, token_scope: str | None,
          batch_size: int, max_length: int, max_new_tokens: int, limit: int | None, seed: int,
          system: str | None, attn_unit: str, force: bool) -> None:
    """Score every unit's importance on a dataset; writes scores.safetensors and manifest.json to --out."""
    from ssah.data import load_dataset
    from ssah.units.scores import SCORES, get_scorer, score_dataset

    get_scorer(scorer)  # an unknown name fails before the model loads
    dataset = load_dataset(data_spec)
    if limit is not None:
        dataset = dataset.take(limit)
    check_model_spec(model_args)
    folder = output_folder(out, SCORES, inputs=[data_spec.partition(":")[2], model_args["spec"]], force=force)
    loaded = load_from_options(model_args)
    start = time.perf_counter()
    with folder:
        result = score_dataset(loaded, dataset, scorer=scorer, responses=responses, token_scope=token_scope,
                               batch_size=batch_size, max_length=max_length, system=system, seed=seed,
                               max_new_tokens=max_new_tokens, attn_unit=attn_unit, out=out, force=force)
    _echo_scores(result, out, time.perf_counter() - start)


def _echo_scores(result, out: str, seconds: float) -> None:
    manifest = result.manifest
    if result.reused:
        click.echo(f"reused the scores already in {out} (same model, data and settings); pass --force to recompute")
    else:
        click.echo(f"scored {manifest['num_records']} records of {manifest['dataset_name']} "
                   f"(responses: {manifest['responses']}, {manifest['tokens_seen']:,} tokens, scope "
                   f"{manifest['token_scope']}) with {manifest['scorer']} in {seconds:.1f} s")
    click.echo(f"model        {manifest['model_spec']}  (fingerprint {manifest['model_fingerprint']})")
    for kind, values in result.values.items():
        click.echo(f"{kind:<12} {values.shape[0]} layers x {values.shape[1]} units  "
                   f"mean {values.mean():.4g}  max {values.max():.4g}")
    click.echo(f"wrote        {out}/scores.safetensors, {out}/manifest.json")


@click.command("groups")
@click.option("--safety", "safety_dir", required=True, type=click.Path(),
              help="folder written by ssah score on safety data")
@click.option("--utility", "utility_dir", required=True, type=click.Path(),
              help="folder written by ssah score on utility data (same model)")
@click.option("--sizes", default=DEFAULT_SIZES_TEXT, show_default=True,
              help="fractions of all units (or percentages, e.g. scu=1.3%); CU is the rest. 'auto': choose "
              "each size by a pruning sweep on the model (see --sweep-*)")
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default=DEFAULT_NORMALIZATION, show_default=True,
              help="how S and U are made comparable before subtracting (per unit kind): "
              "percentiles, division by the mean, or z-scores per layer")
@click.option("--ranking", type=click.Choice(RANKINGS), default=DEFAULT_RANKING, show_default=True,
              help="rank units across all layers, or within each layer")
@click.option("--model", "model_spec", default=None, metavar="SPEC",
              help="--sizes auto: the scored model (default: the spec recorded with the safety scores)")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES),
              help="--sizes auto: model dtype")
@click.option("--device", default="auto", show_default=True, callback=device_option, help="--sizes auto: model device")
@click.option("--sweep-safety-data", default=None, metavar="DATA",
              help="--sizes auto: harmful prompts for the refusal share (default: the safety scores' dataset)")
@click.option("--sweep-utility-data", default=None, metavar="DATA",
              help="--sizes auto: prompts with answers for the perplexity (default: the utility scores' dataset)")
@click.option("--sweep-samples", default=32, show_default=True, type=click.IntRange(min=1),
              help="--sizes auto: records of each sweep dataset")
@click.option("--ru-normalize", type=click.Choice(NORMALIZATIONS), default=None,
              help="RU's own normalisation (default: --normalize)")
@click.option("--ru-ranking", type=click.Choice(RANKINGS), default=None, help="RU's own ranking (default: --ranking)")
@click.option("--sweep-thresholds", default=None, metavar="NAME=V,...",
              help="--sizes auto: hurt_safety (0.3), spare_safety (0.1), hurt_utility (0.5), spare_utility (0.1)")
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--force", is_flag=True, help="recompute and replace the groups ssah wrote in the output folder")
def groups(safety_dir: str, utility_dir: str, sizes: str, normalize: str, ranking: str, model_spec: str | None,
           dtype: str, device: str, sweep_safety_data: str | None, sweep_utility_data: str | None,
           sweep_samples: int, ru_normalize: str | None, ru_ranking: str | None, sweep_thresholds: str | None, out: str,
           force: bool) -> None:
    """Sort units into SCU / UCU / CU / RU; writes groups.safetensors, groups.json and a per-layer plot."""
    from ssah.units.recipes import GROUPS, group_units
    from ssah.units.scores import Scores
    from ssah.units.sizes import parse_sizes

    auto = sizes.strip().lower() == "auto"
    fractions = "auto" if auto else parse_sizes(sizes)
    safety, utility = Scores.load(safety_dir), Scores.load(utility_dir)
    folder = output_folder(out, GROUPS, inputs=[safety_dir, utility_dir], force=force)
    sweep = None
    if auto:
        sweep = _sweep_spec(safety, model_spec, dtype, device, sweep_safety_data, sweep_utility_data,
                            sweep_samples, sweep_thresholds)
    start = time.perf_counter()
    with folder:
        result = group_units(safety, utility, out, fractions, normalize=normalize, ranking=ranking, sweep=sweep,
                             force=force, ru_normalize=ru_normalize, ru_ranking=ru_ranking)
    if result.reused:
        click.echo(f"reused the groups already in {out} (same scores and settings); pass --force to recompute")
    elif auto:
        steps = len(result.meta["size_selection"]["steps"])
        click.echo(f"size sweep: {steps} pruned evaluations in {time.perf_counter() - start:.1f} s")
    _echo_groups(result, out)


def _sweep_spec(safety, model_spec, dtype, device, safety_data, utility_data, samples, thresholds):
    from ssah.data import load_dataset
    from ssah.models.loading import load_model
    from ssah.units.recipes import SweepSpec
    from ssah.units.size_sweep import SweepThresholds

    parsed = SweepThresholds.parse(thresholds)
    safety_data = load_dataset(safety_data) if safety_data else None
    utility_data = load_dataset(utility_data) if utility_data else None
    loaded = load_model(model_spec or _recorded_model(safety), dtype=dtype, device=device)
    return SweepSpec(loaded, safety_data, utility_data, samples, parsed)


def _echo_groups(result, out: str) -> None:
    from ssah.defaults import GROUP_NAMES

    meta = result.meta
    per_kind = meta["counts_per_kind"]
    kinds = list(per_kind)
    click.echo(f"{meta['total_units']:,} units of model {meta['model_fingerprint']} "
               f"(normalize={meta['normalize']}, ranking={meta['ranking']})")
    click.echo(f"{'group':<6} {'units':>8} {'share':>8} {'asked':>8}  " + "  ".join(f"{k:>8}" for k in kinds))
    for name in GROUP_NAMES:
        asked = meta["sizes"].get(name.lower())
        asked_text = f"{asked:.2%}" if asked is not None else "rest"
        click.echo(f"{name:<6} {meta['counts'][name]:>8,} {meta['shares'][name]:>8.2%} {asked_text:>8}  "
                   + "  ".join(f"{per_kind[k][name]:>8,}" for k in kinds))
    selection = meta.get("size_selection")
    if selection:
        for name, ok in selection["met"].items():
            if not ok:
                click.echo(f"warning: {name} size: {selection['reasons'][name]}; see {out}/size_sweep.png")
    click.echo(f"wrote  {out}/groups.safetensors, {out}/groups.json, {out}/groups_per_layer.png"
               + (f", {out}/size_sweep.png" if selection else ""))


def _recorded_model(scores) -> str:
    from ssah.errors import SsahError

    spec = scores.manifest.get("model_spec")
    if not spec:
        raise SsahError("the safety scores do not record their model; pass --model")
    return spec


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@click.command("faithfulness")
@model_options
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--scorers", default="variance,wanda,activation", show_default=True,
              help="comma-separated registered scorers")
@click.option("--normalizations", default=",".join(NORMALIZATIONS), show_default=True,
              help="comma-separated normalisations of S and U")
@click.option("--rankings", default=",".join(RANKINGS), show_default=True, help="comma-separated rankings")
@click.option("--sizes", default="scu=0.013,ucu=0.133,ru=0.148", show_default=True,
              help="group sizes, fractions of all units (the paper's for Llama-2-7B-Chat)")
@click.option("--score-limit", type=click.IntRange(min=1), default=64, show_default=True,
              help="records of each scoring dataset (harmful:calibration with refusals, benign:calibration)")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="harmful prompts, checkable tasks and reference answers each that every state is measured on")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="reply tokens for the ASR (prefix rule)")
@click.option("--draws", type=click.IntRange(min=1), default=2, show_default=True,
              help="seeded random draws per group size")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
def faithfulness(model_args: dict, out: str, scorers: str, normalizations: str, rankings: str, sizes: str,
                 score_limit: int, samples: int, max_new_tokens: int, draws: int, batch_size: int,
                 seed: int) -> None:
    """Which score finds safety units: prune SCU, UCU and RU of every scorer x normalisation x ranking
    against random units on calibration data; writes faithfulness.json and faithfulness.png."""
    from ssah.units.faithfulness import FAITHFULNESS, FaithfulnessSpec, faithfulness_table
    from ssah.units.sizes import parse_sizes

    spec = FaithfulnessSpec(scorers=_names(scorers), normalizations=_names(normalizations),
                            rankings=_names(rankings), sizes=parse_sizes(sizes), score_limit=score_limit,
                            samples=samples, max_new_tokens=max_new_tokens, draws=draws, batch_size=batch_size,
                            seed=seed)
    spec.check()  # bad names fail before the model loads
    check_model_spec(model_args)
    folder = output_folder(out, FAITHFULNESS, inputs=[model_args["spec"]])
    loaded = load_from_options(model_args)
    start = time.perf_counter()
    with folder:
        table = faithfulness_table(loaded, spec, out)
    base = table["unpruned"]
    click.echo(f"unpruned: ASR {base['asr']:.0%}, task accuracy {base['accuracy']:.0%}, perplexity "
               f"{base['perplexity']:.3g} ({table['items']['safety_prompts']} prompts, {table['items']['tasks']} "
               f"tasks, {table['items']['answers']} answers); {time.perf_counter() - start:.0f} s")
    click.echo(_format_rows(_summary_rows(table)))
    click.echo(f"wrote  {out}/faithfulness.json, {out}/faithfulness.png")


def _summary_rows(table: dict) -> list[dict]:
    """One flat row per cell of a faithfulness table."""
    from ssah.units.plots import cell_name

    rows = []
    for cell in table["cells"]:
        g = cell["groups"]
        rows.append({"cell": cell_name(cell), "scu_asr_rise": g["SCU"]["asr_rise"],
                     "scu_random_asr_rise": g["SCU"]["random_asr_rise"], "scu_task_drop": g["SCU"]["task_drop"],
                     "ucu_task_drop": g["UCU"]["task_drop"], "ucu_perplexity_ratio": g["UCU"]["perplexity_ratio"],
                     "ru_perplexity_ratio": g["RU"]["perplexity_ratio"], "ru_asr_rise": g["RU"]["asr_rise"],
                     "meets_scu": cell["meets"]["scu"], "meets_ru": cell["meets"]["ru"]})
    return rows


def _format_rows(rows: list[dict]) -> str:
    head = (f"{'cell':<40} {'SCU ASR+':>9} {'rand':>6} {'SCU task-':>9} {'UCU task-':>9} {'UCU ppl':>8} "
            f"{'RU ppl':>8} {'RU ASR+':>8}  SCU RU")
    lines = [head]
    for r in rows:
        lines.append(f"{r['cell']:<40} {100 * r['scu_asr_rise']:>+9.1f} {100 * r['scu_random_asr_rise']:>+6.1f} "
                     f"{100 * r['scu_task_drop']:>+9.1f} {100 * r['ucu_task_drop']:>+9.1f} "
                     f"{r['ucu_perplexity_ratio']:>8.3g} {r['ru_perplexity_ratio']:>8.3g} "
                     f"{100 * r['ru_asr_rise']:>+8.1f}  {'yes' if r['meets_scu'] else 'no ':<3} "
                     f"{'yes' if r['meets_ru'] else 'no'}")
    return "\n".join(lines)
