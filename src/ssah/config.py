"""Typed experiment configs, loaded from YAML presets or files; unknown keys are refused.

A config is a tree of dataclasses. `load_config` reads YAML into it and fails with one line that
names the bad key and the keys allowed there. `config_hash` of a section is what a run folder's
stage manifests record, so a changed setting redoes exactly the stages it affects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ssah.errors import SsahError


@dataclass
class DataConfig:
    harmful_calibration: str = "harmful:calibration"
    harmful_train: str = "harmful:train"
    harmful_test: str = "harmful:test"
    benign_calibration: str = "benign:calibration"
    benign_train: str = "benign:train"
    benign_test: str = "benign:test"
    sensitive: str = "sensitive_safe:test"  # over-refusal, held out
    borderline_train: str | None = "sensitive_safe:train"  # answered by the model itself during alignment
    refusals: str = "refusals"
    compliance_openings: str = "compliance_openings"
    finetune: str = "benign:train"  # the benign fine-tuning attack's data


@dataclass
class EvalConfig:
    # suites of every evaluation in the run (see ssah.evaluate); the generation-free refusal score
    # is the one a short run may drop: every verdict reads generated replies
    suites: list[str] = field(default_factory=lambda: ["safety", "refusal_score", "prefill", "overrefusal", "utility"])
    limit: int | None = 64  # items per evaluation set (None: all)
    max_new_tokens: int = 24
    batch_size: int = 16
    rules: list[str] = field(default_factory=lambda: ["prefix", "keywords"])
    system_prompt: str = "none"  # none | default | both
    text_limit: int | None = 24  # paragraphs of the `text` corpus for perplexity (None: all)
    max_openings: int = 8  # refusal/compliance openings each in the refusal score


@dataclass
class ScoreConfig:
    scorer: str = "variance"
    limit: int | None = 128
    batch_size: int = 8
    max_length: int = 256
    token_scope: str = "all"


@dataclass
class GroupConfig:
    sizes: dict[str, float] = field(default_factory=lambda: {"scu": 0.013, "ucu": 0.133, "ru": 0.148})
    normalize: str = "rank"  # see ssah.units.groups: mean is skewed by a few outlier neurons
    ranking: str = "global"


@dataclass
class TrainSection:
    lr: float = 2e-5
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    weight_decay: float = 0.0
    warmup: float = 0.0
    bf16: bool = False
    limit: int | None = None  # examples used (None: all)


@dataclass
class AlignConfig:
    enabled: bool = True  # align first (for a model without safety behaviour)
    budget: str = "RU"
    compare_full: bool = True  # also align all parameters, for the alignment-tax comparison
    study: str = "budget"  # which model stages 3-7 study: budget | full | base
    benign_limit: int | None = None
    borderline_reply_tokens: int = 48  # length of the model's own replies to borderline prompts
    borderline_repeats: int = 1  # how often each borderline pair appears in the alignment data
    # weight of a loss that makes the opening token of every built-in refusal unlikely at the start of
    # the reply to each borderline prompt (ssah.train.sft.avoided_opening_loss); 0: off
    refusal_unlikelihood: float = 0.0
    # deeper alignment: a refusal after the first k tokens of the model's own compliant reply to each
    # harmful training prompt (k cycles over these; empty: none)
    recovery_lengths: list[int] = field(default_factory=list)
    # sizes of the unaligned model's groups that `budget` picks from (null: groups.sizes); lets the
    # studied model's groups take other sizes (e.g. from a pruning sweep) without moving the budget
    group_sizes: dict[str, float] | None = None
    train: TrainSection = field(default_factory=lambda: TrainSection(lr=1e-4))


@dataclass
class PruneConfig:
    masks: list[str] = field(default_factory=lambda: ["SCU", "UCU", "RU", "random:like=SCU",
                                                      "random:like=UCU", "random:like=RU"])


FINETUNE_SETTINGS = ("plain", "freeze_i", "freeze_ii", "lora", "freeze_budget")


@dataclass
class FinetuneConfig:
    # plain | freeze_i | freeze_ii | lora | freeze_budget (beyond the paper: freeze the units the
    # alignment stage trained, for a model aligned inside a budget; needs align.study: budget)
    settings: list[str] = field(default_factory=lambda: ["plain", "freeze_i", "freeze_ii", "lora"])
    freeze_i: str = "SCU+CU:top=0.06"
    freeze_ii: str = "SCU+CU"
    frozen_epochs_multiplier: float = 2.0
    train: TrainSection = field(default_factory=TrainSection)


@dataclass
class ProbeConfig:
    limit: int = 32
    opening_lengths: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10])
    monitor: bool = True  # also evaluate the studied model under the runtime monitor (ssah.probe.monitor)
    # MonitorConfig fields (e.g. layers, target_fpr, calibration_limit, calibration_tokens, action);
    # calibration always uses the calibration splits of `data`
    monitor_settings: dict[str, Any] = field(default_factory=dict)

    def monitor_config(self, data: DataConfig):
        """The MonitorConfig these settings describe (one clear error for an unknown or bad field)."""
        from ssah.probe.monitor import MonitorConfig

        settings = {"harmful_calibration": data.harmful_calibration, "benign_calibration": data.benign_calibration,
                    "borderline_calibration": data.borderline_train, **self.monitor_settings}
        return MonitorConfig.from_dict(settings, "config key probe.monitor_settings")


@dataclass
class RunConfig:
    model: str = "builtin:smollm2-135m-instruct"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scores: ScoreConfig = field(default_factory=ScoreConfig)
    groups: GroupConfig = field(default_factory=GroupConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types with one line."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise SsahError(f"config section {where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SsahError(f"unknown config key {'.'.join(filter(None, [where, unknown[0]]))!r}; "
                        f"allowed here: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        path = ".".join(filter(None, [where, key]))
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, path)
        else:
            kwargs[key] = _check_type(kind, value, path)
    return cls(**kwargs)


def _check_type(kind, value, path: str):
    if kind is Any:
        return value
    origin, args = get_origin(kind), get_args(kind)
    if value is None and type(None) in args:
        return None
    base = origin or kind
    if base is list:
        if not isinstance(value, list):
            raise SsahError(f"config key {path!r} must be a list")
        return [_check_type(args[0], v, path) for v in value] if args else value
    if base is dict:
        if not isinstance(value, dict):
            raise SsahError(f"config key {path!r} must be a mapping")
        return {str(k): _check_type(args[1], v, f"{path}.{k}") if args else v for k, v in value.items()}
    if args and origin is not None and type(None) in args:  # Optional[X]
        return _check_type(next(a for a in args if a is not type(None)), value, path)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(kind, type) and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SsahError(f"config key {path!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


PRESETS = ("demo", "paper-llama2", "paper-llama3", "paper-mistral")


def preset_text(name: str) -> str:
    """The YAML text of a built-in preset."""
    if name not in PRESETS:
        raise SsahError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return resources.files("ssah").joinpath("presets", f"{name}.yaml").read_text(encoding="utf-8")


def load_config(preset: str | None = None, path: str | Path | None = None) -> RunConfig:
    """A RunConfig from a preset name or a YAML file (exactly one)."""
    if (preset is None) == (path is None):
        raise SsahError("give exactly one of --preset NAME or --config FILE.yaml")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SsahError(f"config file {path} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        text, where = preset_text(preset), f"preset {preset}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SsahError(f"{where} is not valid YAML: {str(err).splitlines()[0]}") from err
    config = _build(RunConfig, data or {}, "")
    # settings that would fail in a late stage fail here, not after hours of earlier ones
    config.probe.monitor_config(config.data)
    for setting in config.finetune.settings:
        if setting not in FINETUNE_SETTINGS:
            raise SsahError(f"{where}: unknown finetune setting {setting!r}; use {', '.join(FINETUNE_SETTINGS)}")
    from ssah.units.groups import NORMALIZATIONS, RANKINGS

    for key, value, known in (("normalize", config.groups.normalize, NORMALIZATIONS),
                              ("ranking", config.groups.ranking, RANKINGS)):
        if value not in known:
            raise SsahError(f"{where}: unknown groups.{key} {value!r}; use {', '.join(known)}")
    if config.align.refusal_unlikelihood < 0:
        raise SsahError(f"{where}: align.refusal_unlikelihood is a loss weight and must be >= 0 (0: off), "
                        f"got {config.align.refusal_unlikelihood}")
    if "freeze_budget" in config.finetune.settings and not (config.align.enabled and config.align.study == "budget"):
        raise SsahError(f"{where}: finetune setting freeze_budget freezes the alignment budget, so it needs "
                        "align.enabled: true and align.study: budget")
    return config


def config_hash(section: Any) -> str:
    """A short stable hash of a config section (dataclass or plain data)."""
    data = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
