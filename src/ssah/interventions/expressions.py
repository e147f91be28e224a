"""Mask expressions parsed without a model (no torch), so a typo fails before any work starts.

    SCU                   one group (SCU, UCU, CU, RU; case-insensitive)
    SCU+CU                a union of terms
    SCU+CU:top=0.06       SCU plus the top 6% *of all units*, taken from CU, ranked by S-U
                          (the paper's freeze setting (i): SCU + top 6% CU, about 7.5% of units).
                          Rank with `by=`: s-u (default: most safety-leaning first), u-s, s, u, sum.
    random:like=SCU       a control: per kind and layer, as many units as SCU has there, drawn
                          uniformly (seeded) from the units outside SCU (where a layer has fewer
                          outside than inside, the rest from inside it)
    random:frac=0.05      5% of all units, uniformly at random (seeded)
    random:like=SCU,seed=1  the same control with its own seed
    all                   every unit

`parse_mask_expression` checks the syntax and every option's value; `ssah.interventions.masks`
evaluates a parsed expression against saved groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssah.defaults import GROUP_NAMES, check_seed
from ssah.errors import SsahError

RANK_KEYS = ("s-u", "u-s", "s", "u", "sum")
EXAMPLES = "e.g. SCU, SCU+CU, SCU+CU:top=0.06 or random:like=SCU"
# term -> its options
OPTIONS = {**{name: ("top", "by") for name in GROUP_NAMES}, "ALL": (), "RANDOM": ("like", "frac", "seed")}


@dataclass(frozen=True)
class Term:
    """One term of a union: a group, `all` or `random`, with its checked options."""

    name: str  # SCU, UCU, CU, RU, ALL or RANDOM
    options: dict = field(default_factory=dict)
    text: str = ""


def parse_mask_expression(expression: str) -> list[Term]:
    """The terms of a mask expression (see the module docstring), or one SsahError naming the problem."""
    text = expression.strip() if isinstance(expression, str) else ""
    if not text:
        raise SsahError(f"empty mask expression; use {EXAMPLES}")
    return [_term(part.strip(), text) for part in text.split("+")]


def _term(term: str, expression: str) -> Term:
    name, _, options_text = term.partition(":")
    key = name.strip().upper()
    if key not in OPTIONS:
        raise SsahError(f"unknown mask term {name.strip()!r} in {expression!r}; "
                        f"use {', '.join(GROUP_NAMES)}, all, random:like=GROUP or random:frac=F")
    options: dict = {}
    for item in filter(None, (p.strip() for p in options_text.split(","))):
        option, eq, value = item.partition("=")
        option = option.strip().lower()
        if not eq:
            raise SsahError(f"mask option {item!r} in {term!r} needs the form key=value")
        if option not in OPTIONS[key]:
            allowed = ", ".join(OPTIONS[key]) or "none"
            raise SsahError(f"unknown mask option {option!r} in {term!r}; options of {key.lower()}: {allowed}")
        options[option] = _option_value(option, value.strip(), term)
    if key == "RANDOM" and ("like" in options) == ("frac" in options):
        raise SsahError(f"{term!r} needs exactly one of like=GROUP or frac=F")
    return Term(key, options, term)


def _option_value(option: str, value: str, term: str):
    if option in ("top", "frac"):
        try:
            number = float(value)
        except ValueError:
            raise SsahError(f"mask option {option}={value!r} in {term!r} must be a number") from None
        if not 0 <= number <= 1:
            raise SsahError(f"mask option {option}={value} in {term!r} is a share of all units, between 0 and 1")
        return number
    if option == "seed":
        try:
            return check_seed(int(value), f"mask option seed={value}")
        except ValueError:
            raise SsahError(f"mask option seed={value!r} in {term!r} must be an integer") from None
    if option == "by":
        if value.lower() not in RANK_KEYS:
            raise SsahError(f"unknown ranking {value!r} in {term!r}; use one of {', '.join(RANK_KEYS)}")
        return value.lower()
    group = value.upper()  # like=
    if group not in GROUP_NAMES:
        raise SsahError(f"unknown group {value!r} in {term!r}; groups: {', '.join(GROUP_NAMES)}")
    return group


# the parts of a model no unit owns, by where they live (`ssah.interventions.restore`)
NON_UNIT_PARTS: tuple[str, ...] = ("embeddings", "norms", "qk", "other")


def parse_part(text: str) -> tuple[str | None, tuple[str, ...]]:
    """(the unit terms as one mask expression or None, the non-unit parts) of a part such as
    "SCU+embeddings"; checks the syntax only, so a typo fails before any model loads."""
    terms = [t.strip() for t in (text.split("+") if isinstance(text, str) else []) if t.strip()]
    if not terms:
        raise SsahError(f"empty part {text!r}; use unit groups ({', '.join(('SCU', 'UCU', 'CU', 'RU'))}) "
                        f"and {', '.join(NON_UNIT_PARTS)}, joined by +")
    extras = tuple(dict.fromkeys(t.lower() for t in terms if t.lower() in NON_UNIT_PARTS))
    units = "+".join(t for t in terms if t.lower() not in NON_UNIT_PARTS) or None
    if units is not None:
        try:
            parse_mask_expression(units)
        except SsahError as err:
            raise SsahError(f"unknown part in {text!r}: {err}; non-unit parts: {', '.join(NON_UNIT_PARTS)}") from None
    return units, extras
