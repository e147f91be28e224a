"""Continuous batching for greedy generation: a finished row's slot goes to the next waiting prompt.

Static batching (`model.generate` per batch) keeps every row of a batch stepping until its longest
reply ends, so with uneven reply lengths a large share of the decoding work is thrown away. Here the
decoding loop is ssah's own, over one `DynamicCache` of full-attention layers:

- a row leaves the batch the step it emits EOS or reaches `max_new_tokens` (its cache rows are
  dropped, and cache columns that became padding for every row are cut off the left);
- when at least `refill` slots are free, the next waiting prompts are prefilled, in groups of
  similar length (`length_buckets`: little padding in the prefill), their caches left-padded to the
  running batch's length (or the other way round) and joined to it;
- the prompts' shared opening (a chat template's system turn) is computed once and its cache rows
  open every new row's cache;
- every row sees only its own tokens: padding is masked and position ids count each row's real
  tokens, so a greedy reply equals the batch-size-1 reply token for token (tested on the tiny models
  of every supported family in fp32).

The slot count decides the speed on a CPU: a decoding step reads every weight once whatever
the number of rows, so rows share that cost until the arithmetic dominates. `choose_slots` measures
decoding steps at growing slot counts once per model shape and machine and caches the choice under
the ssah cache folder (`slots.json`); `slots="auto"` in `ssah.evaluate.generation` uses it.

transformers' own continuous-batching API (`generate_batch`, paged attention) gives the same replies
but ran about twice as slowly as static batching on a 2-core CPU, hence this loop.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class BatchingStats:
    """What the loop did: forward passes, prompt positions prefilled (padding included, the shared
    opening once), decoding row-steps and the tokens they kept."""

    prefills: int = 0
    prefill_tokens: int = 0
    steps: int = 0
    row_steps: int = 0
    tokens: int = 0


@dataclass
class _Row:
    index: int  # position in the caller's list
    tokens: list[int]


def _growing_cache(start: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A `DynamicCache` whose layers write new positions into spare room (see `_GrowingLayer`);
    `start`: (keys, values) per layer to begin with."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _GrowingLayer(DynamicLayer):
        """A full-attention layer that keeps spare columns: a decoding step writes one column in place
        instead of concatenating the whole cache again (which cost 14% of a batch-8 step)."""

        def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            self._keys_room, self._values_room = keys, values
            self.keys, self.values, self.is_initialized = keys, values, True
            self.device = keys.device

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self.adopt(key_states, value_states)
                return self.keys, self.values
            length, add = self.keys.shape[-2], key_states.shape[-2]
            if length + add > self._keys_room.shape[-2]:
                spare = max(32, length // 2)
                for name in ("keys", "values"):
                    old = getattr(self, name)
                    room = old.new_empty((*old.shape[:-2], length + add + spare, old.shape[-1]))
                    room[..., :length, :] = old
                    setattr(self, f"_{name}_room", room)
            self._keys_room[..., length:length + add, :] = key_states
            self._values_room[..., length:length + add, :] = value_states
            self.keys = self._keys_room[..., :length + add, :]
            self.values = self._values_room[..., :length + add, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.get_seq_length() > 0:
                self.adopt(self.keys[indices, ...], self.values[indices, ...])

        def move_rows(self, into: torch.Tensor, source: torch.Tensor, rows: int) -> None:
            """Copy rows `source` over rows `into` (disjoint), then keep the first `rows`: only the
            moved rows are copied, where selecting the kept rows would copy every one."""
            length = self.keys.shape[-2]
            for name in ("_keys_room", "_values_room"):
                room = getattr(self, name)
                if into.numel():
                    room[into] = room[source]
                setattr(self, name, room[:rows])
            self.keys, self.values = self._keys_room[..., :length, :], self._values_room[..., :length, :]

        def drop_left(self, columns: int) -> None:
            self._keys_room, self._values_room = self._keys_room[..., columns:, :], self._values_room[..., columns:, :]
            length = self.keys.shape[-2] - columns
            self.keys, self.values = self._keys_room[..., :length, :], self._values_room[..., :length, :]

    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer
    for keys, values in start or []:
        cache.layers.append(_GrowingLayer())
        cache.layers[-1].adopt(keys, values)
    return cache


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _Batch:
    """The running rows, their attention mask [rows, columns] and the cache behind it."""

    def __init__(self, model, pad_id: int, prefix: Sequence[int] = ()):
        self.model, self.pad_id, self.prefix = model, pad_id, list(prefix)
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rows: list[_Row] = []
        self.mask: torch.Tensor | None = None
        self.cache = None
        self.pending: torch.Tensor | None = None  # [rows] the token each row feeds next
        self.device = next(model.parameters()).device
        accepts = inspect.signature(model.forward).parameters
        self._logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._cache_kw = "cache" if "cache" in accepts else "past_key_values"  # renamed in transformers 5

    def _forward(self, input_ids, mask, cache):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._logits_kw)
        return out.logits[:, -1, :].argmax(-1), cache  # the cache grows in place

    def prefill(self, encoded: Sequence[list[int]]) -> torch.Tensor:
        """Prefill new prompts as one left-padded batch; returns their first tokens. The prompts'
        shared prefix is computed once: its cache rows open every new row's cache, then padding,
        then each prompt's own tokens."""
        skip = len(self.prefix)
        width = max(len(ids) for ids in encoded) - skip
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), skip + width), dtype=torch.long)
        mask[:, :skip] = 1
        for row, tokens in enumerate(encoded):
            own = tokens[skip:]
            ids[row, width - len(own):] = torch.tensor(own, dtype=torch.long)
            mask[row, skip + width - len(own):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        start = [(keys.expand(len(encoded), -1, -1, -1).clone(), values.expand(len(encoded), -1, -1, -1).clone())
                 for keys, values in self._prefix_cache()]
        first, cache = self._forward(ids, mask, _growing_cache(start))
        self._join(mask, cache, first)
        return first

    def _prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._prefix_kv is None:
            self._prefix_kv = []
            if self.prefix:
                ids = torch.tensor([self.prefix], dtype=torch.long, device=self.device)
                _, cache = self._forward(ids, torch.ones_like(ids), _growing_cache())
                self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self._prefix_kv

    def _join(self, mask: torch.Tensor, cache, first: torch.Tensor) -> None:
        if self.mask is None or self.mask.shape[0] == 0:
            self.mask, self.cache, self.pending = mask, cache, first
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old_pad, new_pad = width - self.mask.shape[1], width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers):
            old.adopt(torch.cat([_left_pad(old.keys, old_pad, -2), _left_pad(new.keys, new_pad, -2)]),
                      torch.cat([_left_pad(old.values, old_pad, -2), _left_pad(new.values, new_pad, -2)]))
        self.mask = torch.cat([_left_pad(self.mask, old_pad, 1), _left_pad(mask, new_pad, 1)])
        self.pending = torch.cat([self.pending, first])

    def step(self) -> torch.Tensor:
        """Feed every row's pending token; returns the next token of each row."""
        ones = self.mask.new_ones((self.mask.shape[0], 1))
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.pending, self.cache = self._forward(self.pending[:, None], self.mask, self.cache)
        return self.pending

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (ascending); cut columns that are padding for every row left.

        Rows that end leave holes that the last kept rows move into (the row order changes; every row
        knows its prompt), so a step at which a few rows end copies those few rows' caches, not all."""
        kept = set(keep)
        holes = [i for i in range(len(keep)) if i not in kept]
        movers = [i for i in keep if i >= len(keep)]
        if len(keep) == len(set(keep)) and all(hasattr(layer, "move_rows") for layer in self.cache.layers):
            into = torch.tensor(holes, dtype=torch.long, device=self.device)
            source = torch.tensor(movers, dtype=torch.long, device=self.device)
            for hole, mover in zip(holes, movers):
                self.rows[hole] = self.rows[mover]
            del self.rows[len(keep):]
            self.mask[into], self.pending[into] = self.mask[source], self.pending[source]
            self.mask, self.pending = self.mask[:len(keep)], self.pending[:len(keep)]
            for layer in self.cache.layers:
                layer.move_rows(into, source, len(keep))
        else:  # a repeated row (the slot measurement widens one row into many)
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.rows = [self.rows[i] for i in keep]
            self.mask, self.pending = self.mask[index], self.pending[index]
            self.cache.batch_select_indices(index)
        if not keep:
            return
        lead = int(self.mask.any(dim=0).long().argmax())  # first column some row attends to
        if lead > 0:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.drop_left(lead)


