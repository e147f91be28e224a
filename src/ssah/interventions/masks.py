"""Unit masks: a set of units, and the parameter entries those units own.

Prune, freeze and align all take a `UnitMask`. Build one from saved groups with an expression (see
`ssah.interventions.expressions` for the syntax: SCU, SCU+CU:top=0.06, random:like=SCU, ...):

    mask = mask_from_expression(Groups.load("runs/x/groups"), "SCU+CU:top=0.06")

The scores used for ranking are the normalised safety/utility scores stored with the groups.
A mask remembers the fingerprint of the model its groups were computed on and is refused on
any other model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ssah.defaults import GROUP_NAMES
from ssah.errors import SsahError
from ssah.interventions.base import short_digest
from ssah.interventions.expressions import RANK_KEYS, Term, parse_mask_expression
from ssah.units.layout import UnitLayout


@dataclass
class UnitMask:
    """Selected units per kind ([num_layers, units_per_layer] booleans) plus provenance."""

    units: dict[str, torch.Tensor]
    expression: str
    model_fingerprint: str | None = None
    groups_digest: str | None = None  # identifies the groups the mask was built from

    def digest(self) -> str:
        """16 hex digits naming exactly which units are selected (whatever expression selected them)."""
        parts = [f"{kind}:{tuple(units.shape)};".encode() + units.to(torch.uint8).numpy().tobytes()
                 for kind, units in sorted(self.units.items())]
        return short_digest(*parts)

    def count(self) -> int:
        return int(sum(m.sum() for m in self.units.values()))

    def total(self) -> int:
        return int(sum(m.numel() for m in self.units.values()))

    def share(self) -> float:
        return self.count() / max(1, self.total())

    def check_model(self, fingerprint: str, layout: UnitLayout) -> None:
        """Refuse a mask computed on another model or with another unit layout."""
        if self.model_fingerprint and fingerprint != self.model_fingerprint:
            raise SsahError(f"mask {self.expression!r} was made for model {self.model_fingerprint}, "
                            f"not this model ({fingerprint}); recompute the scores and groups on this model")
        for kind, units in self.units.items():
            expected = (layout.num_layers, layout.units_per_layer[kind])
            if tuple(units.shape) != expected:
                raise SsahError(f"mask {self.expression!r} has {tuple(units.shape)} {kind} units but the model "
                                f"has {expected} (another model or attention unit granularity)")

    def owned_slices(self, layout: UnitLayout) -> dict[tuple[str, int], torch.Tensor]:
        """(parameter name, axis) -> sorted positions along that axis owned by the selected units."""
        merged: dict[tuple[str, int], list[torch.Tensor]] = {}
        for kind, selected in self.units.items():
            for layer in range(layout.num_layers):
                units = selected[layer].nonzero().flatten()
                if units.numel() == 0:
                    continue
                for owned in layout.block(kind, layer).owned:
                    merged.setdefault((owned.param, owned.dim), []).append(owned.positions(units))
        return {key: torch.cat(parts).unique(sorted=True) for key, parts in merged.items()}


def outside_slices(mask: UnitMask, layout: UnitLayout) -> tuple[list[str], dict[tuple[str, int], torch.Tensor]]:
    """The parameter entries no unit of `mask` owns: (parameters none of its units owns any entry of,
    {(parameter name, axis): sorted positions along that axis no selected unit owns} for the others).
    With every unit selected this is what no unit owns at all (embeddings and head, norms, q/k rows,
    shared v rows, shared biases): the one definition of "outside the units" that freezing with
    `train_only` and restoring (`ssah.interventions.restore`) share."""
    slices = mask.owned_slices(layout)
    axes: dict[str, int] = {}
    for name, dim in slices:
        if axes.setdefault(name, dim) != dim:
            raise SsahError(f"units own entries of {name} along two axes; its unowned entries are not one slice")
    whole = [name for name in layout.param_shapes if name not in axes]
    partial = {}
    for (name, dim), owned in slices.items():
        outside = torch.ones(layout.param_shapes[name][dim], dtype=torch.bool)
        outside[owned] = False
        partial[(name, dim)] = outside.nonzero().flatten()
    return whole, partial


def random_mask(layout: UnitLayout, share: float, seed: int = 0, fingerprint: str | None = None) -> UnitMask:
    """Each unit of a layout drawn independently with probability `share` (seeded), e.g. a
    baseline or a stand-in for groups in tests and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    units = {k: torch.rand(layout.num_layers, layout.units_per_layer[k], generator=generator) < share
             for k in layout.kinds}
    return UnitMask(units, f"random:frac={share}", fingerprint)


def layout_mask(layout: UnitLayout, fill: bool, expression: str, fingerprint: str | None = None) -> UnitMask:
    """A mask selecting no unit (fill=False) or every unit (fill=True) of a layout."""
    units = {k: torch.full((layout.num_layers, layout.units_per_layer[k]), fill, dtype=torch.bool)
             for k in layout.kinds}
    return UnitMask(units, expression, fingerprint)


def mask_from_expression(groups, expression: str, seed: int = 0) -> UnitMask:
    """Evaluate a mask expression (see `ssah.interventions.expressions`) against saved `Groups`.
    `seed` draws the random terms that give no seed= of their own."""
    terms = parse_mask_expression(expression)
    total = sum(labels.numel() for labels in groups.labels.values())
    selected = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in groups.labels.items()}
    generator = torch.Generator().manual_seed(seed)
    for term in terms:
        if term.name in GROUP_NAMES:
            part = groups.members(term.name)
            if "top" in term.options:
                part = _top_share(groups, part, term.options["top"], term.options.get("by", "s-u"), total, term.text)
        elif term.name == "ALL":
            part = {k: torch.ones_like(v) for k, v in selected.items()}
        else:
            part = _random_units(groups, term, generator)
        for kind in selected:
            selected[kind] |= part[kind]
    return UnitMask(selected, expression.strip(), groups.model_fingerprint, groups_digest(groups))


