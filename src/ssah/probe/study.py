"""The reasoning-direction study of one model, or several on the same plots (what `ssah probe` and
the pipeline's probe stage run).

    data = probe_data("harmful:calibration", "benign:calibration", limit=32, seed=0)
    report = run_probe(["builtin:smollm2-135m-instruct", "runs/x/aligned"], data, ReasoningConfig(), "runs/probe",
                       load=load_model)

Writes probe.json (the report: per model, distances by layer and opening length, the linear probes'
accuracy, a summary, per-prompt differences), directions.safetensors (directions_compare.safetensors for
the second model) and two plots. A folder holding the same study (same models, data and settings) is reused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ssah.artifacts import Artifact
from ssah.errors import SsahError
from ssah.outputs import OutputKind

log = logging.getLogger(__name__)

PROBE_FILE = "probe.json"
PROBE = OutputKind("probe", (PROBE_FILE, "directions*.safetensors", "*.png"), record=PROBE_FILE)


@dataclass
class ProbeData:
    harmful: object
    benign: object
    refusals: object
    compliance: object

    def describe(self) -> dict:
        return {role: _describe(getattr(self, role)) for role in ("harmful", "benign", "refusals", "compliance")}


def _describe(data) -> dict:
    return {"name": data.name, "records": len(data), "fingerprint": data.fingerprint}


def _prompts(spec: str, limit: int | None, what: str, seed: int = 0):
    from ssah.data import load_dataset

    data = load_dataset(spec)
    if limit is not None and len(data) > limit:
        # A seeded sample, not the first N: built-in sets are grouped by kind (benign lists its
        # checkable tasks before free-form requests), and both sides must cover every kind.
        data = data.sample(limit, seed)
    if len(data) == 0:
        raise SsahError(f"{what} dataset {spec!r} gave no prompts (limit {limit}); use a non-empty dataset")
    return data


def probe_data(harmful: str, benign: str, refusals: str = "refusals:openings", compliance: str = "compliance_openings",
               limit: int | None = 32, seed: int = 0) -> ProbeData:
    """`limit` harmful and benign prompts (a seeded sample kept in dataset order), all openings."""
    if limit is not None and limit < 1:
        raise SsahError(f"--limit {limit} must be at least 1")
    return ProbeData(_prompts(harmful, limit, "harmful", seed), _prompts(benign, limit, "benign", seed),
                     _prompts(refusals, None, "refusals"), _prompts(compliance, None, "compliance"))


def _probe_one(loaded, spec: str, data: ProbeData, config, out: Path, index: int) -> dict:
    from ssah.probe.hidden import validate_layers
    from ssah.probe.reasoning import run_reasoning_probe

    validate_layers(loaded.model, config.layers, what=spec)
    result = run_reasoning_probe(loaded.model, loaded.tokenizer, data.harmful.prompts(), data.benign.prompts(),
                                 data.refusals.prompts(), data.compliance.prompts(), config, progress=True)
    name = "directions.safetensors" if index == 0 else "directions_compare.safetensors"
    result.directions.meta = {"model": spec, "model_fingerprint": loaded.fingerprint,
                              "harmful": _describe(data.harmful), "benign": _describe(data.benign),
                              "position": "last", "layer_meaning": "output of transformer block i"}
    result.directions.save(out / name)
    summary, accuracy = result.report["summary"], result.report["linear_probe"]["accuracy"]
    log.info("%s: %s; sits closer to %s; probe held-out accuracy %.2f..%.2f; %.1fs", spec, summary["text"],
             summary["sits_closer_to"], min(accuracy), max(accuracy), result.seconds)
    return {"spec": spec, "fingerprint": loaded.fingerprint, "load_seconds": round(loaded.load_seconds, 3),
            "directions_file": name, **result.report}


def closer_to_refusal_test(first: dict, second: dict, resamples: int = 2000, seed: int = 0) -> dict | None:
    """Paired bootstrap over the harmful prompts of `second` minus `first` (two models' report entries,
    probed on the same prompts) in each prompt's refusal-minus-compliance distance, averaged over
    layers and lengths; a negative `mean_difference` puts `second` closer to refusal. None when either
    entry lacks per-prompt values or their prompt counts differ."""
    from ssah.evaluate.stats import paired_bootstrap

    values = [(entry.get("per_prompt") or {}).get("refusal_minus_compliance") for entry in (first, second)]
    if not values[0] or not values[1] or len(values[0]) != len(values[1]):
        return None
    return paired_bootstrap(values[0], values[1], resamples, seed)


def run_probe(specs: Sequence[str], data: ProbeData, config, out: str | Path, load: Callable,
              replace: bool = False) -> dict:
    """Probe each model of `specs` (loaded one at a time by `load(spec)`) and write the study to `out`;
    returns the report (probe.json)."""
    from ssah.models.loading import free_memory
    from ssah.probe.plots import plot_reports

    out = Path(out)
    identity = {"models": list(specs), "data": {k: v["fingerprint"] for k, v in data.describe().items()},
                "config": {k: v for k, v in asdict(config).items() if k != "neutral_text"}}
    artifact = Artifact(out / PROBE_FILE, "a probe study", identity)
    found = artifact.lookup(replace=replace)
    if found is not None:
        return found
    entries = []
    for index, spec in enumerate(specs):
        loaded = load(spec)
        try:
            entries.append(_probe_one(loaded, spec, data, config, out, index))
        finally:
            # One model in memory at a time: drop this one before loading the next.
            del loaded
            free_memory()
    plots = plot_reports([(entry["spec"], entry) for entry in entries], out)
    report = artifact.save({"format": "ssah.probe/1", "datasets": data.describe(), "models": entries})
    log.info("wrote %s, %s", out / PROBE_FILE, ", ".join(str(p) for p in plots))
    return report
