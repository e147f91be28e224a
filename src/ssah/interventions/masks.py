"""Unit masks: a set of units, and the parameter entries those units own.

Prune, freeze and align all take a `UnitMask`. Build one from saved groups with an expression:

    SCU                   one group (SCU, UCU, CU, RU; case-insensitive)
    SCU+CU                a union of terms
    SCU+CU:top=0.06       SCU plus the top 6% *of all units*, taken from CU, ranked by S-U
                          (the paper's freeze setting (i): SCU + top 6% CU, about 7.5% of units).
                          Rank with `by=`: s-u (default: most safety-leaning first), u-s, s, u, sum.
    random:like=SCU       a control: per kind and layer, as many units as SCU has there, drawn
                          uniformly (seeded) from the units outside SCU
    random:frac=0.05      5% of all units, uniformly at random (seeded)
    all                   every unit

The scores used for ranking are the normalised safety/utility scores stored with the groups.
A mask remembers the fingerprint of the model its groups were computed on and is refused on
any other model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ssah.errors import SsahError
from ssah.units.layout import UnitLayout

RANK_KEYS = ("s-u", "u-s", "s", "u", "sum")


@dataclass
class UnitMask:
    """Selected units per kind ([num_layers, units_per_layer] booleans) plus provenance."""

    units: dict[str, torch.Tensor]
    expression: str
    model_fingerprint: str | None = None
    groups_digest: str | None = None  # identifies the groups the mask was built from

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


def layout_mask(layout: UnitLayout, fill: bool, expression: str, fingerprint: str | None = None) -> UnitMask:
    """A mask selecting no unit (fill=False) or every unit (fill=True) of a layout."""
    units = {k: torch.full((layout.num_layers, layout.units_per_layer[k]), fill, dtype=torch.bool)
             for k in layout.kinds}
    return UnitMask(units, expression, fingerprint)


def mask_from_expression(groups, expression: str, seed: int = 0) -> UnitMask:
    """Parse a mask expression (see the module docstring) against saved `Groups`."""
    from ssah.units.groups import GROUP_NAMES

    text = expression.strip()
    if not text:
        raise SsahError("empty mask expression; use e.g. SCU, SCU+CU, SCU+CU:top=0.06 or random:like=SCU")
    total = sum(labels.numel() for labels in groups.labels.values())
    selected = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in groups.labels.items()}
    generator = torch.Generator().manual_seed(seed)
    for term in text.split("+"):
        name, _, opts_text = term.strip().partition(":")
        opts = _parse_options(opts_text, term)
        key = name.strip().upper()
        if key in GROUP_NAMES:
            part = groups.members(key)
            if "top" in opts:
                part = _top_share(groups, part, _number(opts.pop("top"), float, "top", term), opts.pop("by", "s-u"),
                                  total, term)
        elif key == "ALL":
            part = {k: torch.ones_like(v) for k, v in selected.items()}
        elif key == "RANDOM":
            part = _random_units(groups, opts, generator, term)
        else:
            raise SsahError(f"unknown mask term {name.strip()!r} in {expression!r}; "
                            f"use {', '.join(GROUP_NAMES)}, all, random:like=GROUP or random:frac=F")
        if opts:
            raise SsahError(f"unknown option(s) {', '.join(opts)} in mask term {term!r}")
        for kind in selected:
            selected[kind] |= part[kind]
    return UnitMask(selected, text, groups.model_fingerprint, groups_digest(groups))


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


def _parse_options(text: str, term: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SsahError(f"mask option {item!r} in {term!r} needs the form key=value")
        opts[key.strip().lower()] = value.strip()
    return opts


def _number(text: str, kind: type, option: str, term: str):
    """A mask option's value as `kind`, or one clear error."""
    try:
        return kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise SsahError(f"mask option {option}={text!r} in {term!r} must be {wanted}") from None


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
    if not 0 <= fraction <= 1 or want > available:
        raise SsahError(f"{term!r} asks for {want} units but the group has {available}; lower top=")
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


def _random_units(groups, opts: dict, generator: torch.Generator, term: str) -> dict:
    if "seed" in opts:
        generator.manual_seed(_number(opts.pop("seed"), int, "seed", term))
    if "like" in opts:
        reference = groups.members(opts.pop("like").upper())
        out = {}
        for kind, ref in reference.items():
            picked = torch.zeros_like(ref)
            for layer in range(ref.shape[0]):
                pool = (~ref[layer]).nonzero().flatten()
                need = int(ref[layer].sum())
                picked[layer, pool[torch.randperm(pool.numel(), generator=generator)[:need]]] = True
            out[kind] = picked
        return out
    if "frac" in opts:
        fraction = _number(opts.pop("frac"), float, "frac", term)
        if not 0 <= fraction <= 1:
            raise SsahError(f"random:frac must be within [0, 1], got {fraction}")
        flat = torch.cat([v.flatten() for v in groups.labels.values()])
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.randperm(flat.numel(), generator=generator)[:round(fraction * flat.numel())]] = True
        out, offset = {}, 0
        for kind, labels in groups.labels.items():
            out[kind] = chosen[offset:offset + labels.numel()].view(labels.shape)
            offset += labels.numel()
        return out
    raise SsahError(f"{term!r} needs like=GROUP or frac=F")
