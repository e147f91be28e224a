"""Supervised fine-tuning with loss on response tokens only, through `accelerate`.

The LM head runs only where a response token is predicted (`response_logits`): a prompt position's
logits would be thrown away by the loss, and on a small model with a large vocabulary the head and
its softmax are a large share of a step.

One loop serves benign fine-tuning (the attack), frozen-unit fine-tuning (the paper's remedy),
LoRA (the PEFT baseline) and alignment inside a unit budget. Run it in one process, or
data-parallel with `accelerate launch`: frozen entries are masked before the gradient
all-reduce and restored on every rank after every step, so they stay bit-identical everywhere.
With `shard: fsdp2` every process holds shards of the parameters instead (`ssah.train.sharding`).

With `config.token_betas` the loss is Qi et al.'s token-wise constrained objective ("Safety Alignment
Should Be Made More Than Just a Few Tokens Deep", ICLR 2025) in place of cross-entropy: per reply token
t, (2 / beta_t) (softplus(-beta_t d_t) - log 2) with d_t = log p_trained(y_t) - log p_start(y_t), the
starting model's log-probabilities computed once before training. A large beta_t keeps token t's
probability near the starting model's (the first tokens, where a reply decides to refuse); as beta_t
falls to 0 the term becomes cross-entropy plus a constant. The log 2 makes the loss 0 at the start.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ssah.data.chat import collate_pairs, encode_pair
from ssah.errors import SsahError
from ssah.interventions.freeze import TrainingCheck, UnitFreezer
from ssah.train.settings import TrainConfig
from ssah.train.sharding import full_state_dict, shard_model

__all__ = ["TrainConfig", "TrainResult", "avoided_opening_loss", "opening_tokens", "response_loss", "train_sft"]


@dataclass
class TrainResult:
    steps: int
    loss_curve: list[float] = field(default_factory=list)
    seconds: float = 0.0
    check: dict = field(default_factory=dict)
    # sharded training: the trained weights gathered whole on the main process (empty elsewhere)
    state_dict: dict | None = field(default=None, repr=False)

    @property
    def final_loss(self) -> float | None:
        tail = self.loss_curve[-max(1, len(self.loss_curve) // 10):]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict:
        return {"steps": self.steps, "final_loss": self.final_loss, "seconds": self.seconds,
                "loss_curve": self.loss_curve, "check": self.check}


def opening_tokens(tokenizer, prompt: str, texts: list[str], system: str | None = None,
                   max_length: int | None = None) -> set[int]:
    """The first reply token of each text, tokenised in context as a reply to `prompt`."""
    firsts = set()
    for text in texts:
        e = encode_pair(tokenizer, prompt, text, system, max_length)
        if len(e.input_ids) > e.prompt_len:
            firsts.add(e.input_ids[e.prompt_len])
    return firsts


def _batches(tokenizer, pairs: list[tuple[str, ...]], config: TrainConfig, generator: torch.Generator,
             avoid: dict[str, list[str]] | None = None, model=None):
    # (prompt, response) or (prompt, response, prefill): a prefill opens the reply without loss on it
    encoded = [encode_pair(tokenizer, pair[0], pair[1], config.system, config.max_length, *pair[2:]) for pair in pairs]
    # A prompt that fills max_length leaves no response token to learn from (and a NaN loss).
    kept = [(e, pair) for e, pair in zip(encoded, pairs) if len(e.input_ids) > e.prompt_len]
    if not kept:
        raise SsahError(f"every example's prompt fills --max-length {config.max_length}; raise it")
    firsts: dict[str, set[int]] = {}
    items = []
    for e, pair in kept:
        avoided: tuple[int, ...] = ()
        if avoid and pair[0] in avoid and len(pair) == 2:
            if pair[0] not in firsts:
                firsts[pair[0]] = opening_tokens(tokenizer, pair[0], avoid[pair[0]], config.system,
                                                 config.max_length)
            # the example's own first token is learned, never avoided
            avoided = tuple(sorted(firsts[pair[0]] - {e.input_ids[e.prompt_len]}))
        items.append((e, avoided))
    width = max((len(a) for _, a in items), default=0)
    if config.token_betas is not None:  # the starting model's log-probabilities, one list per example
        starts = reference_logprobs(model, tokenizer, [e for e, _ in items], config)
        items = [(e, a, r) for (e, a), r in zip(items, starts)]

    def collate(batch_items):
        batch = collate_pairs([item[0] for item in batch_items], tokenizer.pad_token_id)
        labels = batch["input_ids"].masked_fill(~batch["response_mask"], -100)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        if width:
            out["avoid_ids"] = torch.tensor([list(item[1]) + [-1] * (width - len(item[1])) for item in batch_items])
            out["reply_start"] = torch.tensor([item[0].prompt_len - 1 for item in batch_items])  # predicts token 1
        if config.token_betas is not None:
            out["start_logp"] = _aligned(batch_items, labels.shape[1])
            out["betas"] = torch.tensor(config.token_betas, dtype=torch.float32)
        return out

    return DataLoader(items, batch_size=config.batch_size, shuffle=True, collate_fn=collate, generator=generator)


def reference_logprobs(model, tokenizer, encoded: list, config: TrainConfig) -> list[torch.Tensor]:
    """log p(token) of each example's response tokens under `model` as it is now (before training), under
    the training's autocast so that the objective's d_t starts at 0."""
    out = []
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                              enabled=config.bf16)
    with torch.no_grad(), autocast:
        for start in range(0, len(encoded), config.batch_size):
            chunk = encoded[start:start + config.batch_size]
            batch = collate_pairs(chunk, tokenizer.pad_token_id)
            labels = batch["input_ids"].masked_fill(~batch["response_mask"], -100)
            learned = torch.zeros_like(labels, dtype=torch.bool)
            learned[:, :-1] = labels[:, 1:] != -100
            with response_logits(model, learned):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = -torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][learned[:, :-1]],
                                                      reduction="none")
            counts = learned.sum(dim=1).tolist()
            out += list(torch.split(logp.cpu(), counts))
    model.train(was_training)
    return out


def _aligned(batch_items, width: int) -> torch.Tensor:
    """The examples' starting log-probabilities laid out like their response tokens ([batch, width]: the
    value at a token's position is its log-probability given what precedes it; 0 elsewhere)."""
    out = torch.zeros(len(batch_items), width)
    for row, (e, _, logp) in enumerate(batch_items):
        out[row, e.prompt_len:e.prompt_len + len(logp)] = logp
    return out


