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
reading, no borderline prompts -- flagged 85% of sensitive_safe:test). With `contrast_borderline` (default) half of the borderline sample also joins
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

    with Monitor(model, config, state) as mon:
        out = model.generate(**inputs, max_new_tokens=64)   # the monitor joins this call
    mon.flags                                               # one bool per batch row
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ssah.errors import SsahError
from ssah.io import read_tensors_with_metadata, save_tensors_atomic
from ssah.probe.directions import Directions, compute_directions
from ssah.probe.hidden import block_output, last_token_states, num_layers, transformer_blocks, validate_layers

ACTIONS = ("stop", "steer", "observe")
SCORERS = ("direction", "probe")
STATISTICS = ("mean", "max")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."
# Config fields the threshold depends on: a state calibrated under other values must be recalibrated.
CALIBRATION_FIELDS = ("scorer", "statistic", "include_prompt", "min_tokens", "prompt_position", "contrast_borderline",
                      "threshold_calibration")
PROMPT_POSITIONS = ("request", "last")
STATE_FORMAT = "ssah.monitor-state/1"


@dataclass
class MonitorConfig:
    """How the monitor scores, decides and acts (see the module docstring for the rule).

    Saved and loaded as YAML or JSON; unknown keys are rejected.
    """

    layers: list[int] | None = None  # None: calibration picks the layer with the best held-out separation
    scorer: str = "direction"  # direction | probe
    statistic: str = "max"  # running max | mean of the scores so far
    include_prompt: bool = True  # the prompt's score enters the running statistic
    prompt_position: str = "request"  # request: where the assistant turn begins | last: the last input token
    target_fpr: float = 0.05  # share of each safe calibration set (benign, borderline) allowed to be flagged
    threshold: float | None = None  # explicit threshold on the z-score scale; overrides target_fpr
    min_tokens: int = 4  # generated tokens seen before the monitor may act
    action: str = "stop"  # stop | steer | observe
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
    calibration_limit: int | None = 64  # prompts per calibration set, a seeded sample (None: all)
    calibration_tokens: int = 32  # new tokens per calibration reply
    batch_size: int = 8
    seed: int = 0
    system: str | None = None

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise SsahError(f"monitor scorer {self.scorer!r} unknown; use one of {', '.join(SCORERS)}")
        if self.statistic not in STATISTICS:
            raise SsahError(f"monitor statistic {self.statistic!r} unknown; use one of {', '.join(STATISTICS)}")
        if self.prompt_position not in PROMPT_POSITIONS:
            raise SsahError(f"monitor prompt_position {self.prompt_position!r} unknown; use one of "
                            f"{', '.join(PROMPT_POSITIONS)}")
        if self.action not in ACTIONS:
            raise SsahError(f"monitor action {self.action!r} unknown; use one of {', '.join(ACTIONS)}")
        if not 0.0 < self.target_fpr < 1.0:
            raise SsahError(f"monitor target_fpr {self.target_fpr} must be between 0 and 1 (e.g. 0.05)")
        if self.min_tokens < 0 or self.calibration_tokens < 1 or self.batch_size < 1:
            raise SsahError("monitor min_tokens must be >= 0, calibration_tokens and batch_size >= 1")
        if self.calibration_limit is not None and self.calibration_limit < 2:
            raise SsahError("monitor calibration_limit must be at least 2 (or null for all prompts)")
        if self.layers is not None:
            self.layers = [int(layer) for layer in self.layers]
        if not self.include_prompt and self.min_tokens == 0:
            raise SsahError("monitor min_tokens 0 needs include_prompt: true (nothing is scored before the first token)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "monitor config") -> MonitorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SsahError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as err:
            raise SsahError(f"{source}: {err}") from err

    def save(self, path: str | Path) -> Path:
        """Write YAML (.yaml/.yml) or JSON (anything else)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> MonitorConfig:
        path = Path(path)
        if not path.is_file():
            raise SsahError(f"monitor config {path} does not exist; write one with MonitorConfig().save(PATH)")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as err:  # yaml and json raise their own error types
            raise SsahError(f"monitor config {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                            f"{str(err).splitlines()[0]}") from err
        if not isinstance(data, dict):
            raise SsahError(f"monitor config {path} must hold a mapping of keys to values")
        return cls.from_dict(data, str(path))


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
        resolved = MonitorConfig(**{**config.to_dict(), "layers": layers})
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
        saved = json.loads(metadata["config"])
        # States saved before these keys existed were calibrated reading the last token, without contrast.
        saved.setdefault("prompt_position", "last")
        saved.setdefault("contrast_borderline", False)
        config = MonitorConfig.from_dict(saved, str(path))
        return cls(config, json.loads(metadata["layers"]), tensors["weight"], tensors["bias"], tensors["steer"],
                   float(metadata["threshold"]), int(metadata["num_layers"]), json.loads(metadata["meta"]),
                   json.loads(metadata.get("request_marker", "[]")))


def monitor_digest(config: MonitorConfig | None, state: MonitorState) -> str:
    """16 hex digits naming what a monitor does to generation: the effective config and threshold
    and the state's tensors (two equal digests generate the same replies)."""
    import hashlib

    config = config or state.config
    threshold = config.threshold if config.threshold is not None else state.threshold
    settings = {key: getattr(config, key) for key in ("scorer", "statistic", "include_prompt", "min_tokens",
                                                      "prompt_position", "action", "steer_alpha", "refusal_text")}
    digest = hashlib.sha256(json.dumps({**settings, "threshold": float(threshold), "layers": state.layers,
                                        "request_marker": state.request_marker}, sort_keys=True).encode())
    for tensor in (state.weight, state.bias, state.steer):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def request_marker(tokenizer) -> list[int]:
    """The token ids every chat-formatted request ends with: the tail the chat template (or the plain
    `User:`/`Assistant:` format) adds after the user's text to open the assistant turn. Found as the
    longest common tail of three rendered prompts that end in different characters; [] if none."""
    from ssah.probe.hidden import prompt_token_ids

    renders = [prompt_token_ids(tokenizer, text) for text in ("Hi", "Name a colour.", "What is 2+2?")]
    tail: list[int] = []
    for items in zip(*(reversed(ids) for ids in renders)):
        if len(set(items)) != 1:
            break
        tail.append(items[0])
    return tail[::-1]


def request_ends(input_ids: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """Per row, the position of the last token of the last occurrence of `marker` (the end of the
    request, before any text already placed in the reply); the last position where it does not occur."""
    rows, width = input_ids.shape
    last = torch.full((rows,), width - 1, dtype=torch.long, device=input_ids.device)
    k = len(marker)
    if k == 0 or width < k:
        return last
    windows = input_ids.unfold(1, k, 1)  # [B, width - k + 1, k]
    hits = (windows == torch.tensor(marker, device=input_ids.device)).all(-1)
    found = hits.any(1)
    # index of the last hit: flip, take the first, map back; window j ends at position j + k - 1
    last_hit = hits.shape[1] - 1 - hits.flip(1).float().argmax(1)
    return torch.where(found, last_hit + k - 1, last)


def upper_quantile(values: torch.Tensor, share: float) -> float:
    """The smallest value t with at most `share` of `values` strictly above it (-inf values allowed)."""
    ordered = torch.sort(values.double().flatten()).values
    n = ordered.numel()
    index = min(n - 1, max(0, math.ceil((1.0 - share) * n) - 1))
    return float(ordered[index])


class _ForceEos(LogitsProcessor):
    """Flagged rows may only emit EOS (stop action)."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self._forced: torch.Tensor | None = None  # the EOS-only row, rebuilt only when its key changes
        self._forced_key: tuple | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mon = self.monitor
        if mon.action != "stop" or mon._flagged is None or mon._eos_id is None:
            return scores
        key = (mon._eos_id, scores.shape[1], scores.device, scores.dtype)
        if key != self._forced_key:
            self._forced = torch.full_like(scores[0], float("-inf"))
            self._forced[mon._eos_id] = 0.0
            self._forced_key = key
        return torch.where(mon._flagged.to(scores.device)[:, None], self._forced, scores)


class _StopFlagged(StoppingCriteria):
    """Flagged rows are finished (stop action)."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        mon = self.monitor
        if mon.action != "stop" or mon._flagged is None:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return mon._flagged.to(input_ids.device).clone()


@dataclass
class MonitorResult:
    """Per batch row of one generate call."""

    flags: list[bool]
    flag_tokens: list[int | None]  # generated tokens seen when the flag fired (0 = on the prompt)
    prompt_scores: list[float]
    peaks: list[float]  # highest running statistic at which the monitor could act (-inf if never)


class Monitor:
    """Context manager that watches every `model.generate` call made inside it.

    On entry it hooks the monitored blocks and the model's forward, and wraps `model.generate` so each
    call resets the per-row state and adds the monitor's LogitsProcessor and StoppingCriteria (after
    any the caller passes). On exit (also on an exception) every hook is removed and `generate`
    restored. After a call: `flags`, `flag_tokens`, `prompt_scores`, `peaks`, `scores`; `history`
    keeps a `MonitorResult` per generate call, for callers that generate in several batches.

    `state` may be a calibrated `MonitorState` or `Directions` from `ssah probe` (then the threshold
    comes from benign prompt scores, see `MonitorState.from_directions`). `config` None means the
    state's own config; otherwise its scorer/statistic/include_prompt/min_tokens must match the
    state's, while action, steer_alpha, refusal_text and an explicit threshold may differ.
    """

    def __init__(self, model, config: MonitorConfig | None, state: MonitorState | Directions, tokenizer=None):
        if isinstance(state, Directions):
            state = MonitorState.from_directions(state, config or MonitorConfig(), num_layers(model))
        config = config or state.config
        for name in CALIBRATION_FIELDS:
            if getattr(config, name) != getattr(state.config, name):
                raise SsahError(f"monitor config sets {name}={getattr(config, name)!r} but the state was calibrated "
                                f"with {getattr(state.config, name)!r}; recalibrate with calibrate_monitor")
        if config.layers and validate_layers(model, config.layers) != sorted(state.layers):
            raise SsahError(f"monitor config asks for layers {config.layers} but the state holds {state.layers}; "
                            "recalibrate with those layers")
        depth, hidden = num_layers(model), int(model.config.hidden_size)
        if state.num_layers != depth or state.hidden_size != hidden:
            raise SsahError(f"monitor state is for a model with {state.num_layers} layers and hidden size "
                            f"{state.hidden_size}, but this model has {depth} and {hidden}; calibrate on this model")
        validate_layers(model, state.layers)
        # Where the prompt score is read: the request's end needs the tokens that end a request.
        self.request_marker: list[int] | None = None
        if config.prompt_position == "request":
            self.request_marker = list(state.request_marker) or (request_marker(tokenizer) if tokenizer else None)
            if self.request_marker is None:
                raise SsahError("monitor prompt_position 'request' needs the tokens that end a request: pass "
                                "the tokenizer (Monitor(model, config, state, tokenizer)) or set prompt_position: last")
        self.model, self.config, self.state = model, config, state
        self.action = config.action
        self.threshold = float(config.threshold if config.threshold is not None else state.threshold)
        self._handles: list = []
        self._original_generate: Any = None
        self._had_instance_generate = False
        self._processor, self._criteria = _ForceEos(self), _StopFlagged(self)
        self._in_generate = False
        self.history: list[MonitorResult] = []  # one entry per generate call, in call order
        self._eos_id: int | None = None
        self._stop_ids: torch.Tensor | None = None
        self.reset()

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        if self._handles:
            raise RuntimeError("this Monitor is already active; use one `with` block at a time")
        blocks = transformer_blocks(self.model)
        try:
            self._layer_tensors = []
            for position, layer in enumerate(self.state.layers):
                device = next(blocks[layer].parameters()).device
                self._layer_tensors.append((self.state.weight[position].to(device),
                                            self.state.bias[position].to(device),
                                            (self.config.steer_alpha * self.state.steer[position]).to(device)))
                self._handles.append(blocks[layer].register_forward_hook(self._make_block_hook(position)))
            self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._had_instance_generate = "generate" in vars(self.model)
            self._original_generate = self.model.generate
            self.model.generate = self._generate
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._original_generate is not None:
            if self._had_instance_generate:
                self.model.generate = self._original_generate
            else:
                vars(self.model).pop("generate", None)
            self._original_generate = None

    def reset(self) -> None:
        """Forget the per-row state; the next forward is treated as a new batch's prefill."""
        self._flagged: torch.Tensor | None = None
        self._step_scores: list[torch.Tensor] = []
        self._partial: torch.Tensor | None = None

    # --- generate integration --------------------------------------------------------------------
    def _generate(self, *args, **kwargs):
        gen_config = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams", getattr(gen_config, "num_beams", 1)) or 1
        if beams > 1 or kwargs.get("assistant_model") is not None or kwargs.get("prefill_chunk_size") \
                or getattr(gen_config, "prefill_chunk_size", None):
            raise SsahError("the monitor supports greedy decoding and sampling, not beam search, assisted "
                            "decoding or chunked prefill; drop num_beams/assistant_model/prefill_chunk_size")
        eos = kwargs.get("eos_token_id", getattr(gen_config, "eos_token_id", None))
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = kwargs.get("pad_token_id", getattr(gen_config, "pad_token_id", None))
        self._eos_id = eos_ids[0] if eos_ids else None
        self._stop_ids = torch.tensor(eos_ids + ([pad] if pad is not None else []), dtype=torch.long)
        self.reset()
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), self._processor])
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), self._criteria])
        self._in_generate = True
        try:
            output = self._original_generate(*args, **kwargs)
        finally:
            self._in_generate = False
        if self._flagged is not None:
            self.history.append(self.result())
        return output

    # --- hooks -----------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        if not self._in_generate:  # the caller's own forwards inside the block are not monitored
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self._flagged is None:  # first forward after a reset: the prompt (prefill)
            rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            device = ids.device if ids is not None else kwargs["inputs_embeds"].device
            self._allocate(rows, device)
            self._prefill = True
            self._read_at = None  # None: the last position
            if self.request_marker is not None and ids is not None:
                self._read_at = request_ends(ids, self.request_marker)
        else:
            self._prefill = False
            if ids is not None and self._stop_ids is not None and self._stop_ids.numel():
                # The newest input token is the one generated last step: EOS or padding ends the row.
                self._stop_ids = self._stop_ids.to(ids.device)
                self._done |= torch.isin(ids[:, -1], self._stop_ids)
        self._partial = None
        return None

    def _allocate(self, rows: int, device: torch.device) -> None:
        zeros = torch.zeros(rows, device=device)
        self._flagged = torch.zeros(rows, dtype=torch.bool, device=device)
        self._done = torch.zeros(rows, dtype=torch.bool, device=device)
        self._sum, self._count, self._max = zeros.clone(), zeros.clone(), torch.full_like(zeros, float("-inf"))
        self._tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self._flag_token = torch.full((rows,), -1, dtype=torch.long, device=device)
        self._peak = torch.full_like(zeros, float("-inf"))
        self._prompt_score = zeros.clone()

    def _make_block_hook(self, position: int):
        last = len(self.state.layers) - 1

        def hook(module, args, output):
            if not self._in_generate or self._flagged is None:
                return None
            hidden = block_output(output)
            weight, bias, steer = self._layer_tensors[position]
            newest = hidden[:, -1]
            read = newest
            if self._prefill and self._read_at is not None:
                read = hidden[torch.arange(hidden.shape[0], device=hidden.device), self._read_at.to(hidden.device)]
            score = read.float() @ weight + bias  # one dot product per row
            score = score.to(self._flagged.device)
            self._partial = score if self._partial is None else self._partial + score
            if position == last:
                self._update(self._partial / (last + 1))
            if self.action == "steer":
                # Flagged rows get the steer vector on the newest position; 0 * v leaves others exact.
                gate = self._flagged.to(hidden.device, hidden.dtype)[:, None]
                newest.add_(gate * steer.to(hidden.dtype))
            return None

        return hook

    def _update(self, score: torch.Tensor) -> None:
        """Fold this step's score into the running statistic and raise flags (all on-device)."""
        if self._prefill:
            self._prompt_score = score
            active = torch.ones_like(self._flagged)
            if self.config.include_prompt:
                self._sum, self._count, self._max = score.clone(), torch.ones_like(score), score.clone()
        else:
            active = ~self._done
            self._sum = self._sum + torch.where(active, score, torch.zeros_like(score))
            self._count = self._count + active.float()
            self._max = torch.where(active, torch.maximum(self._max, score), self._max)
            self._tokens = self._tokens + active.long()
            self._step_scores.append(torch.where(active, score, torch.full_like(score, float("nan"))))
        if self.config.statistic == "mean":
            statistic = torch.where(self._count > 0, self._sum / self._count.clamp_min(1.0),
                                    torch.full_like(score, float("-inf")))
        else:
            statistic = self._max
        eligible = active & (self._tokens >= self.config.min_tokens) & (self._count > 0)
        self._peak = torch.where(eligible, torch.maximum(self._peak, statistic), self._peak)
        new_flags = eligible & (statistic > self.threshold) & ~self._flagged
        self._flag_token = torch.where(new_flags, self._tokens, self._flag_token)
        self._flagged = self._flagged | new_flags

    # --- results ---------------------------------------------------------------------------------
    def result(self) -> MonitorResult:
        """The per-row outcome of the last generate call (one host synchronisation)."""
        return MonitorResult(self.flags, self.flag_tokens, self.prompt_scores, self.peaks)

    def _require_run(self) -> None:
        if self._flagged is None:
            raise RuntimeError("no monitored generate call yet")

    @property
    def flags(self) -> list[bool]:
        """Per batch row of the last generate call: did the monitor flag it?"""
        self._require_run()
        return self._flagged.cpu().tolist()

    @property
    def flag_tokens(self) -> list[int | None]:
        """Per row: generated tokens seen when the flag fired (0 = on the prompt), None if never."""
        self._require_run()
        return [None if t < 0 else t for t in self._flag_token.cpu().tolist()]

    @property
    def prompt_scores(self) -> list[float]:
        self._require_run()
        return self._prompt_score.float().cpu().tolist()

    @property
    def peaks(self) -> list[float]:
        """Per row: the highest running statistic at which the monitor could act (-inf if never)."""
        self._require_run()
        return self._peak.cpu().tolist()

    @property
    def scores(self) -> torch.Tensor:
        """[B, steps] score of each generated token (NaN after a row ended), on the CPU."""
        self._require_run()
        if not self._step_scores:
            return torch.empty(len(self._flagged), 0)
        return torch.stack(self._step_scores, dim=1).float().cpu()

    def apply_refusals(self, texts: list[str]) -> list[str]:
        """`texts` with flagged rows replaced by the refusal text (stop action only)."""
        if self.action != "stop":
            return list(texts)
        return [self.config.refusal_text if flag else text for text, flag in zip(texts, self.flags)]


