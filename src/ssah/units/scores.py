"""Per-unit importance scores on a calibration set, and their file format.

    from ssah.models.loading import load_model
    from ssah.data import load_dataset
    from ssah.units.scores import score_dataset

    loaded = load_model()
    safety = score_dataset(loaded, load_dataset("harmful:calibration"), responses="refusals", out="runs/S")
    safety.values["mlp"]          # float64 [num_layers, units_per_layer]

How scores are computed (see ssah.units.scorers for the scorers themselves):

- Activation scorers (`variance`, the default, `wanda`, `activation`) run one no-grad forward pass per
  batch with a pre-hook on the input of every B module of every layer at once. Each hook merges the
  activations of the tokens in scope into float64 running statistics (Chan's parallel update), so the
  result depends neither on the batch size nor on padding. Once the last hook of a batch has fired the
  forward pass is stopped: the rest of the network (final layer norm, LM head) cannot change X.
- Gradient scorers (`snip`) run one forward and one backward per batch for all layers at once, with
  gradients enabled only on parameters some unit owns. A hook on each such parameter reduces its
  gradient to per-unit sums as soon as it is accumulated and then frees it, so no per-weight score
  survives the backward pass. The loss is the summed next-token NLL of the tokens in scope (by default
  the response); the score is divided by the number of loss tokens. The absolute value is taken per
  batch, so sequences sharing a batch can cancel: snip depends on the batch size (batch size 1 gives
  per-sequence SNIP), and a run with another batch size counts as another run.

Batches are formed from length-sorted pairs (less padding); the order does not change the scores.
Scores are kept as float64 [num_layers, units_per_layer] per unit kind (O(units) in memory and on disk).

Calibration responses (`score_dataset(responses=...)`): `dataset` uses each record's response;
`refusals` pairs every prompt with a refusal drawn from the built-in `refusals` set by `seed` (the
paper's safety data: harmful prompts answered with refusals); `self` uses the model's own greedy
replies, cached in the output folder (replies.jsonl, keyed by model fingerprint) so a rerun does not
generate again.

On disk a run folder holds `scores.safetensors` (one tensor per kind) and `manifest.json` (what was
scored, how, and on which model). Both are written atomically (temporary file, then os.replace).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssah.data.chat import collate_pairs, encode_pair, encode_prompts
from ssah.errors import SsahError
from ssah.io import atomic_write
from ssah.units.layout import UnitLayout
from ssah.units.scorers import (
    SCORERS, TOKEN_SCOPES, ChannelStats, Scorer, get_scorer, register_scorer, resolve_scope,
)

__all__ = [
    "SCORERS", "TOKEN_SCOPES", "RESPONSE_SOURCES", "Scores", "compute_scores", "score_batches",
    "score_dataset", "make_batches", "calibration_pairs", "generate_replies", "get_scorer", "register_scorer",
]

FORMAT = "ssah.scores/1"
SCORES_FILE = "scores.safetensors"
MANIFEST_FILE = "manifest.json"
REPLIES_FILE = "replies.jsonl"
RESPONSE_SOURCES: tuple[str, ...] = ("dataset", "refusals", "self")

Pair = tuple[str, "str | None"]

# Gradient saliency is computed in float32 chunks of at most this many entries, so a bf16 model
# never needs a full-size float32 copy of a parameter.
_SALIENCY_CHUNK = 1 << 22


# -- the Scores artifact ----------------------------------------------------------------------------

@dataclass
class Scores:
    """Per-unit scores of one model on one calibration set.

    `values[kind]` is a float64 tensor [num_layers, units_per_layer]; `manifest` records the scorer,
    token scope, responses source, dataset name and fingerprint, tokens seen, model fingerprint,
    ssah version, seed and attention unit. `reused` is True when `score_dataset` found this exact
    run in its output folder instead of computing it (not saved).
    """

    values: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    reused: bool = field(default=False, compare=False)

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    @property
    def dataset_fingerprint(self) -> str | None:
        return self.manifest.get("dataset_fingerprint")

    @property
    def scorer(self) -> str:
        return self.manifest["scorer"]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.values)

    def digest(self) -> str:
        """sha256 of the score values (kinds, shapes and float64 bytes)."""
        return values_digest(self.values)

    def save(self, directory: str | Path) -> Path:
        """Write scores.safetensors, then manifest.json (atomically); returns the folder."""
        from safetensors.torch import save as save_tensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {kind: value.detach().to("cpu", torch.float64).contiguous() for kind, value in self.values.items()}
        self.manifest["values_sha256"] = values_digest(tensors)
        atomic_write(directory / SCORES_FILE, save_tensors(tensors))
        atomic_write(directory / MANIFEST_FILE, (json.dumps(self.manifest, indent=2) + "\n").encode())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Scores:
        """Read a folder written by `save`; one clear SsahError if it is missing or damaged."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("format") != FORMAT:
            raise SsahError(f"{directory / MANIFEST_FILE} is not an ssah scores manifest "
                            f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
        values = read_tensors(directory / SCORES_FILE, "ssah score")
        expected_layers = manifest.get("num_layers")
        for kind, units in manifest.get("units_per_layer", {}).items():
            tensor = values.get(kind)
            if tensor is None or tuple(tensor.shape) != (expected_layers, units):
                got = None if tensor is None else tuple(tensor.shape)
                raise SsahError(f"{directory / SCORES_FILE} does not match its manifest ({kind}: shape {got}, "
                                f"expected {(expected_layers, units)}); rerun ssah score with --force")
        # Kinds in layout order (mlp, attn), as the manifest lists them; safetensors sorts its keys.
        values = {kind: values[kind].to(torch.float64) for kind in manifest.get("units_per_layer", values)}
        if manifest.get("values_sha256") not in (None, values_digest(values)):
            raise SsahError(f"{directory / SCORES_FILE} does not match {MANIFEST_FILE} (its digest differs); "
                            "the folder mixes two runs: rerun ssah score with --force")
        return cls(values, manifest)


def read_manifest(directory: Path, what: str = "scores", filename: str = MANIFEST_FILE,
                  made_by: str = "ssah score") -> dict:
    """The JSON manifest of a run folder, or one clear SsahError."""
    path = Path(directory) / filename
    if not Path(directory).is_dir():
        raise SsahError(f"no {what} folder {directory}; run {made_by} --out {directory} first")
    if not path.is_file():
        raise SsahError(f"{directory} holds no {what} ({filename} is missing); run {made_by} --out {directory}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SsahError(f"{path} is not valid JSON ({err}); rerun {made_by} with --force") from None
    if not isinstance(manifest, dict):
        raise SsahError(f"{path} is not a JSON object; rerun {made_by} with --force")
    return manifest


def read_tensors(path: Path, made_by: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_tensors

    if not path.is_file():
        raise SsahError(f"{path} is missing; rerun {made_by} with --force")
    try:
        return load_tensors(path.read_bytes())
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise SsahError(f"{path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        f"rerun {made_by} with --force") from None


def values_digest(values: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for kind in sorted(values):
        tensor = values[kind].detach().to("cpu", torch.float64).contiguous()
        digest.update(f"{kind}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# -- batches --------------------------------------------------------------------------------------

def as_pairs(data: Any) -> list[Pair]:
    """(prompt, response) pairs from a Dataset, records, strings (prompts) or 2-tuples."""
    items = data.records if hasattr(data, "records") else data
    pairs: list[Pair] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((item, None))
        elif hasattr(item, "prompt"):
            pairs.append((item.prompt, getattr(item, "response", None)))
        else:
            prompt, response = item
            pairs.append((prompt, response))
    return pairs


def make_batches(tokenizer, pairs: Sequence[Pair], batch_size: int = 8, max_length: int = 256,
                 system: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (input_ids, attention_mask, prompt_mask, response_mask) of length-sorted pairs."""
    if batch_size < 1:
        raise SsahError(f"batch size must be at least 1, got {batch_size}")
    if max_length < 2:
        raise SsahError(f"max length must be at least 2 tokens, got {max_length}")
    encoded = [encode_pair(tokenizer, prompt, response, system, max_length) for prompt, response in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))  # stable: deterministic
    return [collate_pairs([encoded[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id)
            for start in range(0, len(order), batch_size)]


def scope_mask(batch: dict[str, torch.Tensor], token_scope: str) -> torch.Tensor:
    """Boolean [B, T] mask of the tokens a scorer sees: all non-padding, prompt or response tokens."""
    if token_scope == "all":
        return batch["attention_mask"].bool()
    if token_scope in ("prompt", "response"):
        return batch[f"{token_scope}_mask"].bool()
    raise SsahError(f"unknown token scope {token_scope!r}; use one of {', '.join(TOKEN_SCOPES)}")


# -- scoring ----------------------------------------------------------------------------------------

def compute_scores(model, tokenizer, layout: UnitLayout, pairs_or_dataset: Any, scorer: str = "variance",
                   token_scope: str | None = None, batch_size: int = 8, max_length: int = 256,
                   system: str | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Score every unit of `layout` on (prompt, response) pairs; returns kind -> float64 [layers, units].

    `pairs_or_dataset` is a Dataset, a list of Records, of (prompt, response) tuples, or of prompts.
    `token_scope` None means the scorer's default ("all" for activation scorers, "response" for snip).
    """
    pairs = as_pairs(pairs_or_dataset)
    values, _ = score_batches(model, layout, make_batches(tokenizer, pairs, batch_size, max_length, system),
                              scorer, token_scope, progress)
    return values


def score_batches(model, layout: UnitLayout, batches: Sequence[dict[str, torch.Tensor]], scorer: str = "variance",
                  token_scope: str | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """Score pre-built batches (see `make_batches`); returns (kind -> float64 [layers, units], tokens seen).

    Tokens seen are the scoped tokens for activation scorers and the loss tokens for gradient scorers.
    The model runs in eval mode (no dropout) and is returned in the mode it came in.
    """
    chosen = get_scorer(scorer)
    scope = resolve_scope(chosen, token_scope)
    if not batches:
        raise SsahError("nothing to score: the calibration set is empty; pass a dataset with records")
    run = _activation_scores if chosen.needs == "activations" else _gradient_scores
    was_training = model.training
    model.eval()
    try:
        values, tokens = run(model, layout, batches, chosen, scope, progress)
    finally:
        model.train(was_training)
    _check_finite(values, layout, chosen.name)
    return values, tokens


def _progress(iterable: Iterable, progress: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, silent in logs and tests.
    return tqdm(iterable, desc=desc, total=total, unit="batch", disable=None if progress else True,
                leave=False, dynamic_ncols=True)


def _model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def _no_tokens_error(scope: str) -> SsahError:
    hint = ("the pairs have no responses: pass responses, or use --responses refusals/self"
            if scope == "response" else "check the dataset and --max-length")
    return SsahError(f"no tokens in token scope {scope!r}; {hint}")


class _StopForward(Exception):
    """Raised by the last activation hook of a batch: nothing after it can change X."""


def _activation_scores(model, layout: UnitLayout, batches, scorer: Scorer, scope: str, progress: bool):
    blocks = [block for kind in layout.kinds for block in layout.blocks[kind]]
    modules = [model.get_submodule(block.b_module) for block in blocks]
    stats = [ChannelStats(module.weight.shape[block.b_in_dim], module.weight.device)
             for block, module in zip(blocks, modules)]
    state = {"mask": None, "fired": 0}

    def make_hook(index: int):
        def hook(module, args):
            x = args[0]
            mask = state["mask"].to(x.device)
            stats[index].update(x.reshape(-1, x.shape[-1])[mask])
            state["fired"] += 1
            if state["fired"] == len(blocks):
                raise _StopForward
        return hook

    handles = [module.register_forward_pre_hook(make_hook(i)) for i, module in enumerate(modules)]
    tokens = 0
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress, f"scoring ({scorer.name})"):
                mask = scope_mask(batch, scope)
                if not mask.any():
                    continue
                state["mask"], state["fired"] = mask.reshape(-1), 0
                with contextlib.suppress(_StopForward):
                    model(**_model_inputs(model, batch), use_cache=False)
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise _no_tokens_error(scope)
    if any(s.count != tokens for s in stats):
        raise RuntimeError("an activation hook saw a different number of tokens than the batches hold; "
                           "the model calls a B module more or less than once per forward pass")

    per_block: dict[tuple[str, int], torch.Tensor] = {}
    for block, module, channel_stats in zip(blocks, modules, stats):
        weight = module.weight.detach()
        col_sq_norms = weight.to(torch.float64).square().sum(dim=1 - block.b_in_dim)
        channel_scores = scorer.fn(channel_stats, col_sq_norms)
        # Head-level units sum the scores of their channels; channel units have width 1.
        per_block[(block.kind, block.layer)] = channel_scores[block.b_channels.to(channel_scores.device)].sum(-1)
    return _stack(per_block, layout), tokens


def _per_position_saliency(weight: torch.Tensor, grad: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """fn(weight, grad) summed over every axis but `dim`, in float32 chunks, accumulated in float64."""
    weight, grad = weight.detach().movedim(dim, 0), grad.movedim(dim, 0)
    rows = weight.shape[0]
    per_row = max(1, weight[0].numel())
    step = max(1, _SALIENCY_CHUNK // per_row)
    out = torch.empty(rows, dtype=torch.float64, device=weight.device)
    for start in range(0, rows, step):
        chunk = fn(weight[start:start + step].float(), grad[start:start + step].float())
        out[start:start + step] = chunk.reshape(chunk.shape[0], -1).sum(dim=1, dtype=torch.float64)
    return out


def _gradient_scores(model, layout: UnitLayout, batches, scorer: Scorer, scope: str, progress: bool):
    params = dict(model.named_parameters())
    targets: dict[str, list[tuple[tuple[str, int], Any]]] = {}
    per_block: dict[tuple[str, int], torch.Tensor] = {}
    for kind in layout.kinds:
        for block in layout.blocks[kind]:
            key = (kind, block.layer)
            per_block[key] = torch.zeros(block.num_units, dtype=torch.float64, device=params[block.b_weight].device)
            for owned in block.owned:
                targets.setdefault(owned.param, []).append((key, owned))

    def reduce_grad(name: str, param: torch.Tensor) -> None:
        # Runs as soon as this parameter's gradient is complete: reduce it to per-unit sums and free it.
        per_dim: dict[int, torch.Tensor] = {}
        for key, owned in targets[name]:
            if owned.dim not in per_dim:
                per_dim[owned.dim] = _per_position_saliency(param, param.grad, owned.dim, scorer.fn)
            positions = per_dim[owned.dim]
            per_block[key] += positions[owned.index.to(positions.device)].sum(-1)
        param.grad = None

    requires_grad = {name: param.requires_grad for name, param in params.items()}
    handles = []
    tokens = 0
    try:
        for name, param in params.items():
            param.requires_grad_(name in targets)
        handles = [params[name].register_post_accumulate_grad_hook(lambda p, name=name: reduce_grad(name, p))
                   for name in targets]
        for batch in _progress(batches, progress, f"scoring ({scorer.name})"):
            inputs = _model_inputs(model, batch)
            # Token t is predicted from position t - 1: the loss covers the scoped tokens after the first.
            target_mask = scope_mask(batch, scope)[:, 1:].to(inputs["input_ids"].device)
            count = int(target_mask.sum())
            if count == 0:
                continue
            logits = model(**inputs, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1][target_mask].float(), inputs["input_ids"][:, 1:][target_mask],
                                   reduction="sum")
            del logits
            loss.backward()
            tokens += count
    finally:
        for handle in handles:
            handle.remove()
        for name, param in params.items():
            param.requires_grad_(requires_grad[name])
        model.zero_grad(set_to_none=True)
    if tokens == 0:
        raise _no_tokens_error(scope)
    return {kind: value / tokens for kind, value in _stack(per_block, layout).items()}, tokens


def _stack(per_block: dict[tuple[str, int], torch.Tensor], layout: UnitLayout) -> dict[str, torch.Tensor]:
    return {kind: torch.stack([per_block[(kind, layer)].to("cpu", torch.float64) for layer in range(layout.num_layers)])
            for kind in layout.kinds}


def _check_finite(values: dict[str, torch.Tensor], layout: UnitLayout, scorer: str) -> None:
    # Forward order (layer by layer, attention before MLP): the first bad block is where the trouble starts.
    kinds = sorted(values, key=lambda kind: 0 if kind == "attn" else 1)
    for layer in range(layout.num_layers):
        for kind in kinds:
            if not torch.isfinite(values[kind][layer]).all():
                raise SsahError(f"{scorer} scores of the {kind} units of layer {layer} are not finite (NaN or Inf): "
                                "the model's activations overflow there; try --dtype fp32 or check the weights")


# -- calibration responses ----------------------------------------------------------------------------

@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[str], system: str | None = None,
                     max_new_tokens: int = 64, batch_size: int = 8, progress: bool = True) -> list[str]:
    """The model's greedy replies to `prompts` (batched, left-padded); text without special tokens."""
    device = next(model.parameters()).device
    replies: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in _progress(starts, progress, "generating replies", total=len(starts)):
        batch = encode_prompts(tokenizer, list(prompts[start:start + batch_size]), system)
        batch = {key: value.to(device) for key, value in batch.items()}
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        width = batch["input_ids"].shape[1]
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    return replies


def _reply_key(prompt: str, system: str | None, max_new_tokens: int) -> str:
    return hashlib.sha256(json.dumps([system, prompt, max_new_tokens]).encode()).hexdigest()[:32]


def cached_replies(loaded, prompts: Sequence[str], cache: Path | None, system: str | None = None,
                   max_new_tokens: int = 64, batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy replies, read from / added to `cache` (JSONL keyed by model fingerprint and prompt)."""
    fingerprint = loaded.fingerprint
    known: dict[tuple[str, str], str] = {}
    lines: list[str] = []
    if cache is not None and cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                known[(row["model_fingerprint"], row["key"])] = row["reply"]
                lines.append(line)
    keys = [_reply_key(prompt, system, max_new_tokens) for prompt in prompts]
    todo: dict[str, str] = {}  # key -> prompt: each prompt not yet cached, once, in prompt order
    for key, prompt in zip(keys, prompts):
        if (fingerprint, key) not in known:
            todo.setdefault(key, prompt)
    if todo:
        new = generate_replies(loaded.model, loaded.tokenizer, list(todo.values()), system, max_new_tokens,
                               batch_size, progress)
        for (key, prompt), reply in zip(todo.items(), new):
            known[(fingerprint, key)] = reply
            lines.append(json.dumps({"model_fingerprint": fingerprint, "key": key, "max_new_tokens": max_new_tokens,
                                     "system": system, "prompt": prompt, "reply": reply}, ensure_ascii=False))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, ("\n".join(lines) + "\n").encode("utf-8"))
    return [known[(fingerprint, key)] for key in keys]


def calibration_pairs(loaded, dataset, responses: str = "dataset", seed: int = 0, system: str | None = None,
                      max_new_tokens: int = 64, batch_size: int = 8, replies_cache: Path | None = None,
                      progress: bool = True) -> list[Pair]:
    """(prompt, response) pairs of `dataset` with responses from the dataset, built-in refusals or the model."""
    prompts = [record.prompt for record in dataset]
    if responses == "dataset":
        return [(record.prompt, record.response) for record in dataset]
    if responses == "refusals":
        refusals = [record.prompt for record in _refusals()]
        rng = random.Random(seed)
        return [(prompt, rng.choice(refusals)) for prompt in prompts]
    if responses == "self":
        replies = cached_replies(loaded, prompts, replies_cache, system, max_new_tokens, batch_size, progress)
        return list(zip(prompts, replies))
    raise SsahError(f"unknown responses source {responses!r}; use one of {', '.join(RESPONSE_SOURCES)}")


def _refusals():
    from ssah.data import load_dataset

    return load_dataset("refusals")


# -- the high-level entry point ---------------------------------------------------------------------

def _run_key(manifest: dict) -> dict:
    """The manifest fields that determine the scores; two runs with equal keys give the same result."""
    keys = ["model_fingerprint", "dataset_fingerprint", "scorer", "token_scope", "responses", "attn_unit",
            "max_length", "system"]
    if manifest.get("responses") == "refusals":
        keys += ["seed", "refusals_fingerprint"]
    if manifest.get("responses") == "self":
        keys += ["max_new_tokens"]
    scorer = SCORERS.get(manifest.get("scorer", ""))
    if scorer is None or not scorer.batch_invariant:
        keys += ["batch_size"]
    return {key: manifest.get(key) for key in keys}


def existing_run(directory: Path, manifest: dict, kind: str = "scores", filename: str = MANIFEST_FILE,
                 key=_run_key, own_files: tuple[str, ...] = (SCORES_FILE, MANIFEST_FILE, REPLIES_FILE)) -> dict | None:
    """The manifest already in `directory` if it describes the same run; None if there is none.

    Raises one clear SsahError when the folder holds a different run, or holds files of something
    else (so a mistyped --out never mixes our files into an unrelated folder).
    """
    directory = Path(directory)
    path = directory / filename
    if not path.is_file():
        foreign = [p.name for p in directory.iterdir() if p.name not in own_files
                   and not p.name.startswith(".")] if directory.is_dir() else []
        if foreign:
            raise SsahError(f"output folder {directory} is not empty and holds no {kind} (e.g. {foreign[0]}); "
                            "choose another --out or pass --force")
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_key = key(old)
    except (OSError, ValueError, AttributeError):
        raise SsahError(f"output folder {directory} holds an unreadable {filename}; pass --force to overwrite "
                        "it or choose another --out") from None
    new_key = key(manifest)
    for name, value in new_key.items():
        if old_key.get(name) != value:
            raise SsahError(f"output folder {directory} already holds other {kind} ({name}: "
                            f"{_short(old_key.get(name))} there, {_short(value)} now); pass --force to overwrite it "
                            "or choose another --out")
    return old


def _short(value: Any) -> str:
    """A value for an error line: long hashes cut to 16 characters."""
    text = repr(value)
    return text[:17] + "...'" if isinstance(value, str) and len(value) > 20 else text


def score_dataset(loaded, dataset: Any, scorer: str = "variance", responses: str = "dataset",
                  token_scope: str | None = None, batch_size: int = 8, max_length: int = 256,
                  system: str | None = None, seed: int = 0, max_new_tokens: int = 64,
                  attn_unit: str = "channel", out: str | Path | None = None, force: bool = False,
                  progress: bool = True) -> Scores:
    """Score a loaded model's units on a dataset and return (and, with `out`, save) the Scores.

    `dataset` is a Dataset or a dataset spec. `responses`: "dataset", "refusals" or "self" (see the
    module docstring). `token_scope` None means the scorer's default. With `out`, a folder that already
    holds the same run is reused (returned with `reused=True`) unless `force`; one that holds a
    different run is refused unless `force`.
    """
    from ssah import __version__

    chosen = get_scorer(scorer)
    scope = resolve_scope(chosen, token_scope)
    if responses not in RESPONSE_SOURCES:
        raise SsahError(f"unknown responses source {responses!r}; use one of {', '.join(RESPONSE_SOURCES)}")
    if isinstance(dataset, str):
        from ssah.data import load_dataset

        dataset = load_dataset(dataset)
    if len(dataset) == 0:
        raise SsahError(f"dataset {getattr(dataset, 'name', '?')!r} has no records; nothing to score")
    if responses == "dataset" and scope != "prompt":
        lacking = sum(1 for record in dataset if record.response is None)
        if lacking:
            raise SsahError(f"dataset {dataset.name!r} has {lacking} of {len(dataset)} records without a response; "
                            "use --responses refusals or self, or --token-scope prompt")
    if max_new_tokens < 1:
        raise SsahError(f"max new tokens must be at least 1, got {max_new_tokens}")
    layout = loaded.layout if attn_unit == "channel" else UnitLayout.from_model(loaded.model, attn_unit=attn_unit)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "scorer": chosen.name,
        "token_scope": scope,
        "responses": responses,
        "seed": seed,
        "dataset_name": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "num_records": len(dataset),
        "refusals_fingerprint": _refusals().fingerprint if responses == "refusals" else None,
        "max_new_tokens": max_new_tokens if responses == "self" else None,
        "model_spec": loaded.spec,
        "model_fingerprint": loaded.fingerprint,
        "model_type": layout.model_type,
        "attn_unit": layout.attn_unit,
        "num_layers": layout.num_layers,
        "units_per_layer": layout.units_per_layer,
        "batch_size": batch_size,
        "max_length": max_length,
        "system": system,
        "ssah_version": __version__,
    }
    out = Path(out) if out is not None else None
    if out is not None and not force and existing_run(out, manifest) is not None:
        scores = Scores.load(out)
        scores.reused = True
        return scores

    pairs = calibration_pairs(loaded, dataset, responses, seed, system, max_new_tokens, batch_size,
                              out / REPLIES_FILE if out is not None else None, progress)
    batches = make_batches(loaded.tokenizer, pairs, batch_size, max_length, system)
    values, tokens = score_batches(loaded.model, layout, batches, chosen.name, scope, progress)
    manifest["tokens_seen"] = tokens
    scores = Scores(values, manifest)
    if out is not None:
        scores.save(out)
    return scores
