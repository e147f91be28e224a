"""Library-first unit recipes: score a model on safety and utility data, and group its units.

`group_units` is what `ssah groups` and the pipeline call; `sizes="auto"` chooses the sizes by a
pruning sweep on calibration data first (`ssah.units.size_sweep`). `score_and_group` is the
pipeline's whole step: safety scores (harmful prompts answered with refusals), utility scores
(benign prompts with their answers), then groups. Every artifact is reused when it was made from
the same inputs (`ssah.artifacts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ssah.artifacts import Artifact
from ssah.defaults import DEFAULT_NORMALIZATION, DEFAULT_RANKING, DEFAULT_SCORER
from ssah.errors import SsahError
from ssah.outputs import OutputKind
from ssah.ownership import make_dirs
from ssah.units.groups import GROUPS_FILE, META_FILE, PLOT_FILE, SWEEP_PLOT_FILE, Groups, check_compatible, make_groups
from ssah.units.scores import Scores
from ssah.units.sizes import check_sizes

log = logging.getLogger(__name__)

GROUPS = OutputKind("groups", (GROUPS_FILE, META_FILE, PLOT_FILE, SWEEP_PLOT_FILE), record=META_FILE)


@dataclass
class SweepSpec:
    """How `sizes="auto"` measures: the model, data (default: the scores' own datasets), samples and
    thresholds (see `ssah.units.size_sweep`)."""

    loaded: object
    safety_data: object = None
    utility_data: object = None
    samples: int = 32
    thresholds: object = None


def _sweep_probe(sweep: SweepSpec, safety: Scores, utility: Scores):
    from ssah.data import load_dataset
    from ssah.units.size_sweep import DEFAULT_GRIDS, AttributeProbe, SweepThresholds, request_key

    def recorded(scores: Scores, role: str):
        name = scores.manifest.get("dataset_name")
        if not name:
            raise SsahError(f"the {role} scores do not record their dataset; pass --sweep-{role}-data")
        return load_dataset(name)

    thresholds = sweep.thresholds or SweepThresholds()
    probe = AttributeProbe.build(sweep.loaded, sweep.safety_data or recorded(safety, "safety"),
                                 sweep.utility_data or recorded(utility, "utility"), samples=sweep.samples)
    return probe, thresholds, request_key(thresholds, DEFAULT_GRIDS, probe.data)


def group_units(safety: Scores, utility: Scores, out: str | Path, sizes: dict[str, float] | str, *,
                normalize: str = DEFAULT_NORMALIZATION, ranking: str = DEFAULT_RANKING, sweep: SweepSpec | None = None,
                force: bool = False, replace: bool = False, ru_normalize: str | None = None,
                ru_ranking: str | None = None) -> Groups:
    """Groups of the units of `safety`/`utility` (same model) saved in `out`: of fixed `sizes`, or of
    sizes a pruning sweep chooses (`sizes="auto"`, which needs `sweep`). Reused when `out` holds
    groups made from the same scores and settings (for auto sizes: the same sweep request).
    `ru_normalize` / `ru_ranking`: RU's own definition (`make_groups`)."""
    check_compatible(safety, utility)
    identity = {"model": safety.model_fingerprint, "safety": safety.digest(), "utility": utility.digest(),
                "normalize": normalize, "ranking": ranking}
    ru = {"ru_normalize": ru_normalize or normalize, "ru_ranking": ru_ranking or ranking}
    if (ru["ru_normalize"], ru["ru_ranking"]) != (normalize, ranking):  # absent otherwise: earlier groups stay valid
        identity.update(ru)
    probe = None
    if sizes == "auto":
        if sweep is None:
            raise SsahError("sizes 'auto' are chosen by a pruning sweep, which needs the model")
        probe, thresholds, identity["sizes"] = _sweep_probe(sweep, safety, utility)
    else:
        sizes = check_sizes({key.lower(): value for key, value in sizes.items()})
        identity["sizes"] = sizes
    artifact = Artifact(Path(out) / META_FILE, "groups", identity)
    if artifact.lookup(force=force, replace=replace) is not None:
        groups = Groups.load(out)
        groups.reused = True
        return groups
    if probe is not None:
        from ssah.units.size_sweep import plot_size_sweep, sweep_sizes

        chosen = sweep_sizes(sweep.loaded, safety, utility, probe, normalize=normalize, ranking=ranking,
                             thresholds=thresholds, **ru)
        groups = make_groups(safety, utility, chosen.sizes, normalize=normalize, ranking=ranking, **ru)
        groups.meta["size_selection"] = chosen.to_dict()
        make_dirs(out)
        plot_size_sweep(chosen, Path(out) / SWEEP_PLOT_FILE)
    else:
        groups = make_groups(safety, utility, sizes, normalize=normalize, ranking=ranking, **ru)
    groups.save(out, artifact=artifact)
    return groups


def score_and_group(loaded, out: str | Path, *, harmful: str, benign: str, sizes: dict[str, float] | str,
                    normalize: str = DEFAULT_NORMALIZATION, ranking: str = DEFAULT_RANKING,
                    scorer: str = DEFAULT_SCORER, limit: int | None = None, batch_size: int = 8,
                    max_length: int = 256, token_scope: str = "all", seed: int = 0, replace: bool = False,
                    responses: str = "refusals", refusals: str | None = None,
                    max_new_tokens: int = 64, ru_normalize: str | None = None, ru_ranking: str | None = None) -> Groups:
    """Score `loaded` on `harmful` prompts answered with refusals (safety) and on `benign` prompts with
    their answers (utility), the first `limit` records of each, into OUT/scores-safety and
    OUT/scores-utility; group the units into OUT/groups (see `group_units`). `responses`: "refusals"
    (the texts of `refusals`, default the built-in scoring role) or "own-refusals" (the model's own
    greedy replies of `max_new_tokens` tokens that refuse; see `ssah.units.scores`)."""
    from ssah.data import load_dataset
    from ssah.units.scores import score_dataset

    out = Path(out)
    common = dict(scorer=scorer, batch_size=batch_size, max_length=max_length, token_scope=token_scope, seed=seed,
                  replace=replace)

    def first(spec: str):
        data = load_dataset(spec)
        return data.take(limit) if limit else data

    safety = score_dataset(loaded, first(harmful), responses=responses, refusals=refusals,
                           max_new_tokens=max_new_tokens, out=out / "scores-safety", **common)
    utility = score_dataset(loaded, first(benign), responses="dataset", out=out / "scores-utility", **common)
    sweep = SweepSpec(loaded, load_dataset(harmful), load_dataset(benign)) if sizes == "auto" else None
    return group_units(safety, utility, out / "groups", sizes, normalize=normalize, ranking=ranking, sweep=sweep,
                       replace=replace, ru_normalize=ru_normalize, ru_ranking=ru_ranking)
