"""Defenses against fine-tuning attacks, each applied the same way to the same attack.

- `none`: the attack fine-tunes every parameter;
- SSAH (Li & Kim): `freeze_i` (SCU + the top 6% of CU frozen), `freeze_ii` (SCU + all CU),
  `freeze_budget` (the units alignment trained, for a model aligned inside a budget) and
  `freeze_ii_strict` (SCU + all CU and every parameter no unit owns: embeddings, norms, q/k rows, v rows
  under grouped-query attention, the head; only UCU and RU train): the hypothesis at its strongest;
- `freeze_random_s{seed}` (the control of `freeze_ii`): per layer and kind, as many units as SCU + all CU
  hold there, drawn uniformly with that seed and frozen the same way (one cell per seed of
  `attacks.random_seeds`); freezing SCU + CU means something only where it beats these draws;
- `freeze_random_strict_s{seed}` (the control of `freeze_ii_strict`): per layer and kind, as many units as
  UCU + RU hold there, drawn uniformly with that seed, are the only ones trained (every parameter no unit
  owns frozen, as in freeze_ii_strict): training UCU + RU alone means something only where it beats
  training as many random units;
- `freeze_random_constrained_s{seed}`, `freeze_random_strict_constrained_s{seed}` (the controls of the
  combinations below): the same draws as freeze_random and freeze_random_strict, trained under the
  constrained objective, so a combination's claim about its units has its own same-size control;
- `rsn_tune` (Zhao et al. 2025, `ssah.attacks.rsn`): the robust safety units are tuned on safety data
  first; the attack then fine-tunes as usual;
- `safe_lora` (Hsu et al. 2024, `ssah.attacks.safe_lora`): a LoRA attack whose updates are projected
  onto the alignment's subspace where they stray from it (needs the unaligned model);
- `safety_mix` (Bianchi et al. 2024, safety-tuned data mixing): a fixed number of refusals
  (`attacks.safety_mix_count`) to harmful prompts the attack does not train on, mixed into the attack's
  own data, a cheap peer from the harmful fine-tuning literature;
- `constrained` (Qi et al., ICLR 2025, "Safety Alignment Should Be Made More Than Just a Few Tokens
  Deep"): the attack's data trained under their token-wise constrained objective (`ssah.train.sft`),
  which keeps the first reply tokens' probabilities near the aligned model's, where the hypothesis says
  the fulfil-or-refuse decision is made;
- `freeze_ii_constrained`, `freeze_ii_strict_constrained` (SSAH-native combinations): the units SSAH
  names frozen as in freeze_ii (or freeze_ii_strict) *and* the constrained objective: the choice held
  in place both where it is stored and where it is read out. The grid runs both as candidates and gives
  verdicts to the one with the lower worst-case rise on calibration prompts (`ssah.attacks.matrix`).

Threat model (`threat_model`). `rsn_tune` is model-side (`open-weights`: it changes the released model,
and an attacker who holds the weights cannot be made to freeze anything); every other defense is
provider-side (`fine-tuning-as-a-service`: freezing, safety mixing, Safe LoRA, a serving-time monitor
hold only where the provider runs the training or serves the model).

Training modality. The attack trains every parameter (`full`) or LoRA adapters (r = 8) on every
block linear map, merged after training (`lora`): the attacker's choice, not a defense. `safe_lora`
defends the LoRA attack, every other defense the full one, and each is compared with no defense under
the same modality and sweep point; in the matrix the LoRA attack with no defense is the arm `lora`.

`prepare` returns what the attack's training needs: the model to train (maybe wrapped), a freezer,
extra pairs, the training objective (cross-entropy, or the constrained objective's betas), the step that
turns the trained model into a plain one, and the share of the model's parameters left trainable.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssah.errors import SsahError


@dataclass
class Prepared:
    model: object
    freezer: object = None
    extra_pairs: list = field(default_factory=list)
    finish: Callable = lambda model: model  # the trained model -> a plain Hugging Face model
    trainable_share: float = 1.0
    notes: dict = field(default_factory=dict)
    token_betas: list[float] | None = None  # the constrained objective's betas (None: cross-entropy)

    def guard(self):
        """The freezer as a context manager (its hooks are removed when training ends)."""
        return self.freezer if self.freezer is not None else contextlib.nullcontext()


@dataclass
class DefenseContext:
    """What the defenses draw on: the studied model's groups, the alignment budget (if any), safety
    pairs for mixing, the RSN-tuned model and the unaligned model's weights (made on first use)."""

    groups: object
    budget: object = None
    safety_pairs: list = field(default_factory=list)
    # makes (once) and returns the RSN-tuned model's folder, or None when there was nothing to tune
    rsn_model: Callable[[], Path | None] | None = None
    base_weights: Callable[[object], dict] | None = None  # the unaligned values of a LoRA model's weights
    safe_lora_threshold: float = 0.35
    safety_mix_count: int = 10
    constrained_betas: list[float] = field(default_factory=lambda: [0.5, 2.0, 2.0, 2.0, 2.0, 0.1])
    seed: int = 0


