"""The attack grid: every defense under every attack of the strength sweep, on the studied model.

A cell is (attack, modality, learning rate, steps, defense); each training modality (full fine-tuning,
LoRA) has its own sweep, and its defenses are compared with the same modality's attack under no
defense (safe_lora with the LoRA attack, named `lora` in the matrix). The model the defense starts
from is loaded, the defense is applied, the attack's data fine-tunes it (`attacks.train`, TRL's SFTTrainer by default,
with ssah's freeze callback), and the result is evaluated like every model of the run (the identity
attack under its persona's system prompt, beside the studied model evaluated the same way). Fine-tuned
weights are not kept: a cell's folder holds its record (`cell.json`: training summary, the share of
parameters the defense left trainable, the headline) and its evaluation (replies for the paired
tests). A finished cell with the same inputs is reused, so a killed grid resumes. A cell whose frozen
entries moved stops the grid (`ssah.train.recipes.fit`) rather than being recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ssah.artifacts import Artifact, fingerprint
from ssah.attacks.data import AttackData, build_attacks
from ssah.attacks.defenses import DefenseContext, defenses_of, expand, prepare, source_model, training_defense
from ssah.io import write_json_atomic
from ssah.pipeline.context import release
from ssah.pipeline.summaries import headline, train_summary

log = logging.getLogger("ssah.attacks")
CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    attack: AttackData
    lr: float
    steps: int
    defense: str
    modality: str = "full"  # how the attack trains: every parameter, or LoRA adapters

    @property
    def arm(self) -> str:
        """The cell's name in the matrix: its defense, or `lora` for the LoRA attack with no defense."""
        from ssah.attacks.defenses import arm_name

        return arm_name(self.defense, self.modality)

    @property
    def point(self) -> str:
        """The sweep point's folder (full fine-tuning keeps the folders it had before LoRA had a sweep)."""
        return f"{'lora-' if self.modality == 'lora' else ''}lr{self.lr:g}-s{self.steps}"

    @property
    def folder(self) -> str:
        return f"{self.attack.name}/{self.point}/{self.defense}"

    @property
    def baseline_folder(self) -> str:
        """The cell of no defense at the same attack, sweep point and modality."""
        return f"{self.attack.name}/{self.point}/none"


def cells(attacks: list[AttackData], config) -> list[Cell]:
    """Every (attack, modality, lr, steps, defense) with each modality's own sweep (`attacks.sweep`,
    `attacks.lora_sweep`) and defenses, freeze_random drawn once per seed of `config.random_seeds`."""
    out = []
    for modality in config.modalities:
        sweep = config.sweep_of(modality)
        defenses = defenses_of(modality, expand(config.defenses, config.random_seeds))
        out += [Cell(attack, lr, steps, defense, modality) for attack in attacks for lr in sweep.lr
                for steps in sweep.steps for defense in defenses]
    return out


def safety_pairs(seed: int, refusals: str = "refusals:grid") -> list[tuple[str, str]]:
    """Harmful training prompts with refusals (RSN-Tune's safety data, safety mixing): the grid's own
    refusal texts, none of which the alignment stage trained on."""
    from ssah.data import load_dataset
    from ssah.train.data import alignment_pairs

    return alignment_pairs(load_dataset("harmful:train"), [], load_dataset(refusals), seed=seed)


def defense_context(ctx, stage: Path) -> DefenseContext:
    """Everything the run's defenses draw on; the RSN-tuned model and the unaligned weights are made
    only when a defense needs them."""
    from ssah.interventions.masks import mask_from_expression
    from ssah.units.groups import Groups

    c, layout = ctx.config, ctx.layout
    budget = None
    if layout.study == "budget":
        budget = mask_from_expression(Groups.load(layout.unaligned_groups / "groups"), c.align.budget, seed=c.seed)
    safety = safety_pairs(c.seed, c.data.grid_refusals)
    base_spec = c.attacks.safe_lora_base or (c.model if c.align.enabled else None)
    return DefenseContext(
        groups=Groups.load(layout.groups), budget=budget, safety_pairs=safety, seed=c.seed,
        rsn_model=cache(lambda: rsn_tuned_model(ctx, stage / "rsn", safety)),
        base_weights=_base_weights(ctx, base_spec) if base_spec else None,
        safe_lora_threshold=c.attacks.safe_lora_threshold, safety_mix_share=c.attacks.safety_mix_share)


def _base_weights(ctx, spec: str):
    store: dict = {}

    def weights(lora_model) -> dict:
        from ssah.attacks.safe_lora import base_weights_for

        if not store:
            base = ctx.load(spec)
            store.update(base_weights_for(lora_model, base.model))
            del base
            release()
        return store

    return weights


NOTHING_TO_TUNE = "RSN-Tune found no robust safety units: nothing to tune"


