"""Training hyper-parameters: one type for configs, CLI options and the training loop (no torch).

`TrainSettings` is what a user sets (a config's `align.train` / `finetune.train`, the options of
`ssah finetune` and `ssah align`, which are generated from its fields); `TrainConfig` adds what
the loop needs beyond that (seed, gradient clipping, system prompt, avoided-opening weight).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ssah.defaults import FINETUNE_LR
from ssah.settings import Seed, Settings

MAX_EPOCHS = 10_000  # more passes than any fine-tuning recipe uses; a typo like 1e9 is refused, not run for years


class TrainSettings(Settings):
    """Fine-tuning hyper-parameters. Defaults follow Qi et al. (2023) except batch size."""

    lr: float = Field(FINETUNE_LR, gt=0, description="learning rate")
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="passes over the data (ignored with max_steps)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    batch_size: int = Field(8, ge=1, description="examples per step and process")
    grad_accum: int = Field(1, ge=1, description="batches accumulated per optimizer step")
    max_length: int = Field(256, ge=2, description="tokens per example; the response is cut first")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    warmup: float = Field(0.0, ge=0, lt=1, description="share of steps with linear warm-up")
    bf16: bool = Field(False, description="bf16 autocast (weights keep their dtype)")
    limit: int | None = Field(None, ge=1, description="train on a seeded sample of N examples (None: all)")
    backend: Literal["ssah", "trl"] = Field("ssah", description="training loop: ssah's own, or TRL's SFTTrainer "
                                                                "(no prefilled pairs, no avoided-opening loss)")
    shard: Literal["none", "fsdp2"] = Field("none", description="fsdp2: shard the parameters over the processes "
                                                               "of torchrun / accelerate launch (ssah loop)")

    @model_validator(mode="after")
    def _shard_in_own_loop(self) -> TrainSettings:
        if self.shard != "none" and self.backend != "ssah":
            raise ValueError(f"shard {self.shard} runs in ssah's training loop; set backend: ssah (--backend ssah)")
        return self

    def scaled(self, multiplier: float) -> TrainSettings:
        """These settings trained `multiplier` times longer (the paper doubles frozen runs)."""
        if multiplier == 1.0:
            return self
        steps = self.max_steps and round(self.max_steps * multiplier)
        return self.model_copy(update={"epochs": self.epochs * multiplier, "max_steps": steps})


class TrainConfig(TrainSettings):
    """`TrainSettings` plus what the loop takes from elsewhere (the run's seed, a system prompt)."""

    # a frozen run trains `frozen_epochs_multiplier` times the user's (bounded) epochs
    epochs: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: Seed = 0
    system: str | None = None
    # weight of the avoided-opening loss: -log(1 - P(reply opens with an avoided token)) at the first
    # reply position of each example that `train_sft(avoid=...)` gives openings to avoid
    avoid_weight: float = Field(1.0, ge=0)
    # Qi et al.'s (ICLR 2025) token-wise constrained objective instead of cross-entropy: beta_t per reply
    # token (the last value holds for every later token); None: plain cross-entropy (`ssah.train.sft`)
    token_betas: list[float] | None = None

    @model_validator(mode="after")
    def _betas(self) -> TrainConfig:
        if self.token_betas is not None:
            if not self.token_betas or any(b <= 0 for b in self.token_betas):
                raise ValueError(f"token_betas are positive, got {self.token_betas}")
            if self.backend != "ssah":
                raise ValueError("the constrained objective (token_betas) runs in ssah's training loop: backend ssah")
        return self

    @classmethod
    def of(cls, settings: TrainSettings, **extra) -> TrainConfig:
        return cls(**{**settings.model_dump(), **extra})
