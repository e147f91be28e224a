"""Stage 6, probe: the reasoning direction of the unaligned and the studied model (paper Sec. 3),
and the studied model under the runtime monitor (safety, prefill attack, over-refusal)."""

from __future__ import annotations

import logging

from ssah.config import RunConfig
from ssah.pipeline.context import release
from ssah.pipeline.registry import Stage, register
from ssah.pipeline.summaries import headline

log = logging.getLogger("ssah.pipeline")


def reads(config: RunConfig) -> dict:
    d = config.data
    return {"probe": config.probe.model_dump(), "data": [d.harmful_calibration, d.benign_calibration,
                                                         d.borderline_train, d.opening_refusals,
                                                         d.compliance_openings]}


def run(ctx) -> dict:
    from ssah.probe.reasoning import ReasoningConfig
    from ssah.probe.study import closer_to_refusal_test, probe_data, run_probe

    c = ctx.config
    data = probe_data(c.data.harmful_calibration, c.data.benign_calibration, c.data.opening_refusals,
                      c.data.compliance_openings, limit=c.probe.limit, seed=c.seed)
    config = ReasoningConfig(lengths=tuple(c.probe.opening_lengths), seed=c.seed)
    studied = ctx.studied_model_spec()
    specs = [c.model] + ([studied] if studied != c.model else [])
    report = run_probe(specs, data, config, ctx.layout.probe_study, load=ctx.load, replace=True)
    models = []
    for entry in report["models"]:
        diffs = [cell["difference"]["mean"] for cell in entry["cells"]]
        models.append({"spec": ctx.relative(entry["spec"]), "sits_closer_to": entry["summary"]["sits_closer_to"],
                       "share_cells_closer_to_refusal": entry["summary"]["closer_to_refusal_share"],
                       "mean_refusal_minus_compliance": sum(diffs) / len(diffs)})
    summary: dict = {"models": models}
    if len(models) == 2:
        # Negative refusal-minus-compliance distance = closer to refusal; compare the two models.
        summary["aligned_closer_to_refusal"] = (models[1]["mean_refusal_minus_compliance"]
                                                < models[0]["mean_refusal_minus_compliance"])
        summary["mean_difference_unaligned"] = models[0]["mean_refusal_minus_compliance"]
        summary["mean_difference_aligned"] = models[1]["mean_refusal_minus_compliance"]
        # the same comparison, prompt by prompt (aligned - unaligned; negative = aligned closer to refusal)
        test = closer_to_refusal_test(*report["models"], resamples=config.bootstrap, seed=c.seed)
        if test is not None:
            summary["aligned_closer_to_refusal_test"] = test
    if c.probe.monitor:
        summary["monitor"] = _monitor_evaluation(ctx, studied)
    return summary


def monitor_state(ctx, loaded, path=None, **changes):
    """The run's monitor (`probe.monitor_settings`, with `changes`) calibrated on `loaded` (calibration
    splits only) into `path` (default: the studied model's state), reused when it was calibrated on the
    same model with the same settings."""
    from ssah.evaluate.generation import weights_cast
    from ssah.probe.monitor.calibration import calibrate_named
    from ssah.probe.monitor.state import MonitorState

    config = ctx.config.probe.monitor_config(ctx.config.data)
    config = config.with_(**changes) if changes else config
    # calibrated on replies generated as the evaluation generates them (eval.generation_dtype)
    dtype = ctx.config.eval.generation_dtype
    requested = {**config.to_dict(), **({"generation_dtype": dtype} if dtype != "model" else {})}
    path = path or ctx.layout.monitor_state
    state = MonitorState.load(path) if path.is_file() else None
    if state is None or state.meta.get("model_fingerprint") != loaded.fingerprint \
            or state.meta.get("requested") != requested:
        log.info("  calibrating the runtime monitor")
        with weights_cast(loaded.model, dtype):
            state = calibrate_named(loaded.model, loaded.tokenizer, config)
        state.meta["requested"] = requested
        state.save(path)
    return state


def _monitor_evaluation(ctx, studied: str) -> dict:
    """Evaluate safety, the prefill attack and over-refusal under the monitor, beside the same model
    without it."""
    from ssah.evaluate.runner import read_report
    from ssah.probe.monitor.runtime import Monitor

    loaded = ctx.load(studied)
    state = monitor_state(ctx, loaded)
    report = ctx.evaluate(loaded, ctx.layout.monitor_eval, "studied model under the monitor",
                          interventions=[Monitor(loaded.model, None, state, loaded.tokenizer)],
                          suites=ctx.suites_for("monitor", ("safety", "prefill", "overrefusal")))
    without = read_report(ctx.layout.studied_eval) or {}
    del loaded
    release()
    return {"with": headline(report), "without": headline(without, ctx.config.eval.verdict_rule),
            "replaced": report["monitor"]["replaced"],
            "layers": state.layers, "threshold": state.threshold, "calibration": state.meta.get("calibration")}


STAGE = register(Stage("probe", run, reads=reads, needs=("align", "baseline")))
