"""A runtime safety monitor: re-decide refuse-or-fulfil at every generated token.

The paper's "looking ahead": alignment today commits to a direction in the first few tokens; this
monitor keeps reading the model's own harmfulness representation while it writes, and intervenes
when a reply to a request the model itself represents as harmful keeps going.

Score. At each monitored layer l, the state h of the newest position (block output, as in
`ssah.probe.hidden`) gets the standardised score z_l = (s_l(h) - m_l) / sd_l, where s_l is the
projection on the unit difference-of-means direction (scorer "direction") or the logit of the linear
probe (scorer "probe"), and m_l, sd_l are the mean and standard deviation of s_l over the benign
side of the calibration prompts. With several layers the score is the mean of their z_l. Directions come from
`harmful:calibration` vs `benign:calibration` prompts only (plus the borderline calibration prompts
on the benign side, with `contrast_borderline`); `calibrate_monitor` refuses test splits.

Decision rule. The prefill forward gives the prompt's score p; each later forward gives the score
s_t of generated token t. By default (prompt_position "request") p is read where the request ends and
the assistant turn begins (found by the chat template's generation-prompt tokens, `request_marker`),
not at the last input token: text already written into the reply, as in a prefill attack, comes
after that position, and in a causal model it cannot move what the request's own state says. On the
aligned demo model (layers 26-28) 87-90% of harmful calibration prompts score above a 5%-false-positive
threshold at the request's end, but 0-4% at the last token once a compliance opening is prefilled
(`experiments/monitor_positions.py`).
The running statistic after t generated tokens is the max (default) or the mean of
[p, s_1, ..., s_t] (p left out with include_prompt=False): with the max, a request marked harmful
stays marked however compliant the reply's words look, and a reply that drifts into harm later is
still caught. A row is flagged at the first t >= min_tokens where the statistic exceeds the
threshold. Rows that have ended (EOS or padding) stop updating. The threshold is the
(1 - target_fpr) quantile, over the benign calibration prompts, of the highest statistic each reached
while generating `calibration_tokens` greedy tokens under the monitor: so at most target_fpr of
benign calibration replies are flagged.
With `borderline_calibration` (safe prompts that sound unsafe, e.g. `sensitive_safe:train`), the
same quantile is taken over their replies too, and the higher of the two thresholds is kept, so at
most target_fpr of each set is flagged: a direction fit on harmful vs plainly benign prompts also
lights up on scary words (on the aligned demo model, the earlier default -- running mean, last-token
reading, no borderline prompts -- flagged 85% of sensitive_safe:test). With `contrast_borderline`
(default) half of the borderline sample also joins
the benign side of the direction itself, so it points at harm rather than at alarming vocabulary;
the other half sets the threshold (a threshold set on prompts the direction was fit to is optimistic).
With `threshold_calibration` (e.g. `sensitive_safe:calibration`), that set's replies bound the
threshold instead and the whole borderline sample shapes the direction: an aligned model was trained
on sensitive_safe:train, and a threshold set on prompts it was trained to answer is optimistic too.
(`MonitorState.from_directions` offers a cheaper threshold from prompt scores alone.)

Actions. `stop`: a LogitsProcessor forces EOS for flagged rows and a StoppingCriteria ends them;
the reply is replaced by `refusal_text` (`Monitor.apply_refusals`, done by `monitored_generate`).
`steer`: from the flag on, alpha * (mean harmful - mean benign) is added to the newest position's
state at every monitored layer (at the flagging step itself for the deepest one). `observe`: flags only.

Cost. Per step and layer: one [B, H] x [H] product and a few [B]-sized ops, all on the device; no
host synchronisation until the flags are read after `generate`.

Modules: `config` (MonitorConfig, no torch), `state` (MonitorState), `runtime` (Monitor, an
`ssah.interventions.base.Intervention`, and monitored_generate), `calibration` (calibrate_monitor).

    with Monitor(model, config, state) as mon:
        out = mon.generate(**inputs, max_new_tokens=64)     # model.generate with the monitor's processors
    mon.flags                                               # one bool per batch row

`model.generate` is never replaced: a call joins the monitor through `mon.generate` or `mon.watch(kwargs)`
(the keyword arguments with its LogitsProcessor and StoppingCriteria added), and ssah's evaluation passes
every generate call of an intervention that `watches_generation` through `watch`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MonitorConfig": "config", "DEFAULT_REFUSAL": "config", "CALIBRATION_FIELDS": "config",
    "MonitorState": "state", "monitor_digest": "state", "upper_quantile": "state",
    "Monitor": "runtime", "MonitorResult": "runtime", "MonitoredReply": "runtime", "monitored_generate": "runtime",
    "calibrate_monitor": "calibration", "calibrate_named": "calibration", "monitor_from_file": "calibration",
    "request_marker": "ssah.probe.hidden", "request_ends": "ssah.probe.hidden",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy: `ssah.probe.monitor.config` must stay importable without torch
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
