"""`MonitorConfig`: how the runtime monitor scores, decides and acts (cheap to import: no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, model_validator

from ssah.defaults import MonitorAction, MonitorScorer, MonitorStatistic, PromptPosition
from ssah.errors import SsahError
from ssah.io import atomic_write
from ssah.settings import Seed, Settings, read_mapping_file

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."
# Config fields the threshold depends on: a state calibrated under other values must be recalibrated.
CALIBRATION_FIELDS = ("scorer", "statistic", "include_prompt", "min_tokens", "prompt_position", "contrast_borderline",
                      "threshold_calibration")


class MonitorConfig(Settings):
    """How the monitor scores, decides and acts (see `ssah.probe.monitor` for the rule).

    Saved and loaded as YAML or JSON; unknown keys are rejected.
    """

    layers: list[int] | None = None  # None: calibration picks the layer with the best held-out separation
    scorer: MonitorScorer = "direction"
    statistic: MonitorStatistic = "max"  # running max | mean of the scores so far
    include_prompt: bool = True  # the prompt's score enters the running statistic
    prompt_position: PromptPosition = "request"  # request: where the assistant turn begins | last: last input token
    target_fpr: float = Field(0.05, gt=0, lt=1)  # share of each safe calibration set allowed to be flagged
    threshold: float | None = None  # explicit threshold on the z-score scale; overrides target_fpr
    min_tokens: int = Field(4, ge=0)  # generated tokens seen before the monitor may act
    action: MonitorAction = "stop"
    steer_alpha: float = 1.0  # steer adds alpha * (mean harmful - mean benign) at each monitored layer
    refusal_text: str = DEFAULT_REFUSAL
    harmful_calibration: str = "harmful:calibration"
    benign_calibration: str = "benign:calibration"
    # safe prompts that sound unsafe (e.g. sensitive_safe:train): their replies also set the threshold,
    # so the monitor learns that a scary word alone is no reason to stop
    borderline_calibration: str | None = None
    contrast_borderline: bool = True  # borderline prompts also join the benign side of the direction
    # safe-but-alarming prompts that no training step saw (e.g. sensitive_safe:calibration): when set,
    # their replies set the threshold (beside the benign ones) and every borderline_calibration prompt
    # shapes the direction instead; a model aligned on borderline_calibration answers those prompts
    # more calmly than unseen ones, so a threshold set there is optimistic
    threshold_calibration: str | None = None
    calibration_limit: int | None = Field(64, ge=2)  # prompts per calibration set, a seeded sample (None: all)
    calibration_tokens: int = Field(32, ge=1)  # new tokens per calibration reply
    batch_size: int = Field(8, ge=1)
    seed: Seed = 0
    system: str | None = None

    @model_validator(mode="after")
    def _prompt_or_tokens(self) -> MonitorConfig:
        if not self.include_prompt and self.min_tokens == 0:
            raise ValueError("monitor min_tokens 0 needs include_prompt: true (nothing is scored before the "
                             "first token)")
        return self

    def with_(self, **changes) -> MonitorConfig:
        """A validated copy with `changes`."""
        return MonitorConfig(**{**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        """Write YAML (.yaml/.yml) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, text.encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MonitorConfig:
        if not Path(path).exists():
            raise SsahError(f"monitor config {path} does not exist; write one with MonitorConfig().save(PATH)")
        return cls.from_dict(read_mapping_file(path, "monitor config"), f"monitor config {path}")