RANDOM, RANDOM_STRICT = "freeze_random", "freeze_random_strict"
FREEZE_II = "SCU+CU"
# a claim about chosen units -> its control: random units of the same sizes, one cell per seed
CONTROLS = {"freeze_ii": RANDOM, "freeze_ii_strict": RANDOM_STRICT, "freeze_ii_constrained": f"{RANDOM}_constrained",
            "freeze_ii_strict_constrained": f"{RANDOM_STRICT}_constrained"}
_DRAW = re.compile(rf"({RANDOM_STRICT}_constrained|{RANDOM}_constrained|{RANDOM_STRICT}|{RANDOM})_s(\d+)")


def control_of(defense: str) -> str | None:
    """The random control a cell belongs to (freeze_random_strict_s1 -> freeze_random_strict), else None."""
    drawn = _DRAW.fullmatch(defense)
    return drawn.group(1) if drawn else None


def claim_of(defense: str) -> str | None:
    """The claim a random control's cell is the control of (freeze_random_strict_s1 -> freeze_ii_strict)."""
    control = control_of(defense)
    return next((claim for claim, c in CONTROLS.items() if c == control), None)


def _frozen(loaded, mask, train_only: bool = False, notes: dict | None = None) -> Prepared:
    from ssah.interventions.freeze import UnitFreezer, trainable_share

    freezer = UnitFreezer(loaded.model, loaded.layout, mask, train_only=train_only)
    return Prepared(loaded.model, freezer, trainable_share=trainable_share(loaded.model, freezer),
                    notes={"units_frozen" if not train_only else "units_trainable": mask.count(), **(notes or {})})


def _lora(loaded, finish=None) -> Prepared:
    from ssah.interventions.freeze import trainable_share
    from ssah.train.lora import apply_lora, merge_lora

    total = sum(p.numel() for p in loaded.model.parameters())
    model = apply_lora(loaded.model)
    return Prepared(model, finish=finish or merge_lora, trainable_share=trainable_share(model, total=total))


# Who applies a defense, so who an attacker must get past. Open weights: the defense changes the released
# model (RSN-Tune) and an attacker holding the weights fine-tunes it however they like. Fine-tuning as a
# service: the provider runs the training or serves the result (freezing, safety mixing, Safe LoRA's
# projection, a serving-time monitor), which an attacker holding the weights simply would not do.
OPEN_WEIGHTS, SERVICE = "open-weights", "fine-tuning-as-a-service"
THREAT_MODELS = (OPEN_WEIGHTS, SERVICE)


def threat_model(arm: str) -> str | None:
    """The threat model a defense answers (None for an attack with no defense, which is both's baseline)."""
    if arm in ("none", "lora"):
        return None
    return OPEN_WEIGHTS if arm == "rsn_tune" else SERVICE


LORA_DEFENSES = ("safe_lora",)  # the defenses of the LoRA attack; every other defends full fine-tuning
BASELINES = {"full": "none", "lora": "lora"}  # each modality's attack under no defense, as the matrix names it


def defenses_of(modality: str, defenses: list[str]) -> list[str]:
    """The defenses a modality's cells run, no defense first (always: every defense is compared with it)."""
    own = [d for d in defenses if (d in LORA_DEFENSES) == (modality == "lora") and d != "none"]
    return ["none", *own]


def arm_name(defense: str, modality: str) -> str:
    """A cell's name in the matrix: the defense, or `lora` for the LoRA attack with no defense."""
    return BASELINES[modality] if defense == "none" else defense


def training_defense(defense: str, modality: str) -> str:
    """The name `prepare` knows: under the LoRA modality, no defense is the plain LoRA attack."""
    return "lora" if modality == "lora" and defense == "none" else defense


def expand(defenses: list[str], random_seeds: list[int]) -> list[str]:
    """The grid's defenses with each random control replaced by one draw per seed (freeze_random_s{seed},
    freeze_random_strict_s{seed})."""
    from ssah.defaults import random_draws

    out: list[str] = []
    for name in defenses:
        out += random_draws(name, random_seeds) if name in CONTROLS.values() else [name]
    return out


def _mask(ctx: DefenseContext, expression: str):
    from ssah.interventions.masks import mask_from_expression

    return mask_from_expression(ctx.groups, expression, seed=ctx.seed)


