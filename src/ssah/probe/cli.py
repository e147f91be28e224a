"""`ssah probe`: the reasoning-direction probe for one model, or two on the same plots."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ssah.cli_common import load_from_options, model_options
from ssah.errors import SsahError


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SsahError(f"{option} {text!r} must be comma-separated integers, e.g. 2,4,6") from None


def _load_prompts(spec: str, limit: int | None, what: str, seed: int = 0):
    from ssah.data import load_dataset

    data = load_dataset(spec)
    if limit is not None and len(data) > limit:
        # A seeded sample, not the first N: built-in sets are grouped by kind (benign lists its
        # checkable tasks before free-form requests), and both sides must cover every kind.
        data = data.sample(limit, seed)
    if len(data) == 0:
        raise SsahError(f"{what} dataset {spec!r} gave no prompts (limit {limit}); use a non-empty dataset")
    return data


def _describe(data) -> dict:
    return {"name": data.name, "records": len(data), "fingerprint": data.fingerprint}


@click.command("probe")
@model_options
@click.option("--compare", "compare_spec", default=None, metavar="SPEC",
              help="a second model (e.g. the same model before/after alignment) put on the same plots")
@click.option("--harmful", default="harmful:calibration", show_default=True, metavar="DATA",
              help="harmful prompts: the probe's queries and the harmful side of the directions")
@click.option("--benign", default="benign:calibration", show_default=True, metavar="DATA",
              help="benign prompts: the other side of the directions and the linear probe")
@click.option("--refusals", default="refusals", show_default=True, metavar="DATA",
              help="refusal replies; their first tokens are the refusal openings")
@click.option("--compliance", default="compliance_openings", show_default=True, metavar="DATA",
              help="compliance openings ('Sure, here is ...')")
@click.option("--limit", type=int, default=32, show_default=True,
              help="use N harmful and N benign prompts (a sample seeded by --seed, kept in dataset order)")
@click.option("--lengths", default="2,4,6,8,10", show_default=True, help="opening lengths in tokens")
@click.option("--layers", default=None, help="comma-separated layer indices (negative counts from the end); default all")
@click.option("--position", type=click.Choice(["last", "mean"]), default="last", show_default=True,
              help="state compared: the last token's, or the mean over the opening's tokens")
@click.option("--baseline", type=click.Choice(["none", "neutral"]), default="none", show_default=True,
              help="neutral: subtract the distance of a neutral continuation of the same length")
@click.option("--allow-short-openings", is_flag=True,
              help="keep openings shorter than the longest length (used whole there); default: drop them")
@click.option("--system", default=None, help="system prompt for every query")
@click.option("--seed", type=int, default=0, show_default=True, help="pairs openings with prompts; splits the probe data")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
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
    import gc

    import torch

    from ssah.probe.plots import plot_reports
    from ssah.probe.reasoning import ReasoningConfig, run_reasoning_probe

    if limit < 1:
        raise SsahError(f"--limit {limit} must be at least 1")
    config = ReasoningConfig(lengths=tuple(_int_list(lengths, "--lengths") or ()), position=position,
                             baseline=baseline, layers=_int_list(layers, "--layers"), seed=seed,
                             batch_size=batch_size, full_length_only=not allow_short_openings, system=system)
    data = {"harmful": _load_prompts(harmful, limit, "harmful", seed),
            "benign": _load_prompts(benign, limit, "benign", seed),
            "refusals": _load_prompts(refusals, None, "refusals"),
            "compliance": _load_prompts(compliance, None, "compliance")}
    out = Path(out_dir)
    specs = [model_args["spec"]] + ([compare_spec] if compare_spec else [])
    entries, labelled = [], []
    for index, spec in enumerate(specs):
        loaded = load_from_options({**model_args, "spec": spec})
        try:
            from ssah.probe.hidden import validate_layers

            validate_layers(loaded.model, config.layers, what=spec)
            result = run_reasoning_probe(loaded.model, loaded.tokenizer, data["harmful"].prompts(),
                                         data["benign"].prompts(), data["refusals"].prompts(),
                                         data["compliance"].prompts(), config, progress=True)
            name = "directions.safetensors" if index == 0 else "directions_compare.safetensors"
            result.directions.meta = {"model": spec, "model_fingerprint": loaded.fingerprint,
                                      "harmful": _describe(data["harmful"]), "benign": _describe(data["benign"]),
                                      "position": "last", "layer_meaning": "output of transformer block i"}
            result.directions.save(out / name)
            entries.append({"spec": spec, "fingerprint": loaded.fingerprint, "load_seconds": round(loaded.load_seconds, 3),
                            "directions_file": name, **result.report})
            labelled.append((spec, result.report))
            summary = result.report["summary"]
            accuracy = result.report["linear_probe"]["accuracy"]
            click.echo(f"{spec}: {summary['text']}; sits closer to {summary['sits_closer_to']}; "
                       f"probe held-out accuracy {min(accuracy):.2f}..{max(accuracy):.2f}; {result.seconds:.1f}s")
        finally:
            # One model in memory at a time: drop this one before loading the next.
            del loaded
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    report = {"format": "ssah.probe/1", "datasets": {k: _describe(v) for k, v in data.items()}, "models": entries}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "probe.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "probe.json")
    plots = plot_reports(labelled, out)
    click.echo(f"wrote {out / 'probe.json'}, {', '.join(str(p) for p in plots)}")
