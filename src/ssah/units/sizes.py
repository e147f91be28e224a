"""Group sizes: fractions of all units for SCU, UCU and RU (CU is the rest). No torch.

    parse_sizes("scu=0.013,ucu=1.3%,ru=0.148") -> {"scu": 0.013, "ucu": 0.013, "ru": 0.148}
"""

from __future__ import annotations

import math

from ssah.defaults import DEFAULT_SIZES_TEXT, GROUP_NAMES, SIZE_KEYS
from ssah.errors import SsahError


def parse_sizes(text: str) -> dict[str, float]:
    """Parse ``scu=0.013,ucu=0.133,ru=0.148`` (fractions, or percentages like ``1.3%``).

    Omitted groups get 0; CU is always the rest. Raises SsahError for unknown names, negative sizes,
    sizes summing over 1, and ``auto`` (which needs the model: see `ssah.units.size_sweep`).
    """
    text = text.strip()
    if text.lower() == "auto":
        raise SsahError("sizes 'auto' are chosen by a pruning sweep on the model (ssah.units.size_sweep; "
                        "`ssah groups --sizes auto`), not parsed; give fractions here, e.g. " + DEFAULT_SIZES_TEXT)
    sizes = {key: 0.0 for key in SIZE_KEYS}
    seen: set[str] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in SIZE_KEYS:
            hint = " (CU is always the rest)" if name == "cu" else ""
            raise SsahError(f"bad size {part!r}{hint}; write NAME=FRACTION with NAME one of scu, ucu, ru, "
                            f"e.g. {DEFAULT_SIZES_TEXT}")
        if name in seen:
            raise SsahError(f"size of {name} given twice in {text!r}")
        seen.add(name)
        value = value.strip()
        try:
            number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            raise SsahError(f"size {part!r} is not a number; use a fraction like 0.013 "
                            "or a percentage like 1.3%") from None
        if not math.isfinite(number) or number < 0 or number > 1:
            raise SsahError(f"size {part!r} must be a fraction between 0 and 1")
        sizes[name] = number
    if not seen:
        raise SsahError(f"no sizes given; write e.g. --sizes {DEFAULT_SIZES_TEXT}")
    check_sizes(sizes)
    return sizes


def check_sizes(sizes: dict[str, float]) -> dict[str, float]:
    """`sizes` with every group named (0 where omitted); one SsahError for an unknown group, a size
    outside [0, 1], a total above 1, or no size at all above 0."""
    for key, value in sizes.items():
        if key not in SIZE_KEYS:
            raise SsahError(f"unknown group size {key!r}; sizes are scu, ucu and ru (CU is the rest)")
        if not math.isfinite(value) or value < 0:
            raise SsahError(f"size of {key} is {value}; sizes must be fractions between 0 and 1")
        if value > 1:
            raise SsahError(f"size of {key} is {value}; sizes must be fractions between 0 and 1")
    total = sum(sizes.values())
    if total > 1 + 1e-12:
        raise SsahError(f"sizes sum to {total:g} > 1 ({', '.join(f'{k}={v:g}' for k, v in sizes.items())}); "
                        "SCU, UCU and RU together cannot exceed all units")
    if total == 0:
        raise SsahError(f"every group size is 0, so every unit would be CU; give sizes above 0, e.g. "
                        f"{DEFAULT_SIZES_TEXT}")
    return {key: float(sizes.get(key, 0.0)) for key in SIZE_KEYS}


def group_counts(sizes: dict[str, float], total_units: int) -> dict[str, int]:
    """Units per group: floor(fraction * total + 0.5) for SCU, UCU, RU; CU gets the rest."""
    counts = {name.upper(): math.floor(sizes.get(name, 0.0) * total_units + 0.5) for name in SIZE_KEYS}
    picked = sum(counts.values())
    if picked > total_units:
        raise SsahError(f"sizes round to {picked} units but the model has {total_units}; lower one of them")
    counts["CU"] = total_units - picked
    return {name: counts[name] for name in GROUP_NAMES}
