"""`--sizes auto`: choose each group's size by a pruning sweep on calibration data.

    from ssah.units.size_sweep import AttributeProbe, sweep_sizes
    probe = AttributeProbe.build(loaded, load_dataset("harmful:calibration"), load_dataset("benign:calibration"))
    sweep = sweep_sizes(loaded, safety_scores, utility_scores, probe)
    groups = make_groups(safety_scores, utility_scores, sweep.sizes)

Two measurements stand for the two attributes, both on calibration data (never test data):

- safety: the refusal rate on the safety prompts (harmful:calibration by default): the share of greedy
  replies (8 new tokens) that open with a refusal under the evaluation's `prefix` rule, so a size is
  judged by the same rule the pruning ablation's attack success rate uses;
- utility: the perplexity of the utility responses (benign:calibration answers, teacher-forced, loss on
  response tokens only), as a ratio to the unpruned model's.

Each group is pruned (reversibly) at candidate sizes from large to small, in the order the groups are
assigned (SCU, UCU, then RU given the first two):

- SCU: the size at which pruning stops hurting safety marks the group's edge. The pick is the smallest
  candidate whose pruning still *hurts safety* (the refusal rate drops by at least ``hurt_safety``),
  accepted when that pruning *spares utility* (perplexity ratio at most ``1 + spare_utility``).
- UCU: likewise, the smallest candidate whose pruning still *hurts utility* (perplexity ratio at least
  ``1 + hurt_utility``), accepted when it *spares safety* (refusal rate within ``spare_safety``).
- RU: the largest candidate whose pruning spares both: the biggest budget that matters for neither.

The smallest still-harmful size is the core a group needs to carry its attribute; larger sets add units
that also carry the other attribute (pruning them hurts both), smaller ones no longer carry it. A group
no candidate satisfies keeps the paper's default size and the sweep records ``met: false`` with the
reason, which the CLI prints; read the sweep table (saved in groups.json and plotted in
``size_sweep.png``) rather than trust that size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ssah.defaults import DEFAULT_NORMALIZATION, DEFAULT_RANKING, DEFAULT_SIZES, SIZE_KEYS
from ssah.errors import SsahError
from ssah.io import save_png
from ssah.units.groups import make_groups
from ssah.units.scores import Scores, make_batches

log = logging.getLogger(__name__)

SWEEP_METHOD = "pruning sweep, large to small (ssah.units.size_sweep)"
RULE = {
    "SCU": "smallest size whose pruning still drops the refusal rate by >= hurt_safety; accepted if perplexity "
           "ratio <= 1 + spare_utility",
    "UCU": "smallest size whose pruning still raises perplexity by a ratio >= 1 + hurt_utility; accepted if the "
           "refusal rate moves by <= spare_safety",
    "RU": "largest size whose pruning moves the refusal rate by <= spare_safety and perplexity by a ratio "
          "<= 1 + spare_utility",
    "fallback": "the paper's default size, with met=false",
}
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "scu": (0.10, 0.05, 0.03, 0.02, 0.013, 0.01, 0.005, 0.0025),
    "ucu": (0.30, 0.20, 0.133, 0.10, 0.05, 0.025, 0.01),
    "ru": (0.50, 0.40, 0.30, 0.20, 0.148, 0.10, 0.05, 0.02),
}


@dataclass(frozen=True)
class SweepThresholds:
    """What "hurts" and "spares" mean (module docstring); shares in points/100, perplexity as a ratio - 1."""

    hurt_safety: float = 0.30    # refusal rate drops by >= 30 points (the pruning ablation's own bar)
    spare_safety: float = 0.10   # refusal rate moves by <= 10 points (a size-matched random set's bar)
    hurt_utility: float = 0.50   # perplexity rises by >= 50%
    spare_utility: float = 0.10  # perplexity rises by <= 10%

    @classmethod
    def parse(cls, text: str | None) -> SweepThresholds:
        """``hurt_safety=0.3,spare_utility=0.1`` (omitted ones keep their defaults)."""
        values = asdict(cls())
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            name, sep, value = part.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in values:
                raise SsahError(f"bad sweep threshold {part!r}; write NAME=VALUE with NAME one of "
                                f"{', '.join(values)}")
            try:
                number = float(value)
            except ValueError:
                raise SsahError(f"sweep threshold {part!r} is not a number") from None
            if not 0 <= number < float("inf") or (name.endswith("safety") and number > 1):
                raise SsahError(f"sweep threshold {part!r} must be a finite non-negative number"
                                + (" at most 1 (a share of prompts)" if name.endswith("safety") else ""))
            values[name] = number
        return cls(**values)


@dataclass(frozen=True)
class Attributes:
    """The two measurements of one model state."""

    refusal_rate: float  # share of safety prompts whose greedy reply opens with a refusal (prefix rule)
    nll: float  # mean negative log-likelihood per utility response token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclass
class AttributeProbe:
    """Prepared inputs for measuring safety and utility again and again on one model."""

    safety_prompts: list[str]
    utility_batches: list[dict[str, torch.Tensor]]
    data: dict[str, Any]  # names and fingerprints, for the record
    system: str | None = None
    max_new_tokens: int = 8
    batch_size: int = 16

    @classmethod
    def build(cls, loaded, safety_data, utility_data, *, samples: int = 32, system: str | None = None,
              max_new_tokens: int = 8, batch_size: int = 16, max_length: int = 256) -> AttributeProbe:
        """`samples` records of each dataset (in dataset order); the utility records need responses."""
        if samples < 1:
            raise SsahError(f"the size sweep needs at least one sample, got {samples}")
        safety, utility = safety_data.take(samples), utility_data.take(samples)
        missing = [r.id for r in utility if not r.response]
        if missing:
            raise SsahError(f"the size sweep's utility data {utility_data.name} has records without a response "
                            f"(e.g. {missing[0]}); use data with reference answers, e.g. benign:calibration")
        pairs = [(r.prompt, r.response) for r in utility]
        return cls(
            safety_prompts=[r.prompt for r in safety],
            utility_batches=make_batches(loaded.tokenizer, pairs, batch_size, max_length, system),
            data={"safety": {"name": safety_data.name, "fingerprint": safety_data.fingerprint, "samples": len(safety)},
                  "utility": {"name": utility_data.name, "fingerprint": utility_data.fingerprint,
                              "samples": len(utility)},
                  "max_new_tokens": max_new_tokens},
            system=system, max_new_tokens=max_new_tokens, batch_size=batch_size,
        )

    @torch.inference_mode()
    def measure(self, model, tokenizer) -> Attributes:
        from ssah.evaluate.generation import generate_replies
        from ssah.evaluate.rules import is_refusal
        from ssah.units.scoring import response_nll

        replies = generate_replies(model, tokenizer, self.safety_prompts, model_key="size-sweep", system=self.system,
                                   max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, progress=False)
        nll, counts = response_nll(model, self.utility_batches)
        total, tokens = sum(nll), sum(counts)
        if tokens == 0:
            raise SsahError("the size sweep's utility batches hold no response tokens; raise max_length")
        return Attributes(sum(map(is_refusal, replies)) / len(replies), total / tokens)


@dataclass
class SweepStep:
    """One pruned measurement and what it means under the thresholds."""

    group: str
    fraction: float
    units: int
    refusal_rate: float
    perplexity_ratio: float
    safety_hurt: bool
    safety_spared: bool
    utility_hurt: bool
    utility_spared: bool


@dataclass
class SizeSweep:
    """The chosen sizes, whether each group met the rule, and every measurement behind them."""

    sizes: dict[str, float]
    met: dict[str, bool]
    reasons: dict[str, str]
    baseline: Attributes
    steps: list[SweepStep]
    thresholds: SweepThresholds
    grids: dict[str, tuple[float, ...]]
    data: dict[str, Any]
    normalize: str
    ranking: str
    model_fingerprint: str

    def request(self) -> dict[str, Any]:
        """What determines the outcome (for reusing a finished groups folder)."""
        return request_key(self.thresholds, self.grids, self.data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": SWEEP_METHOD,
            "request": self.request(),
            "sizes": self.sizes,
            "met": self.met,
            "reasons": self.reasons,
            "rule": RULE,
            "thresholds": asdict(self.thresholds),
            "baseline": {**asdict(self.baseline), "perplexity": self.baseline.perplexity},
            "steps": [asdict(step) for step in self.steps],
        }


def request_key(thresholds: SweepThresholds, grids: dict[str, Sequence[float]], data: dict) -> dict[str, Any]:
    return {"method": SWEEP_METHOD, "thresholds": asdict(thresholds),
            "grids": {k: list(v) for k, v in grids.items()},
            "data": {role: {"fingerprint": data[role]["fingerprint"], "samples": data[role]["samples"]}
                     for role in ("safety", "utility")},
            "max_new_tokens": data.get("max_new_tokens")}


def _check_grids(grids: dict[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    out = {}
    for key in SIZE_KEYS:
        values = tuple(sorted({float(v) for v in grids.get(key, DEFAULT_GRIDS[key])}, reverse=True))
        if not values or any(not 0 < v < 1 for v in values):
            raise SsahError(f"the size sweep's candidates for {key} must be fractions between 0 and 1, got {values}")
        out[key] = values
    return out


def sweep_sizes(loaded, safety: Scores, utility: Scores, probe: AttributeProbe, *,
                normalize: str = DEFAULT_NORMALIZATION, ranking: str = DEFAULT_RANKING,
                thresholds: SweepThresholds | None = None,
                grids: dict[str, Sequence[float]] | None = None, ru_normalize: str | None = None,
                ru_ranking: str | None = None) -> SizeSweep:
    """Choose SCU, UCU and RU sizes by the rule in the module docstring; the model is left unchanged.
    Each measurement is logged (logger `ssah.units.size_sweep`)."""
    thresholds = thresholds or SweepThresholds()
    grids = _check_grids(grids or DEFAULT_GRIDS)
    if loaded.fingerprint != safety.model_fingerprint:
        raise SsahError(f"the model {loaded.spec} (fingerprint {loaded.fingerprint}) is not the model the scores "
                        f"were computed on ({safety.model_fingerprint}); pass that model to the size sweep")
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        base = probe.measure(model, loaded.tokenizer)
        log.info("  size sweep: unpruned refusal rate %.0f%%, perplexity %.3g", 100 * base.refusal_rate,
                 base.perplexity)
        if base.refusal_rate < thresholds.hurt_safety:
            raise SsahError(f"the model refuses only {base.refusal_rate:.0%} of the sweep's safety prompts "
                            f"({probe.data['safety']['name']}); pruning cannot show a safety loss of "
                            f"{thresholds.hurt_safety:.0%}, so SCU cannot be sized automatically; align the model "
                            "first or give fixed --sizes")
        steps: list[SweepStep] = []
        chosen: dict[str, float] = {}
        met: dict[str, bool] = {}
        reasons: dict[str, str] = {}
        for key in SIZE_KEYS:
            group = key.upper()
            room = 1.0 - sum(chosen.values())
            sweep = _SweepGroup(loaded, safety, utility, probe, base, thresholds, normalize, ranking, chosen,
                                ru_normalize, ru_ranking)
            pick, reasons[group] = sweep.run(group, [f for f in grids[key] if f <= room])
            steps += sweep.steps
            met[group] = pick is not None
            chosen[key] = pick if pick is not None else min(DEFAULT_SIZES[key], room)
            reasons[group] += f"; kept the default {chosen[key]:g}" if pick is None else ""
    finally:
        model.train(was_training)
    return SizeSweep({k: chosen[k] for k in SIZE_KEYS}, met, reasons, base, steps, thresholds, grids, probe.data,
                     normalize, ranking, loaded.fingerprint)


@dataclass
class _SweepGroup:
    """One group's sweep: prune it at each candidate size (large to small) and apply the rule."""

    loaded: Any
    safety: Scores
    utility: Scores
    probe: AttributeProbe
    base: Attributes
    thresholds: SweepThresholds
    normalize: str
    ranking: str
    chosen: dict[str, float]
    ru_normalize: str | None = None  # RU's own definition (make_groups)
    ru_ranking: str | None = None

    def __post_init__(self) -> None:
        self.steps: list[SweepStep] = []

    def measure(self, group: str, fraction: float) -> SweepStep:
        from ssah.interventions.masks import mask_from_expression
        from ssah.interventions.prune import pruned

        groups = make_groups(self.safety, self.utility, {**self.chosen, group.lower(): fraction},
                             normalize=self.normalize, ranking=self.ranking, ru_normalize=self.ru_normalize,
                             ru_ranking=self.ru_ranking)
        mask = mask_from_expression(groups, group)
        with pruned(self.loaded.model, self.loaded.layout, mask, check=False):
            after = self.probe.measure(self.loaded.model, self.loaded.tokenizer)
        t = self.thresholds
        drop, ratio = self.base.refusal_rate - after.refusal_rate, after.perplexity / self.base.perplexity
        step = SweepStep(group, fraction, mask.count(), after.refusal_rate, ratio,
                         safety_hurt=drop >= t.hurt_safety - 1e-9, safety_spared=abs(drop) <= t.spare_safety + 1e-9,
                         utility_hurt=ratio >= 1 + t.hurt_utility, utility_spared=ratio <= 1 + t.spare_utility)
        log.info(f"  size sweep {group} {fraction:>7.2%} ({step.units:,} units): refusal rate "
                 f"{after.refusal_rate:.0%}, perplexity x{ratio:.3f}")
        self.steps.append(step)
        return step

    def run(self, group: str, candidates: list[float]) -> tuple[float | None, str]:
        """(the chosen size or None, why)."""
        if group == "RU":
            for fraction in candidates:
                step = self.measure(group, fraction)
                if step.safety_spared and step.utility_spared:
                    return fraction, f"met the rule at {fraction:g}"
            return None, "pruning it hurts safety or utility at every size tried"
        own, other = ("safety", "utility") if group == "SCU" else ("utility", "safety")
        edge = None  # the last (smallest so far) step whose pruning hurt the group's own attribute
        for fraction in candidates:
            step = self.measure(group, fraction)
            if not getattr(step, f"{own}_hurt"):
                break  # the group no longer hurts its attribute: smaller sizes hurt even less
            edge = step
        if edge is None:
            return None, f"pruning it hurts {own} at none of the sizes tried"
        if getattr(edge, f"{other}_spared"):
            return edge.fraction, f"met the rule at {edge.fraction:g}"
        return None, f"the smallest size whose pruning hurts {own} ({edge.fraction:g}) does not spare {other}"


