"""Calibrating the monitor on calibration splits only: its direction, layer and threshold."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from ssah.errors import SsahError
from ssah.probe.directions import compute_directions
from ssah.probe.hidden import last_token_states, request_marker, validate_layers
from ssah.probe.monitor.config import MonitorConfig
from ssah.probe.monitor.runtime import monitored_generate
from ssah.probe.monitor.state import MonitorState, upper_quantile


def _prompts_of(data, limit: int | None, seed: int, what: str) -> tuple[list[str], dict]:
    """Prompts and provenance of a Dataset or a plain list; test splits are refused.

    Above `limit`, a seeded sample (kept in dataset order) is used rather than the first records:
    built-in sets are grouped by kind (e.g. benign lists its checkable tasks before free-form
    requests), and a calibration set must cover all of them.
    """
    name = getattr(data, "name", None)
    if name is not None and ":test" in name:
        raise SsahError(f"monitor calibration got the test split {name!r}; calibrate on calibration splits "
                        "(harmful:calibration, benign:calibration) so evaluation stays unseen")
    prompts = data.prompts() if hasattr(data, "prompts") else [str(p) for p in data]
    if limit is not None and len(prompts) > limit:
        keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [prompts[i] for i in keep]
    if len(prompts) < 2:
        raise SsahError(f"monitor calibration needs at least 2 {what} prompts, got {len(prompts)}")
    info = {"name": name or f"{what} prompts (list)", "n": len(prompts), "sample_seed": seed}
    if hasattr(data, "fingerprint"):
        info["fingerprint"] = data.fingerprint
    return prompts, info


def _calibration_sets(config: MonitorConfig, harmful_calib, benign_calib, borderline_calib, threshold_calib):
    """(harmful, benign, borderline, contrast prompts, provenance): `borderline` prompts bound the
    threshold beside the benign ones, `contrast` prompts join the benign side of the direction."""
    limit, seed = config.calibration_limit, config.seed
    harmful, harmful_info = _prompts_of(harmful_calib, limit, seed, "harmful")
    benign, benign_info = _prompts_of(benign_calib, limit, seed, "benign")
    meta = {"harmful": harmful_info, "benign": benign_info}
    borderline: list[str] = []
    contrast: list[str] = []
    if borderline_calib is not None:
        borderline, meta["borderline"] = _prompts_of(borderline_calib, limit, seed, "borderline")
        if threshold_calib is not None:
            contrast = borderline if config.contrast_borderline else []
            meta["borderline"]["contrast"] = len(contrast)
        elif config.contrast_borderline:
            if len(borderline) < 4:
                raise SsahError("contrast_borderline needs at least 4 borderline calibration prompts (half join the "
                                "direction, half set the threshold)")
            # Disjoint halves: a threshold set on prompts the direction was fit to would be optimistic.
            contrast, borderline = borderline[0::2], borderline[1::2]
            meta["borderline"]["contrast"] = len(contrast)
    if threshold_calib is not None:
        borderline, meta["threshold_set"] = _prompts_of(threshold_calib, limit, seed, "threshold")
    return harmful, benign, borderline, contrast, meta


def calibrate_monitor(model, tokenizer, harmful_calib, benign_calib, config: MonitorConfig | None = None,
                      progress: bool = False, borderline_calib=None, threshold_calib=None) -> MonitorState:
    """Fit the monitor on calibration data: directions and probe from last-token states of all layers,
    the layer (config.layers, else best held-out separation), then the threshold from benign
    calibration replies (see `ssah.probe.monitor`). With `threshold_calib`, the borderline prompts
    all shape the direction and the threshold set's replies bound the flag rate instead of half of
    them. The state's `meta["calibration"]` records the flag rates reached on benign, borderline (or
    threshold-set) and harmful calibration replies."""
    from ssah.models.fingerprint import model_fingerprint

    config = config or MonitorConfig()
    harmful, benign, borderline, contrast, meta = _calibration_sets(config, harmful_calib, benign_calib,
                                                                    borderline_calib, threshold_calib)
    layers = validate_layers(model, None)
    if config.layers:
        config = config.with_(layers=validate_layers(model, config.layers))
    meta = {"model_fingerprint": model_fingerprint(model), **meta}
    harmful_states = last_token_states(model, tokenizer, harmful, layers, config.batch_size, config.system)
    negatives = last_token_states(model, tokenizer, benign + contrast, layers, config.batch_size, config.system)
    directions = compute_directions(harmful_states, negatives, layers, seed=config.seed, meta=meta)
    state = MonitorState.from_directions(directions, config.with_(threshold=0.0), len(layers))
    state.request_marker = request_marker(tokenizer)
    peaks = _calibration_peaks(model, tokenizer, state, config, {"benign": benign, "borderline": borderline,
                                                                  "harmful": harmful})
    # The quantile is taken in each safe set separately and the higher one kept: pooled, the many easy
    # benign replies would let the threshold flag far more than target_fpr of the borderline ones.
    candidates = [upper_quantile(peaks[name], config.target_fpr) for name in ("benign", "borderline") if name in peaks]
    threshold = config.threshold if config.threshold is not None else max(candidates)
    state.threshold = float(threshold)
    state.config = state.config.with_(threshold=config.threshold)
    layer_index = [directions.index(layer) for layer in state.layers]
    rates = {f"{name}_flag_rate": float((values > threshold).float().mean()) for name, values in peaks.items()}
    state.meta = {
        **meta, "source": "calibrate_monitor",
        "threshold_from": ("benign and threshold-set calibration replies" if threshold_calib is not None
                           else "benign and borderline calibration replies" if borderline
                           else "benign calibration replies"),
        "calibration": {
            "benign_flag_rate": rates["benign_flag_rate"],
            "borderline_flag_rate": rates.get("borderline_flag_rate"),
            "harmful_flag_rate": rates["harmful_flag_rate"],
            "tokens": config.calibration_tokens,
            "heldout_cohens_d": [float(directions.separation[i]) for i in layer_index],
            "probe_accuracy": [float(directions.probe.accuracy[i]) for i in layer_index],
        },
    }
    return state


def _calibration_peaks(model, tokenizer, state: MonitorState, config: MonitorConfig,
                       sets: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Per non-empty prompt set, the highest running statistic each greedy reply reached, observed
    (never acted on) under the uncalibrated state; in the order given (benign, borderline, harmful)."""
    # the largest finite threshold (settings refuse infinity): no score reaches it
    observe = state.config.with_(action="observe", threshold=sys.float_info.max)
    run = dict(system=config.system, max_new_tokens=config.calibration_tokens, batch_size=config.batch_size)
    return {name: torch.tensor([r.peak for r in monitored_generate(model, tokenizer, prompts, observe, state, **run)])
            for name, prompts in sets.items() if prompts}


