"""The runtime monitor as a defense against fine-tuning attacks: the seed's next step, the harmful
direction re-evaluated at every generated token, put under attack.

At no defense's worst point of each family (full fine-tuning; picked on calibration prompts, as every
worst point), the attacked model (the grid's, or trained again from the same seed) is evaluated on the
test sets under three monitors:

- `monitor`: the studied model's calibrated state as it is (a provider that calibrated once and
  serves whatever the user fine-tuned);
- `monitor_recalibrated`: calibrated again on the attacked model from the same calibration data (a
  provider that recalibrates after each fine-tuning job);
- `monitor_tokens`: the studied model's direction with the prompt's score left out
  (`include_prompt: false`, its own threshold): it can act only on what the reply's tokens say, so beside
  `monitor` it tells an input filter from a re-evaluation during generation.

Each is an arm of the matrix (threat model: fine-tuning as a service) judged by the grid's rule against
no defense at that point; its worst point is no defense's, since the monitor changes no training. Each
also reports its flag rate on safe calibration prompts (benign calibration tasks) on the attacked model
beside the studied model's: how far the attack moved the monitor's false alarms.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

from ssah.artifacts import Artifact, fingerprint
from ssah.pipeline.context import release
from ssah.pipeline.summaries import headline

log = logging.getLogger("ssah.attacks")
MONITOR_ARMS = ("monitor", "monitor_recalibrated", "monitor_tokens")
RECORD = "monitor.json"


def _flag_rate(ctx, loaded, monitor, out: Path, label: str) -> float | None:
    """The share of benign calibration tasks whose replies the monitor replaced."""
    c = ctx.config
    report = ctx.evaluate(loaded, out, label, interventions=[monitor], suites=["utility"],
                          limit=c.attacks.calibration_limit, sets={"benign": c.data.benign_calibration})
    return (((report.get("monitor") or {}).get("replaced") or {}).get("utility") or {}).get("share")


def _monitor(loaded, state):
    from ssah.probe.monitor.runtime import Monitor

    return Monitor(loaded.model, None, state, loaded.tokenizer)


def studied_states(ctx, stage: Path) -> dict:
    """The studied model's monitor states (`monitor`, `monitor_tokens`) and their flag rates on safe
    calibration prompts."""
    from ssah.pipeline.stages.probe import monitor_state

    loaded = ctx.load(ctx.studied_model_spec())
    states = {"monitor": monitor_state(ctx, loaded, stage / "monitor" / "studied.json"),
              "monitor_tokens": monitor_state(ctx, loaded, stage / "monitor" / "studied-tokens.json",
                                              include_prompt=False)}
    rates = {arm: _flag_rate(ctx, loaded, _monitor(loaded, state), stage / "monitor" / f"flags-{arm}",
                             f"studied model's flags on safe calibration prompts ({arm})")
             for arm, state in states.items()}
    del loaded
    release()
    return {"states": states, "flag_rates": rates}


def monitored_cells(ctx, stage: Path, cell, defenses, evaluation: dict, studied: dict, attacked=None,
                    settle=None) -> dict:
    """{arm: record} for the attacked model of `cell` (no defense, full fine-tuning) under each monitor,
    reused when finished with the same inputs; `attacked`: that model as the grid trained it (`Attacked`),
    else it is trained again from the same seed. `settle(arm)`, called after an arm's ASR replies: a
    reason to stop there (`stopped_early`, as `ssah.attacks.grid.run_cell`) or None."""
    from ssah.attacks.apply import attack_model
    from ssah.attacks.matrix import evaluate_settled
    from ssah.pipeline.stages.probe import monitor_state

    c = ctx.config
    point = stage / "cells" / cell.attack.name / cell.point
    base = {"cell": fingerprint([cell.attack.pairs, cell.attack.system, cell.attack.trigger]), "seed": c.seed,
            "config": cell.settings(c.attacks.train).to_dict(), "model": ctx.studied_model_spec(),
            "eval": ctx.eval_settings(**{k: v for k, v in evaluation.items() if k != "sets"}).identity(),
            "eval_data": {role: data.fingerprint for role, data in evaluation.get("sets", {}).items()},
            "monitor": c.probe.monitor_settings}
    artifacts = {arm: Artifact(point / arm / RECORD, f"a monitored attack cell ({arm})", {**base, "arm": arm})
                 for arm in MONITOR_ARMS}
    found = {arm: artifact.lookup(replace=True) for arm, artifact in artifacts.items()}
    found = {arm: record if record is not None and (settle is not None or not record.get("stopped_early")) else None
             for arm, record in found.items()}  # a stopped record does not serve a run that wants every suite
    if all(record is not None for record in found.values()):
        return found
    log.info("  attack %s, lr %g, %d steps, under the runtime monitors", cell.attack.name, cell.lr, cell.steps)
    if attacked is None:
        loaded = ctx.load(ctx.studied_model_spec())
        attacked = attack_model(loaded, cell.attack, "none", cell.settings(c.attacks.train), defenses, seed=c.seed)
        del loaded
    attacked = attacked.model
    states = {**studied["states"],
              "monitor_recalibrated": monitor_state(ctx, attacked, point / "monitor_recalibrated" / "state.json")}
    for arm in MONITOR_ARMS:
        if found[arm] is not None:
            continue
        started = time.perf_counter()
        report, stopped = evaluate_settled(ctx, attacked, point / arm / "eval", f"{cell.attack.name} under {arm}",
                                           evaluation, settle and partial(settle, arm),
                                           interventions=[_monitor(attacked, states[arm])])
        rate = _flag_rate(ctx, attacked, _monitor(attacked, states[arm]), point / arm / "flags",
                          f"{cell.attack.name}: {arm}'s flags on safe calibration prompts")
        before = studied["flag_rates"].get(arm if arm != "monitor_recalibrated" else "monitor")
        found[arm] = artifacts[arm].save({
            "defense": arm, "eval": headline(report), "replaced": (report.get("monitor") or {}).get("replaced"),
            "threshold": states[arm].threshold, "flag_rate_safe_calibration": rate,
            "flag_rate_safe_calibration_before": before,
            "flag_rate_drift": None if rate is None or before is None else rate - before,
            **({"stopped_early": stopped} if stopped else {}), "seconds": round(time.perf_counter() - started, 1)})
    del attacked
    release()
    return found
