"""Reasoning-direction probe (paper Sec. 3), harmful-vs-benign directions, and a runtime monitor.

    from ssah.probe import run_reasoning_probe, calibrate_monitor, Monitor, monitored_generate

- `reasoning`: distance of the state after a refusal / compliance opening from the clean prompt's state.
- `directions`: difference-of-means directions and per-layer linear probes (`Directions`, safetensors).
- `monitor`: re-decide at every generated token; stop or steer when the model's own harmfulness
  score stays high (`MonitorConfig`, `calibrate_monitor`, `Monitor`, `monitored_generate`).
- `hidden`: block-output states via forward hooks (the layer convention every part shares).

Names are imported lazily so `ssah probe --help` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Directions": "ssah.probe.directions",
    "LinearProbe": "ssah.probe.directions",
    "compute_directions": "ssah.probe.directions",
    "diff_of_means": "ssah.probe.directions",
    "fit_linear_probe": "ssah.probe.directions",
    "last_token_states": "ssah.probe.hidden",
    "read_states": "ssah.probe.hidden",
    "transformer_blocks": "ssah.probe.hidden",
    "Monitor": "ssah.probe.monitor",
    "MonitorConfig": "ssah.probe.monitor",
    "MonitorState": "ssah.probe.monitor",
    "MonitoredReply": "ssah.probe.monitor",
    "calibrate_monitor": "ssah.probe.monitor",
    "monitor_from_file": "ssah.probe.monitor",
    "monitored_generate": "ssah.probe.monitor",
    "ReasoningConfig": "ssah.probe.reasoning",
    "ReasoningResult": "ssah.probe.reasoning",
    "run_reasoning_probe": "ssah.probe.reasoning",
    "plot_reports": "ssah.probe.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssah.probe' has no attribute {name!r}")
