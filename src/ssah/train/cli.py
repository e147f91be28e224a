"""`ssah finetune` and `ssah align`: thin adapters over `ssah.train.recipes`.

Their training options are generated from `ssah.train.settings.TrainSettings`, the type configs
use too; everything a user can get wrong is checked before the model loads.
"""

from __future__ import annotations

import contextlib
import logging
import os

import click

from ssah.cli_common import (
    FINITE,
    SEED,
    FiniteFloat,
    check_model_spec,
    load_from_options,
    model_options,
    output_folder,
    settings_options,
)
from ssah.defaults import ALIGN_LR, FINETUNE_LR
from ssah.errors import SsahError
from ssah.train.settings import TrainSettings

log = logging.getLogger("ssah")


def common_options(func):
    func = click.option("--force", is_flag=True, help="replace an output folder ssah wrote from other inputs")(func)
    func = click.option("--out", required=True, type=click.Path(), help="output model folder")(func)
    func = click.option("--seed", type=SEED, default=0, show_default=True, help="data order, sampling, masks")(func)
    return func


def _settings(values: dict) -> TrainSettings:
    settings = TrainSettings(**{name: values.pop(name) for name in TrainSettings.model_fields})
    if settings.shard != "none" and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SsahError(f"--shard {settings.shard} spreads the model over several processes: start with "
                        "torchrun --nproc_per_node N (or accelerate launch --num_processes N) -m ssah ...")
    return settings


def _mask(spec: str | None, seed: int):
    if not spec:
        return None
    from ssah.interventions.masks import load_mask, split_mask_spec

    return load_mask(*split_mask_spec(spec), seed=seed)


def _inputs(*specs: str | None) -> list[str]:
    """Input paths of a command (datasets FORMAT:PATH, mask GROUPS_DIR:..., model folders), for
    the output-folder checks."""
    from pathlib import Path

    paths = []
    for spec in filter(None, specs):
        for candidate in (spec, spec.partition(":")[2], spec.rpartition(":")[0]):
            if candidate and Path(candidate).exists():
                paths.append(candidate)
    return paths


def _echo(out: str, record: dict) -> None:
    from ssah.train.sharding import is_main_process

    if not is_main_process():
        return
    result = record["result"]
    check = result["check"]
    frozen = f", frozen entries max change {check['max_abs_change_frozen']:g}" if "max_abs_change_frozen" in check \
        else ""
    share = f", {100 * record['trainable_share']:.1f}% of entries trainable" \
        if record.get("trainable_share") is not None else ""
    click.echo(f"{result['steps']} steps in {result['seconds']:.0f}s, final loss {result['final_loss']:.4f}"
               f"{share}{frozen}; saved {out}")


@click.command("finetune")
@model_options
@click.option("--data", "data_spec", required=True, help="(prompt, response) data, e.g. benign:train or alpaca:FILE")
@click.option("--freeze", "freeze_spec", default=None,
              help="GROUPS_DIR:MASK units to keep bit-identical, e.g. g:SCU+CU")
@click.option("--frozen-epochs-multiplier", type=FiniteFloat(min=0, min_open=True), default=2.0,
              show_default=True, help="frozen runs train this many times longer (the paper doubles them)")
@click.option("--lora", is_flag=True, help="train LoRA adapters (r=8) instead of full weights; merged on save")
@settings_options(TrainSettings, defaults={"lr": FINETUNE_LR})
@common_options
def finetune(model_args: dict, data_spec: str, freeze_spec: str | None, frozen_epochs_multiplier: float,
             lora: bool, seed: int, out: str, force: bool, **values) -> None:
    """Supervised fine-tuning (loss on response tokens), optionally with frozen units or LoRA."""
    from ssah.data import load_dataset
    from ssah.train import recipes

    settings = _settings(values)
    if freeze_spec and lora:
        raise SsahError("--freeze and --lora cannot be combined: LoRA leaves every base weight frozen already")
    data = load_dataset(data_spec)
    mask = _mask(freeze_spec, seed)
    source = check_model_spec(model_args)
    folder = _folder(out, inputs=_inputs(data_spec, freeze_spec, model_args["spec"]), force=force,
                     need_bytes=source.weight_bytes)
    loaded = load_from_options(model_args)
    if mask is not None:
        mask.check_model(loaded.fingerprint, loaded.layout)
    with folder or contextlib.nullcontext():
        record = recipes.finetune(loaded, data, settings, out, seed=seed, freeze=mask, lora=lora,
                                  frozen_multiplier=frozen_epochs_multiplier, force=force,
                                  writer=folder and (lambda _: folder.swap()))
    _echo(out, record)