def prepare(name: str, loaded, ctx: DefenseContext, pairs: list) -> Prepared:
    """The defense `name` applied to `loaded` (already the model it starts from) for an attack on `pairs`."""
    from ssah.interventions.masks import complement, overlap, random_like

    if name in ("none", "rsn_tune"):
        return Prepared(loaded.model)
    if name == "freeze_i":
        return _frozen(loaded, _mask(ctx, "SCU+CU:top=0.06"))
    if name == "freeze_ii":
        return _frozen(loaded, _mask(ctx, FREEZE_II))
    if name == "freeze_ii_strict":
        return _frozen(loaded, complement(_mask(ctx, FREEZE_II)), train_only=True)
    if (drawn := _DRAW.fullmatch(name)) is not None and drawn.group(1).endswith("_constrained"):
        return _constrained(prepare(name.replace("_constrained", ""), loaded, ctx, pairs), ctx)
    if drawn is not None:
        seed, freeze_ii = int(drawn.group(2)), _mask(ctx, FREEZE_II)
        if drawn.group(1) == RANDOM:
            like = random_like(freeze_ii, seed, outside=False)  # SCU + CU covers most units: drawn over all
            return _frozen(loaded, like, notes={"control_of": "freeze_ii", "seed": seed,
                                                "overlap": overlap(like, freeze_ii)})
        trained = complement(freeze_ii)  # UCU + RU: drawn over all units too, so a draw may hit SCU or CU
        like = random_like(trained, seed, outside=False)
        return _frozen(loaded, like, train_only=True, notes={"control_of": "freeze_ii_strict", "seed": seed,
                                                              "overlap": overlap(like, trained)})
    if name == "freeze_budget":
        if ctx.budget is None:
            raise SsahError("defense freeze_budget needs a model aligned inside a budget")
        return _frozen(loaded, ctx.budget)
    if name == "lora":  # the LoRA attack with no defense (`training_defense`)
        return _lora(loaded)
    if name == "safe_lora":
        return _safe_lora(loaded, ctx)
    if name == "safety_mix":
        return Prepared(loaded.model, extra_pairs=(extra := safety_mix_pairs(ctx, pairs)),
                        notes={"safety_pairs": len(extra)})
    if name in CONSTRAINED:
        return _constrained(prepare(CONSTRAINED[name], loaded, ctx, pairs), ctx)
    raise SsahError(f"unknown defense {name!r}")


def _constrained(prepared: Prepared, ctx: DefenseContext) -> Prepared:
    """`prepared` trained under the token-wise constrained objective instead of cross-entropy."""
    prepared.token_betas = list(ctx.constrained_betas)
    prepared.notes = {**prepared.notes, "objective": "token-wise constrained", "betas": prepared.token_betas}
    return prepared


# the constrained objective alone, or on top of a freezing defense (the SSAH-native combinations)
CONSTRAINED = {"constrained": "none", "freeze_ii_constrained": "freeze_ii",
               "freeze_ii_strict_constrained": "freeze_ii_strict"}


def safety_mix_pairs(ctx: DefenseContext, pairs: list) -> list:
    """`ctx.safety_mix_count` refusal pairs on harmful prompts the attack's own data does not hold."""
    import random

    attacked = {pair[0] for pair in pairs}
    pool = [pair for pair in ctx.safety_pairs if pair[0] not in attacked]
    if len(pool) < ctx.safety_mix_count:
        raise SsahError(f"safety_mix needs {ctx.safety_mix_count} refusal pairs on prompts the attack does not "
                        f"train on, but only {len(pool)} exist; lower attacks.safety_mix_count")
    return random.Random(ctx.seed).sample(pool, ctx.safety_mix_count)


def _safe_lora(loaded, ctx: DefenseContext) -> Prepared:
    from ssah.attacks.safe_lora import safe_lora_merge

    if ctx.base_weights is None:
        raise SsahError("defense safe_lora needs the unaligned model: set attacks.safe_lora_base")
    report: dict = {}

    def finish(peft_model):
        model, found = safe_lora_merge(peft_model, ctx.base_weights(peft_model), ctx.safe_lora_threshold)
        report.update(found)
        return model

    prepared = _lora(loaded, finish)
    prepared.notes = report  # filled in when the run finishes
    return prepared


def source_model(name: str, ctx: DefenseContext, studied: str) -> str | None:
    """The model a defense's attack starts from: the studied model, or for RSN-Tune its tuned copy (None
    when RSN-Tune found no units to tune)."""
    if name == "rsn_tune":
        if ctx.rsn_model is None:
            raise SsahError("defense rsn_tune has no RSN-tuned model")
        tuned = ctx.rsn_model()
        return None if tuned is None else str(tuned)
    return studied