def constrained_loss(logits: torch.Tensor, targets: torch.Tensor, start_logp: torch.Tensor,
                     positions: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Qi et al.'s token-wise constrained objective over learned tokens (module docstring): `positions`
    the 1-based index of each token in its reply, `betas` beta per position (the last for every later one)."""
    logp = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    beta = betas[(positions - 1).clamp(max=len(betas) - 1)]
    gap = logp - start_logp
    return ((2 / beta) * (torch.nn.functional.softplus(-beta * gap) - math.log(2))).mean()


def avoided_opening_loss(logits: torch.Tensor, reply_start: torch.Tensor,
                         avoid_ids: torch.Tensor) -> torch.Tensor | None:
    """Mean over rows with openings to avoid of -log(1 - P(first reply token is one of them)).

    An unlikelihood loss (Welleck et al., 2020) on one position: the one where a reply decides
    between answering and refusing. None when no row in the batch has openings to avoid.
    """
    rows = (avoid_ids >= 0).any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    return _unlikelihood(logits[rows, reply_start[rows]], avoid_ids[rows])


def _unlikelihood(opening_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log(1 - P(any of `ids`)) per row of `opening_logits` [rows, vocab], averaged (ids < 0: none)."""
    logp = torch.log_softmax(opening_logits.float(), dim=-1)
    p_avoided = (logp.gather(1, ids.clamp(min=0)).exp() * (ids >= 0)).sum(dim=1)
    return -torch.log1p(-p_avoided.clamp(max=1 - 1e-6)).mean()


@contextlib.contextmanager
def response_logits(model, rows: torch.Tensor):
    """Inside, `model`'s LM head sees only the hidden states at `rows` ([batch, positions] bool), so its
    logits come back as [rows.sum(), vocab]. Scaling or soft-capping after the head is per element,
    so every family's logits at those positions are what the full forward gives."""
    head = getattr(model, "module", model).get_output_embeddings()  # inside a data-parallel wrapper
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def response_loss(model, batch: dict, avoid_weight: float = 0.0) -> torch.Tensor:
    """The training loss of one batch, with the LM head applied only at positions whose next token is
    learned (labels != -100, shifted by one): their mean cross-entropy (what the model's own loss gives
    from the full logits), plus `avoid_weight` x `avoided_opening_loss` when the batch has openings to
    avoid (at each reply start, a position whose next token is always learned)."""
    batch = dict(batch)
    labels = batch.pop("labels")
    avoid_ids, reply_start = batch.pop("avoid_ids", None), batch.pop("reply_start", None)
    start_logp, betas = batch.pop("start_logp", None), batch.pop("betas", None)
    learned = torch.zeros_like(labels, dtype=torch.bool)
    learned[:, :-1] = labels[:, 1:] != -100
    with response_logits(model, learned):
        logits = model(**batch).logits
    targets = labels[:, 1:][learned[:, :-1]]
    if start_logp is None:
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    else:  # each learned token's place in its reply (1 = the reply's first token)
        positions = learned.long().cumsum(dim=1)[learned]
        loss = constrained_loss(logits, targets, start_logp[:, 1:][learned[:, :-1]], positions, betas)
    if avoid_ids is not None and avoid_weight:
        rows = (avoid_ids >= 0).any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            where = learned.flatten().long().cumsum(0).view_as(learned) - 1  # row of `logits` per position
            loss = loss + avoid_weight * _unlikelihood(logits[where[rows, reply_start[rows]]], avoid_ids[rows])
    return loss


def train_sft(model, tokenizer, pairs: list[tuple[str, ...]], config: TrainConfig,
              freezer: UnitFreezer | None = None, progress: bool = True,
              avoid: dict[str, list[str]] | None = None) -> TrainResult:
    """Train `model` in place on (prompt, response) pairs; returns the loss curve and checks.

    A pair may carry a third item, a prefill: reply text before the response, seen but not learned.
    `avoid` maps prompts to replies the model should not open with (e.g. refusals, for safe prompts
    that sound unsafe): their first tokens get `avoided_opening_loss`, weighted by
    `config.avoid_weight`, at the start of the reply in every unprefilled pair with that prompt.

    With a `freezer`, its frozen entries are restored after every optimizer step and the result's
    `check` reports their largest change (0 when the guarantee holds).
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    if not pairs:
        raise SsahError("no training examples: the dataset is empty")
    missing = sum(1 for pair in pairs if not pair[1])
    if missing:
        raise SsahError(f"{missing} training examples have no response; fine-tuning needs (prompt, response) pairs")
    set_seed(config.seed)
    random.seed(config.seed)
    sharded = config.shard == "fsdp2"
    accelerator = _accelerator(config, frozen=freezer is not None)
    loader = _batches(tokenizer, pairs, config, torch.Generator().manual_seed(config.seed), avoid, model)
    if not any(p.requires_grad for p in model.parameters()):
        raise SsahError("nothing to train: every parameter is frozen (check the mask or budget)")
    check = TrainingCheck(model)
    if sharded:
        shard_model(model, bf16=config.bf16)
    trainable = [p for p in model.parameters() if p.requires_grad]  # the shards, when sharded
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if freezer is not None:
        freezer.wrap_optimizer(optimizer)  # before prepare: the accelerate wrapper calls this step()

    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(config.warmup * total),
                              num_training_steps=total)
    model.train()
    if sharded:  # FSDP2 already spreads the model; accelerate splits the data and steps the optimizer
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    start = time.perf_counter()
    result = _loop(accelerator, model, optimizer, loader, scheduler, trainable, config, total, progress)
    model = accelerator.unwrap_model(model)
    model.eval()
    result.seconds = time.perf_counter() - start
    result.check = check.report(model, freezer)
    if sharded:
        result.state_dict = full_state_dict(model)
    return result


def _accelerator(config: TrainConfig, frozen: bool):
    from accelerate import Accelerator

    # cpu=True lets accelerate run data-parallel on CPUs (gloo) under torchrun/accelerate launch. Sharded
    # runs get bf16 from FSDP2's mixed-precision policy instead of accelerate's autocast.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if config.bf16 and config.shard == "none" else "no",
                              gradient_accumulation_steps=config.grad_accum)
    if frozen and accelerator.distributed_type.value == "DEEPSPEED":
        raise SsahError("frozen units need DDP or --shard fsdp2: DeepSpeed ZeRO keeps its own partitions and master "
                        "weights, which the freezer cannot reach")
    return accelerator


def _loop(accelerator, model, optimizer, loader, scheduler, trainable, config: TrainConfig, total: int,
          progress: bool) -> TrainResult:
    """Optimizer steps until `total`; the loss curve holds one mean loss per optimizer step."""
    from tqdm.auto import tqdm

    result = TrainResult(steps=0)
    bar = tqdm(total=total, desc="train", disable=not (progress and accelerator.is_main_process))
    window: list[float] = []
    while result.steps < total:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = response_loss(model, batch, config.avoid_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip:
                    accelerator.clip_grad_norm_(trainable, config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(float(loss.detach()))
            if accelerator.sync_gradients:
                result.steps += 1
                result.loss_curve.append(sum(window) / len(window))
                window.clear()
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss_curve[-1]:.3f}")
                if result.steps >= total:
                    break
    bar.close()
    return result