@dataclass
class MonitoredReply:
    """One monitored generation. `text` is what the user sees; `generated` what the model wrote."""

    prompt: str
    text: str
    generated: str
    flagged: bool
    flag_token: int | None  # generated tokens seen when the flag fired; None if not flagged
    prompt_score: float
    peak: float
    action: str  # the action taken: stop | steer | observe, or "none" when not flagged

    def to_dict(self) -> dict:
        return asdict(self)


def monitored_generate(model, tokenizer, prompts: list[str], config: MonitorConfig | None,
                       state: MonitorState | Directions, *, system: str | None = None,
                       prefills: list[str] | None = None, max_new_tokens: int = 64, batch_size: int | None = None,
                       **generate_kwargs) -> list[MonitoredReply]:
    """Generate replies to `prompts` under the monitor, in left-padded batches (greedy unless
    `do_sample=True` is passed). `prefills` start the assistant reply (prefill attacks); `generated`
    is the continuation after the prefill."""
    from ssah.data.chat import encode_prompts

    if prefills is not None and len(prefills) != len(prompts):
        raise SsahError(f"{len(prefills)} prefills for {len(prompts)} prompts; give one per prompt")
    monitor = Monitor(model, config, state, tokenizer)
    size = batch_size or monitor.config.batch_size
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    device = next(model.parameters()).device
    replies: list[MonitoredReply] = []
    with monitor:
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            inputs = encode_prompts(tokenizer, chunk, system, None if prefills is None else prefills[start:start + size])
            inputs = {key: value.to(device) for key, value in inputs.items()}
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            generated = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            shown = monitor.apply_refusals(generated)
            rows = zip(chunk, shown, generated, monitor.flags, monitor.flag_tokens, monitor.prompt_scores, monitor.peaks)
            for prompt, text, raw, flagged, flag_token, prompt_score, peak in rows:
                replies.append(MonitoredReply(prompt, text, raw, flagged, flag_token, prompt_score, peak,
                                              monitor.action if flagged else "none"))
    return replies


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


