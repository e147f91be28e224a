"""Fine-tuning through TRL's `SFTTrainer`, what users fine-tune with, with ssah's freeze callback.

`train_with_trl` takes the same inputs as `ssah.train.sft.train_sft` ((prompt, response) pairs and a
`TrainConfig`) and returns the same `TrainResult`, so a recipe can use either loop. The pairs become
a conversational prompt-completion dataset (with the system prompt when `config.system` is set) and
the loss covers the completion only. A `UnitFreezer` is attached through `freeze_callback` before the
first step; its frozen entries stay bit-identical (the result's `check` says so). Prefilled pairs
(three items) are not supported here: use `train_sft`.
"""

from __future__ import annotations

import math
import tempfile
import time

from ssah.errors import SsahError
from ssah.interventions.freeze import TrainingCheck, UnitFreezer, freeze_callback
from ssah.train.settings import TrainConfig
from ssah.train.sft import TrainResult


def _dataset(pairs: list[tuple[str, ...]], system: str | None):
    from datasets import Dataset

    if any(len(pair) > 2 for pair in pairs):
        raise SsahError("the TRL backend trains (prompt, response) pairs; prefilled pairs need the ssah loop")
    head = [{"role": "system", "content": system}] if system else []
    return Dataset.from_list([{"prompt": [*head, {"role": "user", "content": prompt}],
                               "completion": [{"role": "assistant", "content": response}]}
                              for prompt, response in pairs])


def _arguments(config: TrainConfig, steps: int, out: str):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, weight_decay=config.weight_decay,
        lr_scheduler_type="linear", warmup_steps=int(config.warmup * steps), max_grad_norm=config.grad_clip,
        seed=config.seed, data_seed=config.seed, bf16=config.bf16, max_length=config.max_length,
        completion_only_loss=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=not _cuda(), dataloader_num_workers=0)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train_with_trl(model, tokenizer, pairs: list[tuple[str, ...]], config: TrainConfig,
                   freezer: UnitFreezer | None = None) -> TrainResult:
    """Train `model` in place with TRL's SFTTrainer; see the module docstring."""
    from trl import SFTTrainer

    if not pairs:
        raise SsahError("no training examples: the dataset is empty")
    data = _dataset(pairs, config.system)
    steps = config.max_steps or max(1, math.ceil(len(pairs) / (config.batch_size * config.grad_accum)
                                                 * config.epochs))
    check = TrainingCheck(model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssah-trl-") as scratch:
        trainer = SFTTrainer(model=model, args=_arguments(config, steps, scratch), train_dataset=data,
                             processing_class=tokenizer,
                             callbacks=[freeze_callback(freezer)] if freezer is not None else None)
        if len(trainer.train_dataset) == 0:  # TRL drops examples whose reply was cut off entirely
            raise SsahError(f"every example's prompt fills max_length {config.max_length}; raise it")
        trainer.train()
    model.eval()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(steps=trainer.state.global_step, loss_curve=[float(v) for v in losses])
    result.seconds = time.perf_counter() - start
    result.check = check.report(model, freezer)
    return result
