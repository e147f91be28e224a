"""One fine-tuning attack under one defense, with no run folder: a model, an attack and a defense in, the
trained model and its record out. The grid (`ssah.attacks.grid`) calls this for every cell.

    from ssah.attacks import AttackData, DefenseContext, attack_model
    from ssah.models.loading import load_model
    from ssah.train.settings import TrainSettings
    from ssah.units.groups import Groups

    loaded = load_model("builtin:smollm2-135m-instruct")
    attack = AttackData("harmful", "harmful-k10", pairs)          # (prompt, response) pairs
    defenses = DefenseContext(groups=Groups.load("runs/demo/3-groups/groups"))
    attacked = attack_model(loaded, attack, "freeze_ii", TrainSettings(lr=2e-4, max_steps=4), defenses)
    attacked.model, attacked.record                               # a LoadedModel, a JSON-able dict

`rsn_tune` changes the model before the attack (`ssah.attacks.rsn`), so give it the RSN-tuned model; here
it trains like no defense. Freezing defenses need `DefenseContext.groups`, safety_mix its
`safety_pairs`, safe_lora its `base_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssah.attacks.data import AttackData
from ssah.attacks.defenses import DefenseContext, prepare, training_defense


@dataclass
class Attacked:
    model: object  # the trained model, a `ssah.models.loading.LoadedModel`
    record: dict  # training summary and loss curve, the share of parameters left trainable, the defense's notes


def attack_model(loaded, attack: AttackData, defense: str, settings, defenses: DefenseContext | None = None,
                 modality: str = "full", seed: int = 0) -> Attacked:
    """Fine-tune `loaded` (changed in place: load a copy to keep the original) on `attack`'s data under
    `defense` with `settings` (`ssah.train.settings.TrainSettings`); `modality` full or lora (the LoRA
    attack, adapters merged after training). A frozen entry that moved stops here with an error."""
    from accelerate.utils import set_seed

    from ssah.models.loading import LoadedModel
    from ssah.pipeline.summaries import train_summary
    from ssah.train.recipes import fit
    from ssah.train.settings import TrainConfig

    set_seed(seed)  # LoRA's adapters are drawn in `prepare`: the same seed gives the same attack
    prepared = prepare(training_defense(defense, modality), loaded, defenses or DefenseContext(groups=None),
                       attack.pairs)
    config = TrainConfig.of(settings, seed=seed, avoid_weight=0.0, system=attack.system)
    if prepared.token_betas is not None:  # the constrained objective is ssah's own loop's
        config = TrainConfig.of(config, backend="ssah", token_betas=prepared.token_betas)
    with prepared.guard():
        result = fit(prepared.model, loaded.tokenizer, attack.pairs + prepared.extra_pairs, config,
                     freezer=prepared.freezer)
    tuned = LoadedModel(prepared.finish(prepared.model), loaded.tokenizer, f"{attack.name}/{defense} of {loaded.spec}")
    record = {"attack": attack.describe(), "lr": config.lr, "steps": config.max_steps, "defense": defense,
              "modality": modality, "trainable_share": prepared.trainable_share, "defense_notes": prepared.notes,
              "train": {**train_summary({"result": result.to_dict(), "config": config.to_dict()}),
                        "loss_curve": result.loss_curve}}
    return Attacked(tuned, record)
