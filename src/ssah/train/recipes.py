"""Library-first training recipes: fine-tune (plain, frozen units, LoRA) and align inside a budget.

`finetune` and `align` are what `ssah finetune`, `ssah align` and the pipeline's stages call. Each
trains a loaded model in place, saves it as a normal Hugging Face folder with `train.json` (the
record: settings, loss curve, the freezing check) and `loss.png`, and returns the record. A folder
that already holds a model trained from the same inputs is reused (`ssah.artifacts`).

    record = finetune(loaded, load_dataset("benign:train"), TrainSettings(lr=2e-5), "runs/ft",
                      freeze=mask_from_expression(groups, "SCU+CU"))
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssah.artifacts import Artifact, fingerprint
from ssah.errors import SsahError
from ssah.io import atomic_dir, save_png
from ssah.models.spec import SAVED_MODEL_FILES
from ssah.outputs import OutputKind
from ssah.train.data import AlignmentData, alignment_data
from ssah.train.settings import TrainConfig, TrainSettings
from ssah.train.sharding import is_main_process

log = logging.getLogger(__name__)

RECORD_FILE = "train.json"
MODEL = OutputKind("model", (RECORD_FILE, "loss.png", *SAVED_MODEL_FILES), record=RECORD_FILE, whole=True)

Writer = Callable[[Path], contextlib.AbstractContextManager[Path]]


def limited(dataset, limit: int | None, seed: int):
    """A seeded sample of `limit` records (dataset order kept), or the dataset when it is smaller."""
    return dataset.sample(min(limit, len(dataset)), seed) if limit else dataset


def plot_loss(curve: list[float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot(range(1, len(curve) + 1), curve)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def fit(model, tokenizer, pairs, config: TrainConfig, freezer=None, avoid: dict | None = None):
    """Train `model` in place with the loop `config.backend` names; returns the `TrainResult`. A
    frozen entry that changed stops here (`ssah.interventions.freeze.ensure_intact`), before anything
    trained is saved or evaluated."""
    from ssah.interventions.freeze import ensure_intact

    if config.backend == "trl":
        from ssah.train.trl_backend import train_with_trl

        if avoid and config.avoid_weight:
            raise SsahError("the avoided-opening loss needs the ssah training loop (train.backend: ssah)")
        result = train_with_trl(model, tokenizer, pairs, config, freezer=freezer)
    else:
        from ssah.train.sft import train_sft

        result = train_sft(model, tokenizer, pairs, config, freezer=freezer,
                           avoid=avoid if config.avoid_weight else None)
    ensure_intact(result.check)
    return result


def train_model(loaded, pairs, config: TrainConfig, out: str | Path, *, identity: dict, record: dict,
                freezer=None, lora: bool = False, avoid: dict | None = None, replace: bool = False,
                force: bool = False, writer: Writer | None = None) -> dict:
    """Train `loaded.model` in place on `pairs` and save it to `out` with its record; a folder that
    holds a model trained from the same `identity` is reused (its record returned) instead."""
    from ssah.interventions.freeze import trainable_share
    from ssah.train.lora import apply_lora, merge_lora

    artifact = Artifact(Path(out) / RECORD_FILE, "a trained model", identity)
    found = artifact.lookup(force=force, replace=replace)
    total = sum(p.numel() for p in loaded.model.parameters())
    if found is not None:
        log.info("%s already holds this trained model; reused", out)
        if "trainable_share" not in found and not lora:  # a record written before the share was kept
            found["trainable_share"] = trainable_share(loaded.model, freezer, total)
        return found
    model = apply_lora(loaded.model) if lora else loaded.model
    share = trainable_share(model, freezer, total)
    result = fit(model, loaded.tokenizer, pairs, config, freezer=freezer, avoid=avoid)
    diverged = next((step for step, loss in enumerate(result.loss_curve, 1) if not math.isfinite(loss)), None)
    if diverged is not None:  # the weights are NaN or infinite too: saving them would only hide it
        raise SsahError(f"training diverged: the loss is {result.loss_curve[diverged - 1]} at step {diverged} "
                        f"(learning rate {config.lr:g}); lower the learning rate. Nothing was saved to {out}")
    if lora:
        model = merge_lora(model)
    record = {**record, "source_model": loaded.spec, "config": config.to_dict(), "trainable_share": share,
              "result": result.to_dict()}
    if not is_main_process():  # one process of a multi-process job writes the model
        return record
    with (writer or atomic_dir)(Path(out)) as tmp:
        model.save_pretrained(tmp, **({"state_dict": result.state_dict} if result.state_dict is not None else {}))
        loaded.tokenizer.save_pretrained(tmp)
        plot_loss(result.loss_curve, tmp / "loss.png")
        record = Artifact(tmp / RECORD_FILE, artifact.kind, identity).save(record)
    return record


def finetune(loaded, dataset, settings: TrainSettings, out: str | Path, *, seed: int = 0, freeze=None,
             trainable=None, lora: bool = False, frozen_multiplier: float = 2.0, replace: bool = False,
             force: bool = False, writer: Writer | None = None) -> dict:
    """Supervised fine-tuning (loss on response tokens) of `loaded.model` on `dataset` (a seeded
    sample of `settings.limit` records), optionally with the units of `freeze` (a `UnitMask`) kept
    bit-identical, or with only the units of `trainable` free to change (every other entry frozen,
    parameters no unit owns included), trained `frozen_multiplier` times longer; or with LoRA adapters
    merged on save. The record holds `trainable_share`: the share of entries training may change."""
    from ssah.interventions.freeze import UnitFreezer

    if freeze is not None and trainable is not None:
        raise SsahError("give the units to freeze or the only units that train, not both")
    if (freeze is not None or trainable is not None) and lora:
        raise SsahError("freezing and LoRA cannot be combined: LoRA leaves every base weight frozen already")
    mask, train_only = (trainable, True) if trainable is not None else (freeze, False)
    data = limited(dataset, settings.limit, seed)
    lacking = sum(1 for record in data if not record.response)
    if lacking:
        raise SsahError(f"{lacking} of {len(data)} records of {data.name} have no response; fine-tuning needs "
                        "(prompt, response) pairs")
    config = TrainConfig.of(settings.scaled(frozen_multiplier if mask is not None else 1.0), seed=seed,
                            avoid_weight=0.0)
    identity = {"model": loaded.fingerprint, "data": data.fingerprint, "lora": lora, "config": config.to_dict(),
                "freeze": freeze.digest() if freeze is not None else None}
    if trainable is not None:  # (the key is absent otherwise, so earlier models keep their identity)
        identity["trainable"] = trainable.digest()
    record = {"kind": "finetune", "data": data.name, "frozen_units": freeze.count() if freeze is not None else 0}
    if trainable is not None:
        record["trainable_units"] = trainable.count()
    freezer = UnitFreezer(loaded.model, loaded.layout, mask, train_only=train_only) if mask is not None else None
    with freezer or contextlib.nullcontext():
        return train_model(loaded, [(r.prompt, r.response) for r in data], config, out, identity=identity,
                           record=record, freezer=freezer, lora=lora, replace=replace, force=force, writer=writer)


@dataclass
class AlignInputs:
    """What alignment trains on (see `ssah.train.data.alignment_data`) and how hard it avoids
    refusal openings at the start of borderline replies (`avoid_weight`; 0: off)."""

    harmful: object
    benign: object
    refusals: object
    borderline: object | None = None
    borderline_tokens: int = 48
    borderline_repeats: int = 1
    recovery_lengths: list[int] = field(default_factory=list)
    avoid_weight: float = 0.0
    generation_dtype: str = "model"  # the weights' dtype while the model writes its own replies

    def identity(self) -> dict:
        data = {name: getattr(self, name).fingerprint for name in ("harmful", "benign", "refusals")}
        if self.borderline is not None:
            data.update(borderline=self.borderline.fingerprint, borderline_tokens=self.borderline_tokens,
                        borderline_repeats=self.borderline_repeats)
        if self.generation_dtype != "model":  # other own replies, another model
            data["generation_dtype"] = self.generation_dtype
        return {**data, "recovery": list(self.recovery_lengths), "avoid_weight": self.avoid_weight}


def align(loaded, inputs: AlignInputs, settings: TrainSettings, out: str | Path, *, budget=None, seed: int = 0,
          batch_size: int = 8, data: AlignmentData | None = None, cache_dir: str | Path | None = None,
          replace: bool = False, force: bool = False, writer: Writer | None = None) -> dict:
    """Safety alignment SFT of `loaded.model` that trains only the units of `budget` (a `UnitMask`;
    None: all parameters); every other entry stays bit-identical. `data` reuses alignment data built
    once for several runs; otherwise it is built here (the model's replies generated `batch_size` at a
    time, cached in `cache_dir`). The record's `data` holds how many pairs of each kind it used."""
    from ssah.interventions.freeze import UnitFreezer

    config = TrainConfig.of(settings, seed=seed, avoid_weight=inputs.avoid_weight)
    identity = {"model": loaded.fingerprint, **inputs.identity(), "config": config.to_dict(),
                "budget": budget.digest() if budget is not None else "all"}
    artifact = Artifact(Path(out) / RECORD_FILE, "a trained model", identity)
    found = artifact.lookup(force=force, replace=replace)
    if found is not None:
        return found
    if data is None:
        data = alignment_data(loaded, inputs.harmful, inputs.benign, inputs.refusals, borderline=inputs.borderline,
                              borderline_tokens=inputs.borderline_tokens,
                              borderline_repeats=inputs.borderline_repeats,
                              recovery_lengths=inputs.recovery_lengths, seed=seed, batch_size=batch_size,
                              cache_dir=cache_dir, generation_dtype=inputs.generation_dtype)
    freezer = UnitFreezer(loaded.model, loaded.layout, budget, train_only=True) if budget is not None else None
    units = budget.count() if budget is not None else loaded.layout.total_units
    record = {"kind": "align", "data": data.counts, "budget_units": units,
              "budget_share": budget.share() if budget is not None else 1.0,
              "pairs_fingerprint": fingerprint([list(pair) for pair in data.pairs])}
    with freezer or contextlib.nullcontext():
        return train_model(loaded, data.pairs, config, out, identity=identity, record=record, freezer=freezer,
                           avoid=data.avoid, force=True, writer=writer)