def rsn_tuned_model(ctx, out: Path, safety: list[tuple[str, str]]) -> Path | None:
    """The studied model with its robust safety units tuned on safety data (`ssah.attacks.rsn`), or None
    when the detector found none (its cells are then recorded as having nothing to tune)."""
    from ssah.attacks.rsn import robust_safety_units
    from ssah.data import load_dataset
    from ssah.interventions.freeze import UnitFreezer
    from ssah.train.recipes import train_model
    from ssah.train.settings import TrainConfig

    c, a = ctx.config, ctx.config.attacks
    loaded = ctx.load(ctx.studied_model_spec())
    harmful = load_dataset(c.data.harmful_calibration).take(64).prompts()
    general = load_dataset(c.data.benign_calibration).take(64).prompts()
    mask, sizes = robust_safety_units(loaded, harmful, general, top=a.rsn_top, min_share=a.rsn_min_share)
    log.info("  RSN-Tune: %d robust safety units (%d safety, %d foundation)", sizes["robust_safety_units"],
             sizes["safety_units"], sizes["foundation_units"])
    if mask.count() == 0:
        log.warning("  %s (%d safety units, all of them foundation units too); its cells record that", NOTHING_TO_TUNE,
                    sizes["safety_units"])
        write_json_atomic(out.parent / "rsn-nothing-to-tune.json", {"why": NOTHING_TO_TUNE, "units": sizes})
        del loaded
        release()
        return None
    config = TrainConfig.of(a.train.model_copy(update={"lr": a.rsn_lr, "max_steps": a.rsn_steps}), seed=c.seed,
                            avoid_weight=0.0)
    identity = {"model": loaded.fingerprint, "units": mask.digest(), "safety": fingerprint(safety),
                "config": config.to_dict()}
    with UnitFreezer(loaded.model, loaded.layout, mask, train_only=True) as freezer:
        train_model(loaded, safety, config, out, identity=identity, record={"kind": "rsn_tune", "units": sizes},
                    freezer=freezer, replace=True)
    del loaded
    release()
    return out


def run_cell(ctx, cell: Cell, defenses: DefenseContext, out: Path) -> dict:
    """Train and evaluate one cell (or reuse its finished record); returns the record."""
    from ssah.models.loading import LoadedModel
    from ssah.train.recipes import fit
    from ssah.train.settings import TrainConfig

    c = ctx.config
    config = TrainConfig.of(c.attacks.train.model_copy(update={"lr": cell.lr, "max_steps": cell.steps}),
                            seed=c.seed, avoid_weight=0.0, system=cell.attack.system)
    start = source_model(cell.defense, defenses, ctx.studied_model_spec())
    if start is None:  # RSN-Tune found nothing to tune: no model to attack, a row that says so
        return {"attack": cell.attack.describe(), "lr": cell.lr, "steps": cell.steps, "defense": cell.defense,
                "modality": cell.modality, "skipped": NOTHING_TO_TUNE, "trainable_share": None,
                "defense_notes": None, "train": None, "eval": None}
    loaded = ctx.load(start)
    identity = {"model": loaded.fingerprint, "attack": fingerprint([cell.attack.pairs, cell.attack.system]),
                "defense": cell.defense, **({"modality": cell.modality} if cell.modality != "full" else {}),
                "config": config.to_dict(),
                "eval": ctx.eval_settings(system=cell.attack.system, limit=c.attacks.eval_limit).identity(),
                "judge": c.eval.judge.identity() if c.eval.judge else None}
    artifact = Artifact(out / CELL_FILE, "an attack cell", identity)
    found = artifact.lookup(replace=True)
    if found is not None:
        return found
    log.info("  attack %s (%s), lr %g, %d steps, defense %s", cell.attack.name, cell.modality, cell.lr, cell.steps,
             cell.defense)
    prepared = prepare(training_defense(cell.defense, cell.modality), loaded, defenses, cell.attack.pairs)
    with prepared.guard():
        result = fit(prepared.model, loaded.tokenizer, cell.attack.pairs + prepared.extra_pairs, config,
                     freezer=prepared.freezer)
    tuned = LoadedModel(prepared.finish(prepared.model), loaded.tokenizer, f"{cell.folder} of {start}")
    del loaded, prepared.model
    report = ctx.evaluate(tuned, out / "eval", f"{cell.attack.name} lr {cell.lr:g} x{cell.steps}, {cell.defense}",
                          system=cell.attack.system, limit=c.attacks.eval_limit)
    record = {"attack": cell.attack.describe(), "lr": cell.lr, "steps": cell.steps, "defense": cell.defense,
              "modality": cell.modality,
              "trainable_share": prepared.trainable_share, "defense_notes": prepared.notes,
              "train": {**train_summary({"result": result.to_dict()}), "loss_curve": result.loss_curve},
              "eval": headline(report)}
    del tuned
    release()
    return artifact.save(record)


def before_attack(ctx, stage: Path, systems: set[str | None]) -> dict:
    """The studied model's headline under each system prompt the attacks are evaluated with."""
    loaded = ctx.load(ctx.studied_model_spec())
    out = {}
    for system in sorted(systems, key=lambda s: s or ""):
        name = "persona" if system else "plain"
        out[name] = headline(ctx.evaluate(loaded, stage / f"before-{name}", f"before the attacks ({name})",
                                          system=system, limit=ctx.config.attacks.eval_limit))
    del loaded
    release()
    return out


def run_grid(ctx, stage: Path) -> tuple[list[Cell], list[dict], dict]:
    """(cells, their records, the studied model's headlines before any attack)."""
    attacks = build_attacks(ctx.config.attacks, stage, ctx.config.seed)
    before = before_attack(ctx, stage, {attack.system for attack in attacks})
    defenses = defense_context(ctx, stage)
    planned = cells(attacks, ctx.config.attacks)
    records = [run_cell(ctx, cell, defenses, stage / "cells" / cell.folder) for cell in planned]
    return planned, records, before