def _folder(out: str, **options):
    """The output folder, checked, locked and swapped in by the main process of a multi-process job
    only (the others train and exit; the main process writes the model)."""
    from ssah.train import recipes
    from ssah.train.sharding import is_main_process

    return output_folder(out, recipes.MODEL, **options) if is_main_process() else None


def _lengths(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SsahError(f"--recovery takes token counts like 2,4,6,8,10, got {text!r}") from None
    if not values or min(values) < 1:
        raise SsahError(f"--recovery takes positive token counts like 2,4,6,8,10, got {text!r}")
    return values


@click.command("align")
@model_options
@click.option("--budget", "budget_spec", required=True,
              help="GROUPS_DIR:MASK units allowed to train (e.g. g:RU), or 'all' for full-parameter alignment")
@click.option("--data", "data_spec", default="harmful:train", show_default=True, help="harmful prompts to refuse")
@click.option("--benign", "benign_spec", default="benign:train", show_default=True,
              help="benign (prompt, answer) pairs mixed in so the model does not refuse everything")
@click.option("--refusals", "refusals_spec", default="refusals:align", show_default=True,
              help="refusal replies to train on")
@click.option("--recovery", "recovery_lengths", default=None, metavar="K1,K2,...",
              help="deeper alignment: also train a refusal after the first K tokens of the model's own compliant "
              "reply to each harmful prompt (K cycles over the list, e.g. 2,4,6,8,10)")
@click.option("--borderline", "borderline_spec", default=None, metavar="DATA",
              help="safe prompts that sound unsafe (e.g. sensitive_safe:train), trained on the model's own answers "
              "so it learns where refusing stops")
@click.option("--borderline-tokens", type=click.IntRange(min=1), default=48, show_default=True,
              help="length of the model's own answers to --borderline prompts")
@click.option("--avoid-refusals", type=FINITE, default=0.0, show_default=True, metavar="WEIGHT",
              help="with --borderline: weight of a loss that makes a refusal's opening unlikely at the start of "
              "each borderline reply (0: off)")
@settings_options(TrainSettings, defaults={"lr": ALIGN_LR})
@common_options
def align(model_args: dict, budget_spec: str, data_spec: str, benign_spec: str, refusals_spec: str,
          recovery_lengths: str | None, borderline_spec: str | None, borderline_tokens: int, avoid_refusals: float,
          seed: int, out: str, force: bool, **values) -> None:
    """Safety alignment SFT that trains only a unit budget; everything else stays bit-identical."""
    from ssah.data import load_dataset
    from ssah.train import recipes

    settings = _settings(values)
    if avoid_refusals < 0:
        raise SsahError(f"--avoid-refusals is a loss weight and must be >= 0, got {avoid_refusals}")
    if avoid_refusals and not borderline_spec:
        raise SsahError("--avoid-refusals needs --borderline: it acts on the replies to borderline prompts")
    limit = settings.limit
    inputs = recipes.AlignInputs(
        harmful=recipes.limited(load_dataset(data_spec), limit, seed),
        benign=recipes.limited(load_dataset(benign_spec), limit, seed), refusals=load_dataset(refusals_spec),
        borderline=recipes.limited(load_dataset(borderline_spec), limit, seed) if borderline_spec else None,
        borderline_tokens=borderline_tokens, recovery_lengths=_lengths(recovery_lengths), avoid_weight=avoid_refusals)
    mask = None if budget_spec == "all" else _mask(budget_spec, seed)
    source = check_model_spec(model_args)
    folder = _folder(out, force=force, need_bytes=source.weight_bytes,
                     inputs=_inputs(data_spec, benign_spec, refusals_spec, borderline_spec, budget_spec,
                                    model_args["spec"]))
    loaded = load_from_options(model_args)
    if mask is not None:
        mask.check_model(loaded.fingerprint, loaded.layout)
    with folder or contextlib.nullcontext():
        record = recipes.align(loaded, inputs, settings.model_copy(update={"limit": None}), out, budget=mask,
                               seed=seed, batch_size=settings.batch_size, force=force,
                               writer=folder and (lambda _: folder.swap()))
    _echo(out, record)
