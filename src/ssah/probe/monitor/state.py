"""`MonitorState`: a calibrated monitor's tensors and threshold, saved as safetensors."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssah.errors import SsahError
from ssah.io import read_tensors_with_metadata, save_tensors_atomic
from ssah.probe.directions import Directions
from ssah.probe.monitor.config import MonitorConfig

STATE_FORMAT = "ssah.monitor-state/1"


@dataclass
class MonitorState:
    """What a calibrated monitor needs: per monitored layer a score (z = h @ weight + bias), a steer
    vector (mean harmful - mean benign, scaled by steer_alpha at run time), and the threshold."""

    config: MonitorConfig  # the config it was calibrated under (layers resolved)
    layers: list[int]
    weight: torch.Tensor  # [k, H]
    bias: torch.Tensor  # [k]
    steer: torch.Tensor  # [k, H]
    threshold: float
    num_layers: int  # depth of the model it was made for
    meta: dict = field(default_factory=dict)
    # token ids that end every chat-formatted request (the generation prompt, see `request_marker`)
    request_marker: list[int] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_directions(cls, directions: Directions, config: MonitorConfig, num_layers: int) -> MonitorState:
        """A state from `ssah probe` directions; the threshold (unless config.threshold is set) is the
        (1 - target_fpr) quantile of the benign prompts' z-scores, which controls the false-positive
        rate of the prompt score alone. `calibrate_monitor` calibrates on generated replies instead."""
        if config.layers:
            layers = [directions.layers[directions.index(layer + num_layers if layer < 0 else layer)]
                      for layer in config.layers]
        else:  # the layer whose held-out Cohen's d is largest
            layers = [directions.layers[int(torch.argmax(directions.separation))]]
        index = [directions.index(layer) for layer in layers]
        if config.scorer == "direction":
            raw_weight, raw_bias = directions.direction[index], torch.zeros(len(index))
            benign_raw = directions.benign_scores[index]
        else:
            raw_weight, raw_bias = directions.probe.weight[index], directions.probe.bias[index]
            benign_raw = directions.benign_logits[index]
        mean, std = benign_raw.mean(1), benign_raw.std(1, unbiased=False).clamp_min(1e-6)
        weight = raw_weight / std[:, None]
        bias = (raw_bias - mean) / std
        steer = directions.mean_harmful[index] - directions.mean_benign[index]
        threshold = config.threshold
        if threshold is None:
            benign_z = (benign_raw - mean[:, None]) / std[:, None]
            threshold = upper_quantile(benign_z.mean(0), config.target_fpr)
        resolved = config.with_(layers=layers)
        meta = {"source": "directions", "directions": directions.meta, "threshold_from": "benign prompt scores"}
        return cls(resolved, layers, weight.float(), bias.float(), steer.float(), float(threshold), num_layers, meta)

    def save(self, path: str | Path) -> Path:
        metadata = {"format": STATE_FORMAT, "config": json.dumps(self.config.to_dict()),
                    "layers": json.dumps(self.layers), "threshold": repr(self.threshold),
                    "num_layers": str(self.num_layers), "meta": json.dumps(self.meta),
                    "request_marker": json.dumps(self.request_marker)}
        return save_tensors_atomic(path, {"weight": self.weight, "bias": self.bias, "steer": self.steer}, metadata)

    @classmethod
    def load(cls, path: str | Path) -> MonitorState:
        tensors, metadata = read_tensors_with_metadata(path, "monitor state",
                                                       "create it with calibrate_monitor(...).save(PATH)")
        if metadata.get("format") != STATE_FORMAT:
            raise SsahError(f"{path} is not a monitor state file (made by calibrate_monitor)")
        fix = "calibrate it again: calibrate_monitor(...).save(PATH)"
        try:
            saved = json.loads(metadata["config"])
            layers, meta = json.loads(metadata["layers"]), json.loads(metadata["meta"])
            marker = json.loads(metadata.get("request_marker", "[]"))
            threshold, depth = float(metadata["threshold"]), int(metadata["num_layers"])
            weight, bias, steer = tensors["weight"], tensors["bias"], tensors["steer"]
        except (KeyError, ValueError, TypeError) as err:
            missing = f"{err.args[0]!r} is missing" if isinstance(err, KeyError) else "a field does not parse"
            raise SsahError(f"{path} is not a monitor state ssah wrote ({missing}); {fix}") from None
        if not isinstance(saved, dict) or not isinstance(meta, dict) or not isinstance(marker, list) \
                or not isinstance(layers, list) or not layers or not all(type(x) is int and 0 <= x < depth
                                                                         for x in layers):
            raise SsahError(f"{path} is not a monitor state ssah wrote (its config, layers or meta have the wrong "
                            f"shape); {fix}")
        # an infinite threshold is a real outcome of calibration (no reply may be flagged, or every one);
        # NaN is never one: a NaN score is flagged by no comparison
        if math.isnan(threshold) or any(bool(torch.isnan(t).any()) for t in (weight, bias, steer)):
            raise SsahError(f"{path} holds a threshold or weights that are NaN; {fix}")
        # States saved before these keys existed were calibrated reading the last token, without contrast.
        saved.setdefault("prompt_position", "last")
        saved.setdefault("contrast_borderline", False)
        config = MonitorConfig.from_dict(saved, str(path))
        return cls(config, layers, weight, bias, steer, threshold, depth, meta, marker)


def monitor_digest(config: MonitorConfig | None, state: MonitorState) -> str:
    """16 hex digits naming what a monitor does to generation: the effective config and threshold
    and the state's tensors (two equal digests generate the same replies)."""
    config = config or state.config
    threshold = config.threshold if config.threshold is not None else state.threshold
    settings = {key: getattr(config, key) for key in ("scorer", "statistic", "include_prompt", "min_tokens",
                                                      "prompt_position", "action", "steer_alpha", "refusal_text")}
    digest = hashlib.sha256(json.dumps({**settings, "threshold": float(threshold), "layers": state.layers,
                                        "request_marker": state.request_marker}, sort_keys=True).encode())
    for tensor in (state.weight, state.bias, state.steer):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def upper_quantile(values: torch.Tensor, share: float) -> float:
    """The smallest value t with at most `share` of `values` strictly above it (-inf values allowed)."""
    ordered = torch.sort(values.double().flatten()).values
    n = ordered.numel()
    index = min(n - 1, max(0, math.ceil((1.0 - share) * n) - 1))
    return float(ordered[index])