def monitor_from_file(model, tokenizer, path: str | Path,
                      check_model: bool = True) -> tuple[MonitorConfig, MonitorState]:
    """(config, state) from a state file (.safetensors) or a config (.yaml/.yml/.json, calibrated now
    on the calibration sets it names). With `check_model`, a state made for other weights is refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = MonitorState.load(path)
        made_for = state.meta.get("model_fingerprint")
        if check_model and made_for:
            from ssah.models.fingerprint import model_fingerprint

            if made_for != model_fingerprint(model):
                raise SsahError(f"monitor state {path} was calibrated on model {made_for}, not this one; "
                                "recalibrate on this model")
        return state.config, state
    config = MonitorConfig.load(path)
    return config, calibrate_named(model, tokenizer, config)


def calibrate_named(model, tokenizer, config: MonitorConfig) -> MonitorState:
    """`calibrate_monitor` on the calibration sets `config` names (dataset specs)."""
    from ssah.data import load_dataset

    def named(spec):
        return load_dataset(spec) if spec else None

    return calibrate_monitor(model, tokenizer, load_dataset(config.harmful_calibration),
                             load_dataset(config.benign_calibration), config,
                             borderline_calib=named(config.borderline_calibration),
                             threshold_calib=named(config.threshold_calibration))
