"""Computing per-unit scores: one pass over calibration batches, every layer at once.

- Activation scorers (`variance`, the default, `wanda`, `activation`) run one no-grad forward pass per
  batch with a pre-hook on the input of every B module of every layer at once. Each hook merges the
  activations of the tokens in scope into float64 running statistics (Chan's parallel update), so the
  result depends neither on the batch size nor on padding. Once the last hook of a batch has fired the
  forward pass is stopped: the rest of the network (final layer norm, LM head) cannot change X.
  Where a norm follows B before the residual add (Gemma 2 and 3, see `ssah.units.layout`), a unit's
  term reaches the residual stream as g * B[:, j] X_j / rms(B X): the hook then sees B's output too
  and records X_j / rms(B X) per token, and B's columns are multiplied by the norm's gain g, so Eq. 1
  measures the unit where it enters the residual stream: it then matches the effect of pruning the
  unit alone (tests/test_post_norms.py). Measured at the input of B instead, scores miss the gain
  (per channel, and on Gemma 3 growing with depth) and the
  per-token scale (shared within a sublayer, not across sublayers), so they rank units wrongly within
  a layer and by orders of magnitude across layers. Families without such a norm score as before.
- Gradient scorers (`snip`) run one forward and one backward per batch for all layers at once, with
  gradients enabled only on parameters some unit owns. A hook on each such parameter reduces its
  gradient to per-unit sums as soon as it is accumulated and then frees it, so no per-weight score
  survives the backward pass. The loss is the summed next-token NLL of the tokens in scope (by default
  the response); the score is divided by the number of loss tokens. The absolute value is taken per
  batch, so sequences sharing a batch can cancel: snip depends on the batch size (batch size 1 gives
  per-sequence SNIP), and a run with another batch size counts as another run.

Batches are formed from length-sorted pairs (less padding); the order does not change the scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssah.data.chat import collate_pairs, encode_pair
from ssah.defaults import TOKEN_SCOPES
from ssah.errors import SsahError
from ssah.units.layout import UnitLayout
from ssah.units.scorers import ChannelStats, Scorer, get_scorer, resolve_scope

Pair = tuple[str, "str | None"]

# Gradient saliency is computed in float32 chunks of at most this many entries, so a bf16 model
# never needs a full-size float32 copy of a parameter.
_SALIENCY_CHUNK = 1 << 22


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


@torch.inference_mode()
def response_nll(model, batches: list[dict[str, torch.Tensor]]) -> tuple[list[float], list[int]]:
    """Per pair of `make_batches` batches: the negative log-likelihood summed over its response tokens,
    and their count (teacher-forced)."""
    device = next(model.parameters()).device
    nll, tokens = [], []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        # position t predicts token t+1: score the response tokens from the logits one step earlier
        targets = batch["input_ids"][:, 1:].to(device)
        keep = batch["response_mask"][:, 1:].to(device).bool()
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll += (-(logprobs * keep)).sum(dim=1).tolist()
        tokens += keep.sum(dim=1).tolist()
    return nll, tokens


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
    """Raised by the last block-input hook of a forward pass: nothing after it can change their inputs."""


@contextlib.contextmanager
def block_inputs(model, modules: list, on_input, post_norms: list | None = None):
    """Forward pre-hooks handing each module's input to `on_input(index, x)`; yields `forward(batch)`,
    which runs the model on a batch and stops it once the last module has had its input.

    Where `post_norms[index]` is a `PostNorm`, the module's input reaches `on_input` scaled per token
    by that norm's 1 / rms of the module's output (a forward hook then sees both)."""
    fired = [0]

    def count() -> None:
        fired[0] += 1
        if fired[0] == len(modules):
            raise _StopForward

    def make_hook(index: int):
        def hook(module, args):
            on_input(index, args[0])
            count()
        return hook

    def make_scaled_hook(index: int, post_norm):
        def hook(module, args, output):
            on_input(index, args[0].to(torch.float64) * post_norm.scale(model, output))
            count()
        return hook

    def forward(batch: dict[str, torch.Tensor]) -> None:
        fired[0] = 0
        with contextlib.suppress(_StopForward):
            model(**_model_inputs(model, batch), use_cache=False)

    post_norms = post_norms or [None] * len(modules)
    handles = [module.register_forward_pre_hook(make_hook(i)) if post_norm is None
               else module.register_forward_hook(make_scaled_hook(i, post_norm))
               for i, (module, post_norm) in enumerate(zip(modules, post_norms))]
    try:
        yield forward
    finally:
        for handle in handles:
            handle.remove()


def _activation_scores(model, layout: UnitLayout, batches, scorer: Scorer, scope: str, progress: bool):
    blocks = [block for kind in layout.kinds for block in layout.blocks[kind]]
    modules = [model.get_submodule(block.b_module) for block in blocks]
    stats = [ChannelStats(module.weight.shape[block.b_in_dim], module.weight.device)
             for block, module in zip(blocks, modules)]
    current = {"mask": None}

    def on_input(index: int, x: torch.Tensor) -> None:
        stats[index].update(x.reshape(-1, x.shape[-1])[current["mask"].to(x.device)])

    tokens = 0
    post_norms = [block.post_norm for block in blocks]
    with torch.no_grad(), block_inputs(model, modules, on_input, post_norms) as forward:
        for batch in _progress(batches, progress, f"scoring ({scorer.name})"):
            mask = scope_mask(batch, scope)
            if not mask.any():
                continue
            current["mask"] = mask.reshape(-1)
            forward(batch)
            tokens += int(mask.sum())
    if tokens == 0:
        raise _no_tokens_error(scope)
    if any(s.count != tokens for s in stats):
        raise RuntimeError("an activation hook saw a different number of tokens than the batches hold; "
                           "the model calls a B module more or less than once per forward pass")

    per_block: dict[tuple[str, int], torch.Tensor] = {}
    for block, channel_stats in zip(blocks, stats):
        col_sq_norms = block.residual_weight(model).square().sum(dim=1 - block.b_in_dim)
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