def plot_size_sweep(sweep: SizeSweep | dict, path: str | Path) -> Path:
    """Refusal share and perplexity ratio against group size, one panel per group (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    record = sweep.to_dict() if isinstance(sweep, SizeSweep) else sweep
    base_rate = record["baseline"]["refusal_rate"]
    thresholds = record["thresholds"]
    figure = Figure(figsize=(10, 3.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3, squeeze=False)[0]
    for ax, group in zip(axes, ("SCU", "UCU", "RU")):
        steps = sorted((s for s in record["steps"] if s["group"] == group), key=lambda s: s["fraction"])
        fractions = [s["fraction"] for s in steps]
        ax.plot(fractions, [s["refusal_rate"] for s in steps], "o-", color="#d62728", label="refusal rate")
        ax.axhline(base_rate, color="#d62728", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{100 * f:.3g}%" for f in fractions], rotation=60, fontsize="small")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{group} size (share of units)")
        twin = ax.twinx()
        twin.plot(fractions, [s["perplexity_ratio"] for s in steps], "s-", color="#1f77b4", label="perplexity ratio")
        twin.axhline(1 + thresholds["spare_utility"], color="#1f77b4", lw=0.8, ls=":")
        twin.set_yscale("log")
        twin.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"x{value:g}"))
        twin.yaxis.set_minor_formatter(NullFormatter())
        chosen = record["sizes"][group.lower()]
        ax.axvline(chosen, color="black", lw=1, ls="--")
        ax.set_title(f"{group}: {chosen:.2%}" + ("" if record["met"][group] else " (rule not met)"), fontsize="medium")
    axes[0].set_ylabel("refusal rate (safety prompts)", color="#d62728")
    twin.set_ylabel("perplexity / unpruned (utility answers)", color="#1f77b4")
    figure.tight_layout()
    return save_png(figure, path)