@torch.inference_mode()
def continuous_generate(model, encoded: Sequence[list[int]], *, max_new_tokens: int, eos_ids: Sequence[int],
                        pad_id: int, batch_size: int, refill: int | None = None,
                        on_finish: Callable[[list[tuple[int, tuple[int, ...]]]], None] | None = None,
                        stats: BatchingStats | None = None) -> list[tuple[int, ...]]:
    """Greedy replies (new token ids up to EOS, excluded) to token-id prompts, in input order.

    Prompts enter in the order given (sort them by length first: prefill groups of similar length pad
    little). Prompts entering together are prefilled in `length_buckets`. `refill` (default: a quarter
    of `batch_size`, at least 1) is how many slots must be free before waiting prompts are prefilled:
    prefilling one prompt at a time costs a forward pass each. `on_finish` receives (index, tokens) of
    the rows that ended at a step.
    """
    stops = set(int(t) for t in eos_ids)
    refill = max(1, batch_size // 4) if refill is None else max(1, min(refill, batch_size))
    stats = stats if stats is not None else BatchingStats()
    replies: list[tuple[int, ...] | None] = [None] * len(encoded)
    waiting = list(range(len(encoded)))
    batch = _Batch(model, pad_id, _shared_prefix(encoded))
    stats.prefill_tokens += len(batch.prefix)
    while waiting or batch.rows:
        free = batch_size - len(batch.rows)
        if waiting and (free >= refill or not batch.rows):
            taken, waiting = waiting[:free], waiting[free:]
            skip = len(batch.prefix)
            for group in length_buckets([len(encoded[i]) - skip for i in taken]):
                group = [taken[j] for j in group]
                batch.rows += [_Row(i, []) for i in group]
                stats.prefills += 1
                stats.prefill_tokens += len(group) * max(len(encoded[i]) - skip for i in group)
                start = len(batch.rows) - len(group)
                _advance(batch, batch.prefill([encoded[i] for i in group]), start, stops, max_new_tokens,
                         replies, on_finish, stats)
            continue
        stats.steps += 1
        stats.row_steps += len(batch.rows)
        _advance(batch, batch.step(), 0, stops, max_new_tokens, replies, on_finish, stats)
    return [reply if reply is not None else () for reply in replies]


def length_buckets(lengths: Sequence[int], shortest_share: float = 0.75) -> list[list[int]]:
    """Indices of `lengths` grouped for prefilling: a group's shortest prompt is at least
    `shortest_share` of its longest, so padding stays under a quarter of a group's tokens. Groups
    keep the input order inside them; the longest prompts' group comes first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= shortest_share * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(group) for group in groups]


def _shared_prefix(encoded: Sequence[list[int]], least: int = 8) -> list[int]:
    """The tokens every prompt starts with (a chat template's system turn), one short of the shortest
    prompt; none when fewer than `least` or when there is one prompt."""
    if len(encoded) < 2:
        return []
    prefix = os.path.commonprefix([list(ids) for ids in encoded])[:min(len(ids) for ids in encoded) - 1]
    return prefix if len(prefix) >= least else []


def _advance(batch: _Batch, tokens: torch.Tensor, start: int, stops: set[int], max_new_tokens: int,
             replies: list, on_finish, stats: BatchingStats) -> None:
    """Record each row's new token (rows from `start` on); retire the rows that ended."""
    keep, finished = list(range(start)), []
    for offset, token in enumerate(tokens.tolist()):
        row = batch.rows[start + offset]
        if token not in stops:
            row.tokens.append(token)
            stats.tokens += 1
        if token in stops or len(row.tokens) >= max_new_tokens:
            replies[row.index] = tuple(row.tokens)
            finished.append((row.index, replies[row.index]))
        else:
            keep.append(start + offset)
    if finished:
        batch.keep(keep)
        if on_finish is not None:
            on_finish(finished)


SLOT_CANDIDATES = (8, 16, 32, 64, 128)  # a GPU's caller may pass larger counts
SLOTS_FILE = "slots.json"


@dataclass
class SlotChoice:
    """The slot count `choose_slots` settled on, the decoding row-steps per second it measured at each
    count tried, and whether this call measured them (False: read from the cache file)."""

    slots: int
    rows_per_s: dict[int, float] = field(default_factory=dict)
    measured: bool = False
    reason: str = ""


def _machine_key(model) -> str:
    """What a measured slot count depends on: the model's shape and dtype, the device, torch's threads,
    and the measurement rule (`rule`: choices an earlier rule made are measured again)."""
    import torch

    config = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    shape = {k: config.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size", "n_embd",
                                        "n_layer", "n_head", "head_dim")}
    parameter = next(model.parameters())
    device = parameter.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    payload = {"rule": 2, "shape": shape, "dtype": str(parameter.dtype), "device": device.type, "where": where,
               "cpu": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _available_memory() -> int:
    """Bytes the system can give without swapping (MemAvailable: free memory plus reclaimable caches)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 8 * 2**30


def _memory_cap(model, context: int) -> int:
    """The most slots whose caches of `context` tokens fill at most a quarter of the free memory."""
    import torch

    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", None)
                                                     or getattr(config, "n_embd", 64)) // heads
    parameter = next(model.parameters())
    per_row = 2 * layers * kv_heads * head_dim * context * parameter.element_size()
    if parameter.device.type == "cuda":
        free = torch.cuda.mem_get_info(parameter.device)[0]
    else:
        free = _available_memory()
    return max(1, int(free / 4 // max(1, per_row)))


@torch.inference_mode()
def measure_slots(model, *, context: int = 96, steps: int = 3, candidates: Sequence[int] = SLOT_CANDIDATES,
                  step_budget_s: float = 4.0, gain: float = 1.1) -> SlotChoice:
    """Decoding row-steps per second at growing slot counts; the choice is the smallest count within
    `gain` of the fastest (more slots would share too little more to be worth their memory). Every
    count is measured, so one slow measurement on a shared machine does not end the search.

    Each count decodes `steps` steps (after one untimed; the fastest counts) over a cache of `context`
    columns copied from one prefilled row, so no prompt is prefilled per count. Counts stop where a step
    takes longer than `step_budget_s` (a large model on a CPU), where the caches would fill a quarter of
    the free memory, or at an out-of-memory error on a GPU.
    """
    cap = _memory_cap(model, context + 256)
    vocab = int(getattr(model.config, "vocab_size", 256) or 256)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(min(3, vocab - 1), vocab, (context,), generator=generator).tolist()
    probe = _Batch(model, pad_id=0)
    probe.rows = [_Row(0, [])]
    probe.prefill([prompt])
    choice, reason = SlotChoice(slots=candidates[0]), "tried every count"
    for slots in candidates:
        if slots > cap:
            reason = f"{slots} slots' caches would fill a quarter of the free memory"
            break
        batch = _Batch(model, pad_id=0)
        batch.rows, batch.mask, batch.pending = list(probe.rows), probe.mask, probe.pending
        batch.cache = _growing_cache([(layer.keys, layer.values) for layer in probe.cache.layers])
        try:
            batch.keep([0] * slots)
            batch.step()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                batch.step()
                if batch.device.type == "cuda":
                    torch.cuda.synchronize(batch.device)
                times.append(time.perf_counter() - start)
            seconds = min(times)  # the fastest step: another job's burst on a shared machine only slows some
        except torch.OutOfMemoryError:
            reason = f"{slots} slots ran out of memory"
            break
        finally:
            del batch
        choice.rows_per_s[slots] = slots / seconds
        if seconds > step_budget_s:
            reason = f"a step at {slots} slots took over {step_budget_s:g} s"
            break
    best = max(choice.rows_per_s.values(), default=0.0)
    choice.slots = min((s for s, rate in choice.rows_per_s.items() if rate * gain >= best), default=candidates[0])
    choice.measured, choice.reason = True, reason
    return choice


def choose_slots(model, cache_file: str | Path | None = None, **measure) -> SlotChoice:
    """The slot count for continuous batching on this model and machine: measured once
    (`measure_slots`) and kept in `cache_file` (default: `slots.json` in the ssah cache folder),
    keyed by the model's shape and dtype, the device and torch's thread count."""
    from ssah.models.loading import cache_dir

    path = Path(cache_file) if cache_file is not None else cache_dir() / SLOTS_FILE
    key = _machine_key(model)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("slots"), int) and entry["slots"] >= 1:
        return SlotChoice(entry["slots"], {int(k): v for k, v in entry.get("rows_per_s", {}).items()},
                          measured=False, reason=entry.get("reason", ""))
    choice = measure_slots(model, **measure)
    known = known if isinstance(known, dict) else {}
    known[key] = {"slots": choice.slots, "rows_per_s": {str(k): v for k, v in choice.rows_per_s.items()},
                  "reason": choice.reason}
    try:  # a cache that cannot be written costs a measurement next time, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass
    return choice
