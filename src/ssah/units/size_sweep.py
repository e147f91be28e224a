"""`--sizes auto`: choose each group's size by a pruning sweep on calibration data.

    from ssah.units.size_sweep import AttributeProbe, sweep_sizes
    probe = AttributeProbe.build(loaded, load_dataset("harmful:calibration"), load_dataset("benign:calibration"))
    sweep = sweep_sizes(loaded, safety_scores, utility_scores, probe)
    groups = make_groups(safety_scores, utility_scores, sweep.sizes)

Two generation-free measurements stand for the two attributes (both on calibration data, never test data):

- safety: the share of safety prompts (harmful:calibration by default) on which the model leans to refuse,
  i.e. whose refusal-score margin (log-probability of refusal openings over compliance openings, see
  `ssah.evaluate.refusal_score`) is positive; a change is measured in points of that share;
- utility: the perplexity of the utility responses (benign:calibration answers, teacher-forced, loss on
  response tokens only); a change is the ratio to the unpruned model's.

The rule, for each group in the order the groups are assigned (SCU, UCU, then RU given the first two), with
candidate sizes tried from large to small and the group pruned (reversibly) at each size:

- SCU: the largest size whose pruning *hurts safety* (the refusal share drops by at least
  ``hurt_safety``) and *spares utility* (perplexity ratio at most ``1 + spare_utility``);
- UCU: the largest size whose pruning *hurts utility* (perplexity ratio at least ``1 + hurt_utility``)
  and *spares safety* (the refusal share moves by at most ``spare_safety`` either way);
- RU: the largest size whose pruning spares both.

Large groups hurt both attributes, small ones hurt neither; the largest size that still isolates one
attribute is the most the group can hold while staying what its name says. The sweep stops for a group
once its other attribute is spared but its own is not (smaller sizes only hurt less). When no candidate
meets the rule, the group keeps the paper's default size and the sweep records ``met: false`` with the
reason, which the CLI prints; a user should then read the sweep table (saved in groups.json and plotted
in ``size_sweep.png``) rather than trust that size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssah.errors import SsahError
from ssah.units.groups import DEFAULT_SIZES, SIZE_KEYS, SWEEP_PLOT_FILE, make_groups
from ssah.units.scores import Scores, make_batches

SWEEP_METHOD = "pruning sweep, large to small (ssah.units.size_sweep)"
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "scu": (0.10, 0.05, 0.03, 0.02, 0.013, 0.01, 0.005, 0.0025),
    "ucu": (0.30, 0.20, 0.133, 0.10, 0.05, 0.025, 0.01),
    "ru": (0.50, 0.40, 0.30, 0.20, 0.148, 0.10, 0.05, 0.02),
}


@dataclass(frozen=True)
class SweepThresholds:
    """What "hurts" and "spares" mean (module docstring); shares in points/100, perplexity as a ratio - 1."""

    hurt_safety: float = 0.30    # refusal share drops by >= 30 points (the pruning ablation's own bar)
    spare_safety: float = 0.10   # refusal share moves by <= 10 points (a size-matched random set's bar)
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
            if not number >= 0 or (name.endswith("safety") and number > 1):
                raise SsahError(f"sweep threshold {part!r} must be a non-negative number"
                                + (" at most 1 (a share of prompts)" if name.endswith("safety") else ""))
            values[name] = number
        return cls(**values)


@dataclass(frozen=True)
class Attributes:
    """The two measurements of one model state."""

    refusal_share: float  # share of safety prompts with a positive refusal margin
    refusal_margin: float  # mean margin in nats (positive: leans to refuse)
    nll: float  # mean negative log-likelihood per utility response token

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll).exp())


@dataclass
class AttributeProbe:
    """Prepared inputs for measuring safety and utility again and again on one model."""

    safety_prompts: list[str]
    refusals: list[str]
    compliance: list[str]
    utility_batches: list[dict[str, torch.Tensor]]
    data: dict[str, Any]  # names and fingerprints, for the record
    system: str | None = None
    batch_size: int = 8

    @classmethod
    def build(cls, loaded, safety_data, utility_data, *, samples: int = 32, system: str | None = None,
              batch_size: int = 8, max_length: int = 256) -> AttributeProbe:
        """`samples` records of each dataset (in dataset order); the utility records need responses."""
        from ssah.data import load_dataset

        if samples < 1:
            raise SsahError(f"the size sweep needs at least one sample, got {samples}")
        safety, utility = safety_data.take(samples), utility_data.take(samples)
        if len(safety) == 0 or len(utility) == 0:
            empty = safety_data.name if len(safety) == 0 else utility_data.name
            raise SsahError(f"the size sweep's dataset {empty} has no records")
        missing = [r.id for r in utility if not r.response]
        if missing:
            raise SsahError(f"the size sweep's utility data {utility_data.name} has records without a response "
                            f"(e.g. {missing[0]}); use data with reference answers, e.g. benign:calibration")
        pairs = [(r.prompt, r.response) for r in utility]
        return cls(
            safety_prompts=[r.prompt for r in safety],
            refusals=[r.prompt for r in load_dataset("refusals")],
            compliance=[r.prompt for r in load_dataset("compliance_openings")],
            utility_batches=make_batches(loaded.tokenizer, pairs, batch_size, max_length, system),
            data={"safety": {"name": safety_data.name, "fingerprint": safety_data.fingerprint, "samples": len(safety)},
                  "utility": {"name": utility_data.name, "fingerprint": utility_data.fingerprint,
                              "samples": len(utility)}},
            system=system, batch_size=batch_size,
        )

    @torch.inference_mode()
    def measure(self, model, tokenizer) -> Attributes:
        from ssah.evaluate.refusal_score import refusal_score

        score = refusal_score(model, tokenizer, self.safety_prompts, self.refusals, self.compliance,
                              system=self.system, batch_size=self.batch_size, progress=False)
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        for batch in self.utility_batches:
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            # position t predicts token t+1: score the response tokens from the logits one step earlier
            targets = batch["input_ids"][:, 1:].to(device)
            keep = batch["response_mask"][:, 1:].to(device).bool()
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            total -= float(logprobs[keep].sum())
            tokens += int(keep.sum())
        if tokens == 0:
            raise SsahError("the size sweep's utility batches hold no response tokens; raise max_length")
        share = sum(margin > 0 for margin in score.per_prompt) / score.n
        return Attributes(share, score.score, total / tokens)


@dataclass
class SweepStep:
    group: str
    fraction: float
    units: int
    refusal_share: float
    refusal_margin: float
    perplexity_ratio: float
    meets_rule: bool


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
    extra: dict[str, Any] = field(default_factory=dict)

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
            "rule": {
                "SCU": "largest size with refusal share drop >= hurt_safety and perplexity ratio <= 1 + spare_utility",
                "UCU": "largest size with perplexity ratio >= 1 + hurt_utility and |refusal share change| "
                       "<= spare_safety",
                "RU": "largest size with |refusal share change| <= spare_safety and perplexity ratio "
                      "<= 1 + spare_utility",
                "fallback": "the paper's default size, with met=false",
            },
            "thresholds": asdict(self.thresholds),
            "baseline": {**asdict(self.baseline), "perplexity": self.baseline.perplexity},
            "steps": [asdict(step) for step in self.steps],
        }


def request_key(thresholds: SweepThresholds, grids: dict[str, Sequence[float]], data: dict) -> dict[str, Any]:
    return {"method": SWEEP_METHOD, "thresholds": asdict(thresholds),
            "grids": {k: list(v) for k, v in grids.items()},
            "data": {role: {"fingerprint": d["fingerprint"], "samples": d["samples"]} for role, d in data.items()}}


def _check_grids(grids: dict[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    out = {}
    for key in SIZE_KEYS:
        values = tuple(sorted({float(v) for v in grids.get(key, DEFAULT_GRIDS[key])}, reverse=True))
        if not values or any(not 0 < v < 1 for v in values):
            raise SsahError(f"the size sweep's candidates for {key} must be fractions between 0 and 1, got {values}")
        out[key] = values
    return out


def sweep_sizes(loaded, safety: Scores, utility: Scores, probe: AttributeProbe, *, normalize: str = "rank",
                ranking: str = "global", thresholds: SweepThresholds | None = None,
                grids: dict[str, Sequence[float]] | None = None, progress: bool = True) -> SizeSweep:
    """Choose SCU, UCU and RU sizes by the rule in the module docstring; the model is left unchanged."""
    from ssah.interventions.masks import mask_from_expression
    from ssah.interventions.prune import pruned

    thresholds = thresholds or SweepThresholds()
    grids = _check_grids(grids or DEFAULT_GRIDS)
    if loaded.fingerprint != safety.model_fingerprint:
        raise SsahError(f"the model {loaded.spec} (fingerprint {loaded.fingerprint}) is not the model the scores "
                        f"were computed on ({safety.model_fingerprint}); pass that model to the size sweep")
    model, tokenizer = loaded.model, loaded.tokenizer
    was_training = model.training
    model.eval()
    base = probe.measure(model, tokenizer)
    if progress:
        print(f"  size sweep: unpruned refusal share {base.refusal_share:.0%}, perplexity {base.perplexity:.3g}",
              flush=True)
    if base.refusal_share < thresholds.hurt_safety:
        raise SsahError(f"the model refuses only {base.refusal_share:.0%} of the sweep's safety prompts "
                        f"({probe.data['safety']['name']}); pruning cannot show a safety loss of "
                        f"{thresholds.hurt_safety:.0%}, so SCU cannot be sized automatically; align the model "
                        "first or give fixed --sizes")
    steps: list[SweepStep] = []
    chosen: dict[str, float] = {}
    met: dict[str, bool] = {}
    reasons: dict[str, str] = {}

    def judge(group: str, after: Attributes) -> tuple[bool, bool]:
        """(meets the rule, smaller sizes cannot meet it either)."""
        drop = base.refusal_share - after.refusal_share
        ratio = after.perplexity / base.perplexity
        safety_hurt, safety_spared = drop >= thresholds.hurt_safety - 1e-9, abs(drop) <= thresholds.spare_safety + 1e-9
        utility_hurt, utility_spared = ratio >= 1 + thresholds.hurt_utility, ratio <= 1 + thresholds.spare_utility
        if group == "SCU":  # once utility is spared but safety no longer hurts, smaller sets hurt even less
            return safety_hurt and utility_spared, utility_spared and not safety_hurt
        if group == "UCU":
            return utility_hurt and safety_spared, safety_spared and not utility_hurt
        return safety_spared and utility_spared, False

    for key in SIZE_KEYS:
        group = key.upper()
        room = 1.0 - sum(chosen.values())
        candidates = [f for f in grids[key] if f <= room]
        pick = None
        for fraction in candidates:
            sizes = {**chosen, key: fraction}
            groups = make_groups(safety, utility, sizes, normalize=normalize, ranking=ranking)
            mask = mask_from_expression(groups, group)
            with pruned(model, loaded.layout, mask, check=False):
                after = probe.measure(model, tokenizer)
            meets, hopeless = judge(group, after)
            steps.append(SweepStep(group, fraction, mask.count(), after.refusal_share, after.refusal_margin,
                                   after.perplexity / base.perplexity, meets))
            if progress:
                print(f"  size sweep {group} {fraction:>7.2%} ({mask.count():,} units): refusal share "
                      f"{after.refusal_share:.0%} (base {base.refusal_share:.0%}), perplexity x"
                      f"{after.perplexity / base.perplexity:.3f}", flush=True)
            if meets:
                pick = fraction
                break
            if hopeless:
                break
        if pick is None:
            chosen[key] = min(DEFAULT_SIZES[key], room)
            met[group] = False
            reasons[group] = (f"no candidate size met the rule ({', '.join(f'{f:g}' for f in candidates)} tried); "
                              f"kept the default {chosen[key]:g}")
        else:
            chosen[key] = pick
            met[group] = True
            reasons[group] = f"largest candidate meeting the rule: {pick:g}"
    if was_training:
        model.train()
    return SizeSweep({k: chosen[k] for k in SIZE_KEYS}, met, reasons, base, steps, thresholds, grids, probe.data,
                     normalize, ranking, loaded.fingerprint)


def plot_size_sweep(sweep: SizeSweep | dict, path: str | Path) -> Path:
    """Refusal share and perplexity ratio against group size, one panel per group (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    record = sweep.to_dict() if isinstance(sweep, SizeSweep) else sweep
    base_share = record["baseline"]["refusal_share"]
    thresholds = record["thresholds"]
    figure = Figure(figsize=(10, 3.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3, squeeze=False)[0]
    for ax, group in zip(axes, ("SCU", "UCU", "RU")):
        steps = sorted((s for s in record["steps"] if s["group"] == group), key=lambda s: s["fraction"])
        fractions = [s["fraction"] for s in steps]
        ax.plot(fractions, [s["refusal_share"] for s in steps], "o-", color="#d62728", label="refusal share")
        ax.axhline(base_share, color="#d62728", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{group} size (share of units)")
        twin = ax.twinx()
        twin.plot(fractions, [s["perplexity_ratio"] for s in steps], "s-", color="#1f77b4", label="perplexity ratio")
        twin.axhline(1 + thresholds["spare_utility"], color="#1f77b4", lw=0.8, ls=":")
        twin.set_yscale("log")
        chosen = record["sizes"][group.lower()]
        ax.axvline(chosen, color="black", lw=1, ls="--")
        ax.set_title(f"{group}: {chosen:.2%}" + ("" if record["met"][group] else " (rule not met)"), fontsize="medium")
    axes[0].set_ylabel("refusal share (safety prompts)", color="#d62728")
    twin.set_ylabel("perplexity / unpruned (utility answers)", color="#1f77b4")
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path
