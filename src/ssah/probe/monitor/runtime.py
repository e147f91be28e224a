"""The monitor at work: `Monitor` follows the `generate` calls it is given, through hooks and a logits processor.

See `ssah.probe.monitor` for the decision rule. `Monitor` is an `Intervention` (its key names the
calibrated state and effective settings), `monitored_generate` generates a list of prompts under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ssah.errors import SsahError
from ssah.interventions.base import Intervention
from ssah.probe.directions import Directions
from ssah.probe.hidden import (
    block_output,
    num_layers,
    request_ends,
    request_marker,
    transformer_blocks,
    validate_layers,
)
from ssah.probe.monitor.config import CALIBRATION_FIELDS, MonitorConfig
from ssah.probe.monitor.state import MonitorState, monitor_digest


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


class Monitor(Intervention):
    """Follows the `generate` calls passed through it, while its `with` block is active.

    On entry it hooks the monitored blocks and the model's forward; `model.generate` is left as it is.
    A call joins the monitor through `watch(kwargs)` (the monitor's LogitsProcessor and StoppingCriteria
    added after any the caller passes, the per-row state reset for that call) or `generate(**kwargs)`;
    ssah's own generation does this for every intervention that `watches_generation`. Forwards and
    `generate` calls made outside `watch` are not monitored. On exit (also on an exception) every hook is
    removed. After a call: `flags`, `flag_tokens`, `prompt_scores`, `peaks`, `scores`; `history` keeps a
    `MonitorResult` per watched call, for callers that generate in several batches.

    `state` may be a calibrated `MonitorState` or `Directions` from `ssah probe` (then the threshold
    comes from benign prompt scores, see `MonitorState.from_directions`). `config` None means the
    state's own config; otherwise its scorer/statistic/include_prompt/min_tokens must match the
    state's, while action, steer_alpha, refusal_text and an explicit threshold may differ.
    """

    watches_generation = True

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
        self._processor, self._criteria = _ForceEos(self), _StopFlagged(self)
        self._in_generate = False
        self.history: list[MonitorResult] = []  # one entry per generate call, in call order
        self._eos_id: int | None = None
        self._stop_ids: torch.Tensor | None = None
        self.reset()

    kind = "monitor"

    @cached_property
    def key(self) -> str:
        return f"monitor-{monitor_digest(self.config, self.state)}"

    # --- lifecycle -------------------------------------------------------------------------------
    def apply(self) -> None:
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
        except BaseException:
            self._detach()
            raise

    def undo(self) -> None:
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._in_generate = False

    def reset(self) -> None:
        """Forget the per-row state; the next forward is treated as a new batch's prefill."""
        self._flagged: torch.Tensor | None = None
        self._step_scores: list[torch.Tensor] = []
        self._partial: torch.Tensor | None = None

    # --- generate integration --------------------------------------------------------------------
    @contextlib.contextmanager
    def watch(self, kwargs: dict) -> Iterator[dict]:
        """One `generate` call under the monitor: yields `kwargs` with the monitor's LogitsProcessor and
        StoppingCriteria added (after the caller's); the forwards inside the block are that call's."""
        if not self._handles:
            raise RuntimeError("the Monitor is not active: enter its `with` block before watching a generate call")
        gen_config = kwargs.get("generation_config") or self.model.generation_config
        setting = lambda name, default=None: kwargs.get(name, getattr(gen_config, name, default))  # noqa: E731
        if (setting("num_beams", 1) or 1) > 1 or kwargs.get("assistant_model") is not None \
                or setting("prefill_chunk_size"):
            raise SsahError("the monitor supports greedy decoding and sampling, not beam search, assisted "
                            "decoding or chunked prefill; drop num_beams/assistant_model/prefill_chunk_size")
        eos, pad = setting("eos_token_id"), setting("pad_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self._eos_id = eos_ids[0] if eos_ids else None
        self._stop_ids = torch.tensor(eos_ids + ([pad] if pad is not None else []), dtype=torch.long)
        self.reset()
        call = {**kwargs,
                "logits_processor": LogitsProcessorList([*(kwargs.get("logits_processor") or []), self._processor]),
                "stopping_criteria": StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []),
                                                           self._criteria])}
        self._in_generate = True
        try:
            yield call
        finally:
            self._in_generate = False
        if self._flagged is not None:
            self.history.append(self.result())

    def generate(self, **kwargs):
        """`model.generate(**kwargs)` under the monitor."""
        with self.watch(kwargs) as call:
            return self.model.generate(**call)

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

    rewrite = apply_refusals

    def report_block(self, rows: list[dict]) -> dict:
        """What the monitor was and how many replies per suite it replaced (stop action: the replies
        equal to its refusal text; counted from the rows so cached replies count too)."""
        config = self.config
        block = {"digest": monitor_digest(config, self.state), "action": config.action,
                 "layers": list(self.state.layers), "threshold": self.threshold,
                 "prompt_position": config.prompt_position, "calibration": self.state.meta.get("calibration"),
                 "replaced": None}
        if config.action == "stop":
            replaced: dict[str, dict] = {}
            for row in rows:
                entry = replaced.setdefault(row["suite"], {"n": 0, "replaced": 0})
                entry["n"] += 1
                entry["replaced"] += row["reply"] == config.refusal_text
            block["replaced"] = {suite: {**e, "share": e["replaced"] / e["n"]} for suite, e in replaced.items()}
        return block


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
            opening = None if prefills is None else prefills[start:start + size]
            inputs = encode_prompts(tokenizer, chunk, system, opening)
            inputs = {key: value.to(device) for key, value in inputs.items()}
            with torch.no_grad():
                out = monitor.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            generated = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            shown = monitor.apply_refusals(generated)
            rows = zip(chunk, shown, generated, monitor.flags, monitor.flag_tokens, monitor.prompt_scores,
                       monitor.peaks)
            for prompt, text, raw, flagged, flag_token, prompt_score, peak in rows:
                replies.append(MonitoredReply(prompt, text, raw, flagged, flag_token, prompt_score, peak,
                                              monitor.action if flagged else "none"))
    return replies