def calibrate_monitor(model, tokenizer, harmful_calib, benign_calib, config: MonitorConfig | None = None,
                      progress: bool = False, borderline_calib=None, threshold_calib=None) -> MonitorState:
    """Fit the monitor on calibration data: directions and probe from last-token states of all layers,
    the layer (config.layers, else best held-out separation), then the threshold from benign
    calibration replies (see the module docstring). With `threshold_calib`, the borderline prompts
    all shape the direction and the threshold set's replies bound the flag rate instead of half of
    them. The state's `meta["calibration"]` records the flag rates reached on benign, borderline (or
    threshold-set) and harmful calibration replies."""
    from ssah.models.fingerprint import model_fingerprint

    config = config or MonitorConfig()
    harmful, harmful_info = _prompts_of(harmful_calib, config.calibration_limit, config.seed, "harmful")
    benign, benign_info = _prompts_of(benign_calib, config.calibration_limit, config.seed, "benign")
    layers = validate_layers(model, None)
    if config.layers:
        config = MonitorConfig(**{**config.to_dict(), "layers": validate_layers(model, config.layers)})
    meta = {"model_fingerprint": model_fingerprint(model), "harmful": harmful_info, "benign": benign_info}
    borderline: list[str] = []  # safe prompts whose replies bound the threshold with the benign ones
    contrast: list[str] = []  # borderline prompts on the benign side of the direction
    if borderline_calib is not None:
        borderline, meta["borderline"] = _prompts_of(borderline_calib, config.calibration_limit, config.seed,
                                                     "borderline")
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
        borderline, meta["threshold_set"] = _prompts_of(threshold_calib, config.calibration_limit, config.seed,
                                                        "threshold")
    harmful_states = last_token_states(model, tokenizer, harmful, layers, config.batch_size, config.system)
    negatives = last_token_states(model, tokenizer, benign + contrast, layers, config.batch_size, config.system)
    directions = compute_directions(harmful_states, negatives, layers, seed=config.seed, meta=meta)
    state = MonitorState.from_directions(directions, MonitorConfig(**{**config.to_dict(), "threshold": 0.0}),
                                         len(layers))
    state.request_marker = request_marker(tokenizer)
    observe = MonitorConfig(**{**state.config.to_dict(), "action": "observe", "threshold": math.inf})
    run = dict(system=config.system, max_new_tokens=config.calibration_tokens, batch_size=config.batch_size)
    benign_peaks = torch.tensor([r.peak for r in monitored_generate(model, tokenizer, benign, observe, state, **run)])
    # The quantile is taken in each safe set separately and the higher one kept: pooled, the many easy
    # benign replies would let the threshold flag far more than target_fpr of the borderline ones.
    candidates = [upper_quantile(benign_peaks, config.target_fpr)]
    if borderline:
        borderline_peaks = torch.tensor([r.peak for r in monitored_generate(model, tokenizer, borderline, observe,
                                                                            state, **run)])
        candidates.append(upper_quantile(borderline_peaks, config.target_fpr))
    threshold = config.threshold if config.threshold is not None else max(candidates)
    harmful_peaks = torch.tensor([r.peak for r in monitored_generate(model, tokenizer, harmful, observe, state, **run)])
    state.threshold = float(threshold)
    state.config = MonitorConfig(**{**state.config.to_dict(), "threshold": config.threshold})
    layer_index = [directions.index(layer) for layer in state.layers]
    state.meta = {
        **meta, "source": "calibrate_monitor",
        "threshold_from": ("benign and threshold-set calibration replies" if threshold_calib is not None
                           else "benign and borderline calibration replies" if borderline
                           else "benign calibration replies"),
        "calibration": {
            "benign_flag_rate": float((benign_peaks > threshold).float().mean()),
            "borderline_flag_rate": (float((borderline_peaks > threshold).float().mean())
                                     if borderline else None),
            "harmful_flag_rate": float((harmful_peaks > threshold).float().mean()),
            "tokens": config.calibration_tokens,
            "heldout_cohens_d": [float(directions.separation[i]) for i in layer_index],
            "probe_accuracy": [float(directions.probe.accuracy[i]) for i in layer_index],
        },
    }
    return state


def monitor_from_file(model, tokenizer, path: str | Path, check_model: bool = True) -> tuple[MonitorConfig, MonitorState]:
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
