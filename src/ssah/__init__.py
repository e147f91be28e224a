"""ssah: measure and keep LLM safety alignment at the level of single neurons.

Importing this package is cheap: heavy modules (torch, transformers) load only when a
submodule that needs them is imported, or when one of the names below is first used.

    import ssah
    m = ssah.load_model("builtin:smollm2-135m-instruct")
    S = ssah.score_dataset(m, ssah.load_dataset("harmful:calibration"), responses="refusals")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from ssah.errors import SsahError  # noqa: E402  (re-exported for users)

# The most used entry points, importable from the top level; each loads its module on first use.
_LAZY = {
    "load_model": "ssah.models.loading",
    "load_dataset": "ssah.data",
    "score_dataset": "ssah.units.scores",
    "Scores": "ssah.units.scores",
    "make_groups": "ssah.units.groups",
    "parse_sizes": "ssah.units.sizes",
    "Groups": "ssah.units.groups",
    "mask_from_expression": "ssah.interventions.masks",
    "load_mask": "ssah.interventions.masks",
    "pruned": "ssah.interventions.prune",
    "UnitFreezer": "ssah.interventions.freeze",
    "freeze_callback": "ssah.interventions.freeze",
    "evaluate_model": "ssah.evaluate.runner",
    "EvalSettings": "ssah.evaluate.runner",
}

__all__ = ["SsahError", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ssah' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
