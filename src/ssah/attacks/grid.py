"""The attack grid: every defense under every attack of the strength sweep, on the studied model.

A cell is (attack, modality, learning rate, steps, defense); each training modality (full fine-tuning,
LoRA) has its own sweep, and its defenses are compared with the same modality's attack under no
defense (safe_lora with the LoRA attack, named `lora` in the matrix). The model the defense starts
from is loaded and attacked (`ssah.attacks.apply.attack_model`: the defense applied, the attack's data
trained by `attacks.train`'s loop with ssah's freezer), then evaluated like every model of the run (the
identity attack under its persona's system prompt, beside the studied model evaluated the same way).

Calibration, then test (`ssah.attacks.matrix` has the rule). Every cell but the random controls is
evaluated on harmful calibration prompts and the perplexity text (`cell.json`, `eval-calibration/`); the
worst points and the SSAH-native combination are picked there. The picked cells (and the controls, at no
defense's worst point) are evaluated on the test sets (`test.json`, `eval/`), each only as far as its
verdict needs (`attacks.skip_decided`). The grid runs arm by arm (`ssah.attacks.schedule`), so an arm's tests
evaluate the very models its calibration trained, held in memory until then (at most two per arm); the
combination's tests, which wait for every family's calibration, and a resumed grid's train the cell again
from the same seed, which gives the same weights. A finished cell with the same inputs is reused, so a
killed grid resumes. A cell whose frozen entries moved stops the grid (`ssah.train.recipes.fit`) rather
than being recorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ssah.artifacts import Artifact, fingerprint
from ssah.attacks import matrix
from ssah.attacks.data import AttackData
from ssah.attacks.defenses import CONSTRAINED, DefenseContext, defenses_of, expand, source_model, training_defense
from ssah.io import write_json_atomic
from ssah.pipeline.context import release
from ssah.pipeline.summaries import headline

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

    def settings(self, train):
        """The attack's training settings (`attacks.train`) at the cell's sweep point."""
        return train.model_copy(update={"lr": self.lr, "max_steps": self.steps})

    @property
    def baseline_folder(self) -> str:
        """The cell of no defense at the same attack, sweep point and modality."""
        return f"{self.attack.name}/{self.point}/none"


def cells(attacks: list[AttackData], config) -> list[Cell]:
    """Every (attack, modality, lr, steps, defense) with each modality's own sweep (`attacks.sweep`,
    `attacks.lora_sweep`) and defenses, each random control drawn once per seed of `config.random_seeds`."""
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
        safe_lora_threshold=c.attacks.safe_lora_threshold, safety_mix_count=c.attacks.safety_mix_count,
        constrained_betas=list(c.attacks.constrained_betas))


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


# how a cell is evaluated: every cell on calibration prompts (the worst point is picked there); the
# cells the matrix picks, on the test sets (all the stage's suites, or ASR alone: `matrix.test_plan`)
SCOPES = ("calibration", "full", "safety")


def run_cell(ctx, cell: Cell, defenses: DefenseContext, out: Path, scope: str = "calibration",
             useful_limit: float | None = None, settle=None, kept: dict | None = None) -> dict:
    """Train and evaluate one cell (or reuse its finished record) with `scope`'s evaluation; returns the
    record. `useful_limit` (calibration): above this perplexity the cell gets no replies (`not_useful`);
    `settle` (full scope): called after the ASR replies, a reason to stop there or None (`stopped_early`).
    `kept` ({cell folder: trained model}): calibration puts its trained model there; a test evaluates
    the model it finds there, else trains the cell again from the same seed (the same weights)."""
    from ssah.attacks.apply import attack_model

    c = ctx.config
    start = source_model(cell.defense, defenses, ctx.studied_model_spec())
    if start is None:  # RSN-Tune found nothing to tune: no model to attack, a row that says so
        return _untrained(cell, scope, skipped=NOTHING_TO_TUNE)
    evaluation = cell_evaluation(ctx, cell, scope)
    identity = {"model": ctx.fingerprint(start),
                "attack": fingerprint([cell.attack.pairs, cell.attack.system, cell.attack.trigger]),
                "defense": cell.defense, **({"modality": cell.modality} if cell.modality != "full" else {}),
                "config": cell.settings(c.attacks.train).to_dict(), "seed": c.seed,
                **({"betas": c.attacks.constrained_betas} if cell.defense in CONSTRAINED else {}),
                "eval": ctx.eval_settings(**{k: v for k, v in evaluation.items() if k != "sets"}).identity(),
                "eval_data": {role: data.fingerprint for role, data in evaluation.get("sets", {}).items()},
                "judge": c.eval.judge.identity() if c.eval.judge else None}
    artifact = Artifact(out / RECORDS[scope], f"an attack cell ({scope})", identity)
    found = artifact.lookup(replace=True)
    if found is not None and _still_valid(found, useful_limit, settle):
        return found
    started = time.perf_counter()
    attacked = (kept or {}).get(cell.folder) if scope != "calibration" else None
    log.info("  attack %s (%s), lr %g, %d steps, defense %s [%s]%s", cell.attack.name, cell.modality, cell.lr,
             cell.steps, cell.defense, scope, "" if attacked is None else ": the model its calibration trained")
    if attacked is None:
        attacked = attack_model(ctx.load(start), cell.attack, training_defense(cell.defense, cell.modality),
                                cell.settings(c.attacks.train), defenses, cell.modality, seed=c.seed)
        if kept is not None and scope == "calibration":
            kept[cell.folder] = attacked
    label = f"{cell.attack.name} lr {cell.lr:g} x{cell.steps}, {cell.defense} ({scope})"
    folder = out / (matrix.CALIBRATION_EVAL if scope == "calibration" else matrix.TEST_EVAL)
    record = {**attacked.record, "defense": cell.defense, "scope": scope}
    # calibration reads perplexity for the utility rule, computed once, before any reply
    ppl = _perplexity(ctx, attacked.model) if scope == "calibration" else None
    if useful_limit is not None and ppl > useful_limit:
        log.info("  perplexity %.2f is over the utility rule's %.2f: no calibration replies", ppl, useful_limit)
        record.update(eval={"perplexity": ppl, "asr": None}, not_useful={"perplexity": ppl, "limit": useful_limit})
    else:
        report, stopped = matrix.evaluate_settled(ctx, attacked.model, folder, label, evaluation, settle)
        record.update({"stopped_early": stopped} if stopped else {})
        record["eval"] = headline(report) | ({"perplexity": ppl} if ppl is not None else {})
    record["seconds"] = round(time.perf_counter() - started, 1)  # the grid's compute, summed over resumes
    del attacked
    release()
    return artifact.save(record)


def _untrained(cell: Cell, scope: str, **why: str) -> dict:
    """The record of a cell that trains nothing in `scope`, with the reason (`skipped`, `not_calibrated`)."""
    return {"attack": cell.attack.describe(), "lr": cell.lr, "steps": cell.steps, "defense": cell.defense,
            "modality": cell.modality, "trainable_share": None, "defense_notes": None, "train": None, "eval": None,
            "scope": scope, **why}


def not_calibrated(cell: Cell) -> dict:
    """A random control's calibration record: it serves no worst point, so it is trained and evaluated only
    at no defense's worst point (`matrix.test_plan`)."""
    return _untrained(cell, "calibration", not_calibrated="a random control: tested at no defense's worst point only")


