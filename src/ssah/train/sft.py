"""Supervised fine-tuning with loss on response tokens only, through `accelerate`.

The LM head runs only where a response token is predicted (`response_logits`): a prompt position's
logits would be thrown away by the loss, and on a small model with a large vocabulary the head and
its softmax are a large share of a step.

One loop serves benign fine-tuning (the attack), frozen-unit fine-tuning (the paper's remedy),
LoRA (the PEFT baseline) and alignment inside a unit budget. Run it in one process, or
data-parallel with `accelerate launch`: frozen entries are masked before the gradient
all-reduce and restored on every rank after every step, so they stay bit-identical everywhere.
With `shard: fsdp2` every process holds shards of the parameters instead (`ssah.train.sharding`).
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
             avoid: dict[str, list[str]] | None = None):
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

    def collate(batch_items):
        batch = collate_pairs([e for e, _ in batch_items], tokenizer.pad_token_id)
        labels = batch["input_ids"].masked_fill(~batch["response_mask"], -100)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        if width:
            out["avoid_ids"] = torch.tensor([list(a) + [-1] * (width - len(a)) for _, a in batch_items])
            out["reply_start"] = torch.tensor([e.prompt_len - 1 for e, _ in batch_items])  # predicts token 1
        return out

    return DataLoader(items, batch_size=config.batch_size, shuffle=True, collate_fn=collate, generator=generator)


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
    learned = torch.zeros_like(labels, dtype=torch.bool)
    learned[:, :-1] = labels[:, 1:] != -100
    with response_logits(model, learned):
        logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][learned[:, :-1]])
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
    loader = _batches(tokenizer, pairs, config, torch.Generator().manual_seed(config.seed), avoid)
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