def groups_digest(groups) -> str:
    """A short hash of the group labels, so outputs record exactly which grouping made them."""
    digest = hashlib.sha256()
    for kind in sorted(groups.labels):
        digest.update(kind.encode())
        digest.update(groups.labels[kind].to(torch.int8).numpy().tobytes())
    return digest.hexdigest()[:16]


def split_mask_spec(spec: str) -> tuple[str, str]:
    """Split 'GROUPS_DIR:EXPRESSION' at the first ':' whose left side is a groups folder."""
    for i, char in enumerate(spec):
        if char == ":" and (Path(spec[:i]) / "groups.json").is_file():
            return spec[:i], spec[i + 1:]
    raise SsahError(f"{spec!r} is not GROUPS_DIR:MASK with a folder written by `ssah groups` "
                    "(e.g. runs/x/groups:SCU+CU)")


def load_mask(groups_dir: str, expression: str, seed: int = 0) -> UnitMask:
    """Load groups from a folder and build the mask an expression names."""
    from ssah.units.groups import Groups

    return mask_from_expression(Groups.load(groups_dir), expression, seed)


def _rank_score(groups, kind: str, by: str) -> torch.Tensor:
    s, u = groups.safety[kind].double(), groups.utility[kind].double()
    scores = {"s-u": s - u, "u-s": u - s, "s": s, "u": u, "sum": s + u}
    if by not in scores:
        raise SsahError(f"unknown ranking {by!r} in a mask term; use one of {', '.join(RANK_KEYS)}")
    return scores[by]


def _top_share(groups, members: dict, fraction: float, by: str, total: int, term: str) -> dict:
    """The `fraction * total` highest-ranked units among `members` (all kinds ranked together)."""
    want = round(fraction * total)
    available = int(sum(m.sum() for m in members.values()))
    if want > available:
        raise SsahError(f"{term!r} asks for {want} units ({fraction:g} of all) but the group has {available}; "
                        "lower top=")
    kinds = list(members)
    ranked = torch.cat([torch.where(members[k], _rank_score(groups, k, by), torch.tensor(-torch.inf,
                                    dtype=torch.float64)).flatten() for k in kinds])
    chosen = torch.zeros_like(ranked, dtype=torch.bool)
    chosen[torch.argsort(ranked, descending=True, stable=True)[:want]] = True
    out, offset = {}, 0
    for kind in kinds:
        n = members[kind].numel()
        out[kind] = chosen[offset:offset + n].view_as(members[kind])
        offset += n
    return out


def _random_units(groups, term: Term, generator: torch.Generator) -> dict:
    if "seed" in term.options:
        generator.manual_seed(term.options["seed"])
    if "like" in term.options:
        return _like(groups.members(term.options["like"]), generator, "prefer-outside")
    fraction = term.options["frac"]
    flat = torch.cat([v.flatten() for v in groups.labels.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.randperm(flat.numel(), generator=generator)[:round(fraction * flat.numel())]] = True
    out, offset = {}, 0
    for kind, labels in groups.labels.items():
        out[kind] = chosen[offset:offset + labels.numel()].view(labels.shape)
        offset += labels.numel()
    return out


def _like(reference: dict[str, torch.Tensor], generator: torch.Generator, draw: str) -> dict:
    """Per kind and layer, as many units as `reference` selects there, drawn uniformly: "prefer-outside"
    (from the units outside the reference; where a layer has too few, the rest from inside it) or from
    "all" units of that layer and kind."""
    out = {}
    for kind, ref in reference.items():
        picked = torch.zeros_like(ref, dtype=torch.bool)
        for layer in range(ref.shape[0]):
            need = int(ref[layer].sum())
            if draw == "all":
                order = torch.randperm(ref.shape[1], generator=generator)
            else:
                inside, outside = ref[layer].nonzero().flatten(), (~ref[layer]).nonzero().flatten()
                order = outside[torch.randperm(outside.numel(), generator=generator)]
                if need > outside.numel():
                    order = torch.cat([order, inside[torch.randperm(inside.numel(), generator=generator)]])
            picked[layer, order[:need]] = True
        out[kind] = picked
    return out


def random_like(mask: UnitMask, seed: int, outside: bool = True) -> UnitMask:
    """A control for `mask`: per kind and layer, as many units as `mask` selects there, drawn with
    `seed` from the units outside it (`outside`; where a layer has too few, the rest from inside it)
    or uniformly from all units of that layer and kind (the control for a mask that covers most units,
    as SCU + all CU does: there, drawing outside first would take every unit outside it, no random draw)."""
    draw = "prefer-outside" if outside else "all"
    units = _like(mask.units, torch.Generator().manual_seed(seed), draw)
    return UnitMask(units, f"random:like=({mask.expression}),{draw},seed={seed}", mask.model_fingerprint,
                    mask.groups_digest)


def complement(mask: UnitMask) -> UnitMask:
    """Every unit `mask` does not select."""
    return UnitMask({kind: ~units for kind, units in mask.units.items()}, f"not ({mask.expression})",
                    mask.model_fingerprint, mask.groups_digest)


def overlap(mask: UnitMask, other: UnitMask) -> float:
    """The share of `mask`'s units that `other` selects too."""
    shared = sum(int((units & other.units[kind]).sum()) for kind, units in mask.units.items())
    return shared / max(1, mask.count())