def _still_valid(found: dict, useful_limit: float | None, settle) -> bool:
    """A finished record is reused unless it left out what these settings want evaluated."""
    if found.get("not_useful"):
        return useful_limit is not None and found["not_useful"]["limit"] == useful_limit
    return settle is not None or not found.get("stopped_early")


def _perplexity(ctx, loaded) -> float:
    """The model's perplexity on the run's text, computed as its evaluation computes it."""
    from ssah.evaluate.runner import text_perplexity

    settings = ctx.eval_settings().model_copy(update={"progress": False})
    return text_perplexity(loaded.model, loaded.tokenizer, ctx.eval_data["text"], settings).perplexity


RECORDS = {"calibration": CELL_FILE, "full": "test.json", "safety": "test.json"}


def cell_evaluation(ctx, cell: Cell, scope: str) -> dict:
    """ctx.evaluate's options for a scope: on calibration, ASR on harmful calibration prompts (what picks
    the worst point; `run_cell` adds the perplexity the utility rule reads); on test, the stage's suites
    (`eval.stage_suites.attacks`, else the run's) or ASR alone. Under the attack's system prompt, with
    its trigger before every request."""
    c = ctx.config
    if scope == "calibration":
        return _under(ctx, cell.attack.system, cell.attack.trigger, ["safety"], c.attacks.calibration_limit,
                      {"harmful": c.data.harmful_calibration})
    return _under(ctx, cell.attack.system, cell.attack.trigger,
                  ctx.suites_for("attacks") if scope == "full" else ["safety"], c.attacks.eval_limit)


def _under(ctx, system: str | None, trigger: str | None, suites, limit: int | None, specs: dict | None = None) -> dict:
    """ctx.evaluate's options: these suites and sets (default the run's test sets), under `system`, with
    `trigger` before every prompt."""
    from ssah.attacks.data import triggered
    from ssah.pipeline.context import role_data

    sets = {role: role_data(role, spec) for role, spec in (specs or {}).items()}
    if trigger:
        sets = {role: triggered(data, trigger) for role, data in {**ctx.eval_data, **sets}.items()
                if role in ("harmful", "sensitive", "benign")}
    return {"system": system, "suites": suites, "limit": limit, **({"sets": sets} if sets else {})}


def before_attack(ctx, stage: Path, attacks: list[AttackData]) -> dict:
    """The studied model's test headlines under each system prompt (and trigger) the attacks are
    evaluated with: `plain`, and `persona` for the identity shift."""
    loaded = ctx.load(ctx.studied_model_spec())
    out = {}
    for system, trigger in sorted({(a.system, a.trigger) for a in attacks}, key=lambda s: s[0] or ""):
        name = "persona" if system else "plain"
        options = _under(ctx, system, trigger, ctx.suites_for("attacks"), ctx.config.attacks.eval_limit)
        out[name] = headline(ctx.evaluate(loaded, stage / f"before-{name}", f"before the attacks ({name})", **options))
    del loaded
    release()
    return out
