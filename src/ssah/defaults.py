"""Defaults and allowed choices, defined once; importing this module is cheap (no torch).

The library, the typed configs and the CLI options all read these, so a default or a choice
never has to be retyped. Each `Literal` type names the choices; the matching tuple lists them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, get_args

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
MODEL_HELP = ("model: builtin:smollm2-135m-instruct (default), a Hugging Face folder, a .gguf file, "
              "tiny:FAMILY (random test model), or a hub id (online only)")

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
GenerationDtype = Literal["model", "fp32", "bf16", "fp16"]
GENERATION_DTYPES: tuple[str, ...] = get_args(GenerationDtype)
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu|npu)(:\d+)?")


def check_device(device: str) -> str:
    """`device` when torch could name it (auto, cpu, cuda, cuda:N, mps, ...); else one clear error."""
    from ssah.errors import SsahError

    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise SsahError(f"unknown device {quoted(device)}; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_device_present(device: str) -> str:
    """`device` when this machine has it (imports torch); else one line naming what it has."""
    from ssah.errors import SsahError

    check_device(device)
    if device in ("auto", "cpu"):
        return device
    import torch

    kind, _, index = device.partition(":")
    backend = {"cuda": getattr(torch, "cuda", None), "xpu": getattr(torch, "xpu", None),
               "npu": getattr(torch, "npu", None)}.get(kind)
    if kind == "mps":
        present, count = torch.backends.mps.is_available(), 1
    else:
        try:
            present = backend is not None and backend.is_available()
            count = backend.device_count() if present else 0
        except Exception:  # a backend torch was built without raises on use
            present, count = False, 0
    if not present:
        raise SsahError(f"device {device!r} requested but this machine has no {kind} device; use --device cpu "
                        "(or auto)")
    if index and int(index) >= count:
        raise SsahError(f"device {device!r} requested but this machine has {count} {kind} device"
                        f"{'s' if count != 1 else ''} ({kind}:0 to {kind}:{count - 1})")
    return device


# seeds: numpy (through accelerate's set_seed) takes 0 .. 2**32-1, torch a 64-bit integer
SEED_MAX = 2**32 - 1
SEED_HELP = f"an integer from 0 to {SEED_MAX}"


def check_seed(seed: int, what: str = "seed") -> int:
    """`seed` when every random generator ssah seeds accepts it; else one line."""
    from ssah.errors import SsahError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SsahError(f"{what} must be {SEED_HELP}, got {quoted(seed)}")
    return seed


QUOTE_LIMIT = 200  # characters of a user's value quoted in an error line


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)`, cut to about `limit` characters: an error line stays one short line whatever the input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}...{text[-20:]} ({len(text):,} characters)"

# unit groups (ssah.units.groups); the paper's Llama-2-7B-Chat sizes
GROUP_NAMES: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")  # label codes 0..3, in this order
SIZE_KEYS: tuple[str, ...] = ("scu", "ucu", "ru")
DEFAULT_SIZES: dict[str, float] = {"scu": 0.013, "ucu": 0.133, "ru": 0.148}
DEFAULT_SIZES_TEXT = "scu=0.013,ucu=0.133,ru=0.148"
Normalization = Literal["rank", "mean", "zscore-per-layer"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
Ranking = Literal["global", "per-layer"]
RANKINGS: tuple[str, ...] = get_args(Ranking)
DEFAULT_NORMALIZATION = "rank"
DEFAULT_RANKING = "global"
AttnUnit = Literal["channel", "head"]
ATTN_UNITS: tuple[str, ...] = get_args(AttnUnit)

# unit scores (ssah.units.scores); scorers are a registry, so their names are checked there
DEFAULT_SCORER = "variance"
TokenScope = Literal["all", "prompt", "response"]
TOKEN_SCOPES: tuple[str, ...] = get_args(TokenScope)
ResponseSource = Literal["dataset", "refusals", "self", "own-refusals"]
RESPONSE_SOURCES: tuple[str, ...] = get_args(ResponseSource)

# evaluation (ssah.evaluate)
Suite = Literal["safety", "refusal_score", "prefill", "overrefusal", "utility"]
SUITES: tuple[str, ...] = get_args(Suite)
DEFAULT_SUITES: tuple[str, ...] = SUITES
# the kinds of evaluation a run makes, each of which may run fewer suites than the run's (eval.stage_suites)
EvalKind = Literal["baseline", "align", "align_controls", "prune", "prune_controls", "finetune", "finetune_controls",
                   "monitor", "attacks"]
Rule = Literal["prefix", "keywords"]
RULES: tuple[str, ...] = get_args(Rule)
VerdictRule = Literal["prefix", "keywords", "judge"]  # a text rule, or a judge model's verdicts
SystemPromptMode = Literal["none", "default", "both"]
Engine = Literal["hf", "vllm"]  # generation engines of an evaluation (`ssah.evaluate.engines`)
ENGINES: tuple[str, ...] = get_args(Engine)
SYSTEM_PROMPT_MODES: tuple[str, ...] = get_args(SystemPromptMode)

# the fine-tuning attack's settings (ssah.pipeline.stages.finetune)
FinetuneSetting = Literal["plain", "freeze_i", "freeze_ii", "lora", "freeze_budget", "freeze_ii_strict",
                          "freeze_random"]
FINETUNE_SETTINGS: tuple[str, ...] = get_args(FinetuneSetting)


def random_draws(name: str, seeds: list[int]) -> list[str]:
    """The row names of a random control's seeded draws: freeze_random -> freeze_random_s0, ..."""
    return [f"{name}_s{seed}" for seed in seeds]
FINETUNE_LR = 2e-5  # Qi et al. (2023)
ALIGN_LR = 1e-4

# the runtime monitor (ssah.probe.monitor)
MonitorAction = Literal["stop", "steer", "observe"]
MonitorScorer = Literal["direction", "probe"]
MonitorStatistic = Literal["mean", "max"]
PromptPosition = Literal["request", "last"]

PRESETS: tuple[str, ...] = ("demo", "maker-aligned", "attack-grid", "attack-grid-quick", "paper-llama2", "paper-llama3",
                            "paper-mistral")


def cache_dir() -> Path:
    """The ssah cache folder: $SSAH_CACHE, else ~/.cache/ssah (converted models, output-folder locks)."""
    return Path(os.environ.get("SSAH_CACHE") or Path.home() / ".cache" / "ssah")
