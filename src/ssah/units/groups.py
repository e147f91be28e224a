"""Sort units into the paper's four groups from a safety score S and a utility score U.

    from ssah.units.groups import make_groups, parse_sizes
    groups = make_groups(Scores.load("runs/S"), Scores.load("runs/U"), parse_sizes("scu=0.013,ucu=0.133,ru=0.148"))
    groups.members("SCU")["mlp"]     # bool [num_layers, units_per_layer]

The rule (paper Sec. 4.1), applied in this order so that no unit lands in two groups:

1. SCU (safety-critical): the highest S - U.
2. UCU (utility-critical): the highest U - S among the units left.
3. RU (redundant): the lowest S + U among the units left.
4. CU (complex): every unit not picked above.

SCU and UCU come first because they are the groups whose exact membership matters (pruning them is the
experiment); they sit at opposite ends of one S - U ranking and never compete as long as their sizes sum
to at most 1. RU, a budget of units that matter for neither attribute, is then taken from the rest.
Ties are broken by unit order (kind, layer, unit index), so the result is deterministic.

Sizes are fractions of all units (both kinds together). A group gets exactly
``floor(fraction * total_units + 0.5)`` units (round half up). With per-layer ranking that count is
spread over the layers in proportion to their units by largest remainder (ties to the lower layer), so
the total is the same and each layer gets its share rounded down or up.

Normalisation. S and U come from different datasets (different lengths, activation scales), so they are
made unit-free before subtracting, separately for each unit kind:

- ``rank`` (default): percentiles in (0, 1] over all units of the kind (ties share their mean rank).
  S - U then says how much higher a unit stands in the safety ranking than in the utility ranking,
  which is what SCU means: units whose importance is *disproportionately* about safety, so pruning
  them spares utility. It is immune to the heavy tail of Eq. 1 scores. Measured on SmolLM2-135M
  (128 harmful prompts with refusals vs 128 benign tasks): a few MLP neurons with massive activations
  score up to 10^6 times the median, so the MLP mean is about 300x its median. Under ``mean`` almost
  every MLP neuron shrinks towards 0, and 98% of SCU and 82% of UCU came out as attention channels
  (which are 27% of the units) while MLP neurons filled RU; under ``rank`` both kinds enter every
  group roughly in proportion.
- ``mean``: divide each kind's scores by their mean over all layers. Keeps magnitudes, so S - U is
  dominated by the largest units: a unit 50x the average for safety and 40x for utility beats one at
  3x and 0.1x, although pruning the first would hurt utility badly. Useful when scores are not
  heavy-tailed.
- ``zscore-per-layer``: (score - layer mean) / layer std, per kind and layer. Removes differences
  between layers, so every layer contributes similarly to the extremes even under global ranking;
  still sensitive to outliers within a layer.

How the two kinds compete: each kind is normalised on its own (an MLP neuron is measured against MLP
neurons, an attention channel against attention channels), then all units are pooled and ranked together
(``global``, the default) and the group fractions apply to all units; ``per-layer`` ranks within each
layer (both kinds pooled) and gives every layer its share of each group.

On disk a groups folder holds ``groups.safetensors`` (``labels.KIND`` int8 [layers, units] with codes in
the order of GROUP_NAMES, and the normalised scores ``S.KIND`` and ``U.KIND``), ``groups.json`` (sizes,
counts per group, kind and layer, the rule, normalisation, ranking and the inputs' fingerprints) and a
plot ``groups_per_layer.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssah.artifacts import Artifact
from ssah.defaults import (
    DEFAULT_NORMALIZATION,
    DEFAULT_RANKING,
    DEFAULT_SIZES,
    GROUP_NAMES,
    NORMALIZATIONS,
    RANKINGS,
    SIZE_KEYS,
)
from ssah.errors import SsahError
from ssah.io import atomic_write
from ssah.ownership import make_dirs
from ssah.units.scores import Scores, check_finite, read_manifest, read_tensors
from ssah.units.sizes import check_sizes, group_counts

ASSIGNMENT_ORDER: tuple[str, ...] = ("SCU", "UCU", "RU")  # CU is the rest
RULE = "SCU: highest S-U; then UCU: highest U-S; then RU: lowest S+U; CU: the rest"
ROUNDING = "count = floor(fraction * total_units + 0.5); per-layer ranking splits it by largest remainder"

FORMAT = "ssah.groups/1"
GROUPS_FILE = "groups.safetensors"
META_FILE = "groups.json"
PLOT_FILE = "groups_per_layer.png"
SWEEP_PLOT_FILE = "size_sweep.png"  # written by `--sizes auto` (ssah.units.size_sweep)


# -- normalisation ----------------------------------------------------------------------------------

def _percentiles(values: torch.Tensor) -> torch.Tensor:
    """Rank / n in (0, 1] over all entries; tied values share their mean rank."""
    flat = values.reshape(-1)
    sorted_values, order = torch.sort(flat, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(flat, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return (ranks / flat.numel()).reshape(values.shape)


def normalize_scores(values: dict[str, torch.Tensor], method: str = "rank",
                     label: str = "scores") -> dict[str, torch.Tensor]:
    """Make each kind's scores unit-free: `rank`, `mean` or `zscore-per-layer` (see the module docstring)."""
    out = {}
    for kind, tensor in values.items():
        tensor = tensor.to(torch.float64)
        if method == "mean":
            mean = tensor.mean()
            if not mean > 0:
                raise SsahError(f"the {label} of the {kind} units have mean {float(mean):g}; mean normalisation "
                                "needs non-negative scores that are not all zero; use --normalize rank")
            out[kind] = tensor / mean
        elif method == "rank":
            out[kind] = _percentiles(tensor)
        elif method == "zscore-per-layer":
            mean = tensor.mean(dim=1, keepdim=True)
            std = tensor.std(dim=1, keepdim=True, unbiased=False)
            out[kind] = (tensor - mean) / torch.where(std > 0, std, torch.ones_like(std))
        else:
            raise SsahError(f"unknown normalisation {method!r}; use one of {', '.join(NORMALIZATIONS)}")
    return out


# -- the Groups artifact ----------------------------------------------------------------------------

@dataclass
class Groups:
    """A group label per unit, the normalised scores behind it and `meta` (the groups.json content).

    `labels[kind]` is int8 [num_layers, units_per_layer] holding indices into GROUP_NAMES;
    `safety[kind]` / `utility[kind]` are the normalised S and U (float64), e.g. to rank units inside
    a group by S - U. `reused` is True when the CLI found this exact result on disk (not saved).
    """

    labels: dict[str, torch.Tensor]
    safety: dict[str, torch.Tensor]
    utility: dict[str, torch.Tensor]
    meta: dict[str, Any]
    reused: bool = field(default=False, compare=False)

    @property
    def model_fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def members(self, name: str) -> dict[str, torch.Tensor]:
        """kind -> bool [num_layers, units_per_layer]: the units in group `name` (SCU, UCU, CU or RU)."""
        code = _group_code(name)
        return {kind: labels == code for kind, labels in self.labels.items()}

    def counts(self) -> dict[str, int]:
        """Units per group, over all kinds and layers."""
        return {name: sum(int(mask.sum()) for mask in self.members(name).values()) for name in GROUP_NAMES}

    def counts_per_kind(self) -> dict[str, dict[str, int]]:
        """kind -> group -> units."""
        return {kind: {name: int((labels == code).sum()) for code, name in enumerate(GROUP_NAMES)}
                for kind, labels in self.labels.items()}

    def counts_per_layer(self) -> dict[str, dict[str, list[int]]]:
        """kind -> group -> units in each layer."""
        return {kind: {name: (labels == code).sum(dim=1).tolist() for code, name in enumerate(GROUP_NAMES)}
                for kind, labels in self.labels.items()}

    def save(self, directory: str | Path, plot: bool = True, artifact: Artifact | None = None) -> Path:
        """Write groups.safetensors, the per-layer plot, then groups.json (atomically, with the identity
        of `artifact` when given: see `ssah.units.recipes.group_units`); returns the folder."""
        from safetensors.torch import save as save_tensors

        directory = make_dirs(directory)
        tensors = {}
        for kind in self.kinds:
            tensors[f"labels.{kind}"] = self.labels[kind].to("cpu", torch.int8).contiguous()
            tensors[f"S.{kind}"] = self.safety[kind].to("cpu", torch.float64).contiguous()
            tensors[f"U.{kind}"] = self.utility[kind].to("cpu", torch.float64).contiguous()
        atomic_write(directory / GROUPS_FILE, save_tensors(tensors))
        if plot:
            from ssah.units.plots import plot_groups_per_layer

            plot_groups_per_layer(self, directory / PLOT_FILE)
        if artifact is not None:
            self.meta = artifact.save(self.meta)
        else:
            atomic_write(directory / META_FILE, (json.dumps(self.meta, indent=2) + "\n").encode())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Groups:
        """Read a folder written by `save`; one clear SsahError if it is missing or damaged."""
        directory = Path(directory)
        meta = read_manifest(directory, "groups", META_FILE, "ssah groups")
        if meta.get("format") != FORMAT:
            raise SsahError(f"{directory / META_FILE} is not an ssah groups file (format {meta.get('format')!r})")
        tensors = read_tensors(directory / GROUPS_FILE, "ssah groups")
        labels, safety, utility = {}, {}, {}
        for kind in meta.get("units_per_layer", {}):
            try:
                labels[kind] = tensors[f"labels.{kind}"]
                safety[kind] = tensors[f"S.{kind}"]
                utility[kind] = tensors[f"U.{kind}"]
            except KeyError as err:
                raise SsahError(f"{directory / GROUPS_FILE} lacks {err.args[0]!r}; "
                                "rerun ssah groups with --force") from None
        for kind in labels:
            if not all(bool(torch.isfinite(values[kind].double()).all()) for values in (safety, utility)):
                raise SsahError(f"{directory / GROUPS_FILE} holds NaN or infinite scores of {kind} units; "
                                "rerun ssah groups with --force")
            if labels[kind].is_floating_point() or not bool(((labels[kind] >= 0) & (labels[kind] < 4)).all()):
                raise SsahError(f"{directory / GROUPS_FILE} holds {kind} labels that name no group (0..3); "
                                "rerun ssah groups with --force")
        groups = cls(labels, safety, utility, meta)
        if groups.counts() != meta.get("counts"):
            raise SsahError(f"{directory / GROUPS_FILE} does not match {META_FILE} (group counts differ); "
                            "rerun ssah groups with --force")
        return groups


def _group_code(name: str) -> int:
    upper = name.upper()
    if upper not in GROUP_NAMES:
        raise SsahError(f"unknown group {name!r}; groups: {', '.join(GROUP_NAMES)}")
    return GROUP_NAMES.index(upper)


# -- making groups ----------------------------------------------------------------------------------

def check_compatible(safety: Scores, utility: Scores) -> None:
    """One clear error unless both scores belong to the same model and unit layout, and are finite."""
    for label, scores in (("safety", safety), ("utility", utility)):
        check_finite(scores, f"the {label} scores")
    if safety.model_fingerprint != utility.model_fingerprint:
        raise SsahError(
            f"the safety and utility scores come from different models (fingerprints {safety.model_fingerprint} "
            f"[{safety.manifest.get('model_spec', '?')}] vs {utility.model_fingerprint} "
            f"[{utility.manifest.get('model_spec', '?')}]); score both with the same --model")
    shapes_s = {kind: tuple(v.shape) for kind, v in safety.values.items()}
    shapes_u = {kind: tuple(v.shape) for kind, v in utility.values.items()}
    if shapes_s != shapes_u:
        raise SsahError(f"the safety and utility scores have different unit layouts ({shapes_s} vs {shapes_u}); "
                        "score both with the same --attn-unit")
    if safety.digest() == utility.digest():
        raise SsahError("the safety and utility scores are identical; pass scores of a safety set "
                        "(e.g. harmful prompts with refusals) and of a utility set (e.g. benign instructions)")


def _pick(key: torch.Tensor, available: torch.Tensor, count: int, highest: bool) -> torch.Tensor:
    """Indices of the `count` available entries with the highest (or lowest) key; ties by position."""
    candidates = available.nonzero().squeeze(1)
    order = torch.sort(key[candidates], descending=highest, stable=True).indices
    return candidates[order[:count]]


def _apportion(count: int, sizes: list[int], capacity: list[int]) -> list[int]:
    """Split `count` over layers in proportion to `sizes`, by largest remainder, within `capacity`."""
    total = sum(sizes)
    exact = [count * size / total for size in sizes]
    shares = [min(math.floor(x), cap) for x, cap in zip(exact, capacity)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    left = count - sum(shares)
    while left > 0:
        progressed = False
        for i in order:
            if left and shares[i] < capacity[i]:
                shares[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise SsahError(f"cannot place {count} units within the layers' free units; lower the sizes")
    return shares


def _assign(s: torch.Tensor, u: torch.Tensor, counts: dict[str, int]) -> torch.Tensor:
    """Group codes of units with normalised scores `s`, `u` (flat), by the rule in ASSIGNMENT_ORDER."""
    labels = torch.full(s.shape, GROUP_NAMES.index("CU"), dtype=torch.int8)
    available = torch.ones(s.shape, dtype=torch.bool)
    keys = {"SCU": (s - u, True), "UCU": (u - s, True), "RU": (s + u, False)}
    for name in ASSIGNMENT_ORDER:
        key, highest = keys[name]
        chosen = _pick(key, available, counts[name], highest)
        labels[chosen] = GROUP_NAMES.index(name)
        available[chosen] = False
    return labels


def make_groups(safety: Scores, utility: Scores, sizes: dict[str, float] | None = None,
                normalize: str = DEFAULT_NORMALIZATION, ranking: str = DEFAULT_RANKING,
                ru_normalize: str | None = None, ru_ranking: str | None = None) -> Groups:
    """Label every unit SCU, UCU, CU or RU from safety and utility scores of the same model.

    `sizes` maps scu/ucu/ru to fractions of all units (default: the paper's Llama-2 sizes);
    `normalize` is rank (default), mean or zscore-per-layer; `ranking` is global or per-layer.
    `ru_normalize` / `ru_ranking`: RU's own definition (None: the same as SCU's and UCU's). RU is then
    the lowest S + U under its normalisation and ranking among the units SCU and UCU left, which with
    the same definition gives exactly the groups of one definition.
    See the module docstring for the rule, the order of assignment and the rounding.
    """
    from ssah import __version__

    sizes = {key.lower(): value for key, value in (DEFAULT_SIZES if sizes is None else sizes).items()}
    check_sizes(sizes)
    if ranking not in RANKINGS:
        raise SsahError(f"unknown ranking {ranking!r}; use one of {', '.join(RANKINGS)}")
    check_compatible(safety, utility)
    s_norm = normalize_scores(safety.values, normalize, "safety scores")
    u_norm = normalize_scores(utility.values, normalize, "utility scores")
    kinds = list(s_norm)
    num_layers = s_norm[kinds[0]].shape[0]
    units_per_layer = {kind: s_norm[kind].shape[1] for kind in kinds}
    total = sum(num_layers * n for n in units_per_layer.values())
    counts = group_counts(sizes, total)

    ru_normalize, ru_ranking = ru_normalize or normalize, ru_ranking or ranking
    labels = _labels(safety, utility, s_norm, u_norm, counts, ranking, (ru_normalize, ru_ranking), normalize)

    meta: dict[str, Any] = {
        "format": FORMAT,
        "group_names": list(GROUP_NAMES),
        "sizes": {key: sizes.get(key, 0.0) for key in SIZE_KEYS},
        "counts": counts,
        "shares": {name: count / total for name, count in counts.items()},
        "total_units": total,
        "rule": RULE,
        "assignment_order": [*ASSIGNMENT_ORDER, "CU"],
        "rounding": ROUNDING,
        "normalize": normalize,
        "ranking": ranking,
        # RU's own definition (the same as above unless given)
        "ru_definition": {"normalize": ru_normalize, "ranking": ru_ranking},
        "model_fingerprint": safety.model_fingerprint,
        "model_spec": safety.manifest.get("model_spec"),
        "attn_unit": safety.manifest.get("attn_unit"),
        "num_layers": num_layers,
        "units_per_layer": units_per_layer,
        "safety": _score_summary(safety),
        "utility": _score_summary(utility),
        "ssah_version": __version__,
    }
    groups = Groups(labels, s_norm, u_norm, meta)
    meta["counts_per_kind"] = groups.counts_per_kind()
    meta["counts_per_layer"] = groups.counts_per_layer()
    return groups


def _labels_global(s_norm: dict, u_norm: dict, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """All units pooled: kinds in order, each [layers, units] flattened row-major."""
    kinds = list(s_norm)
    flat = _assign(torch.cat([s_norm[k].reshape(-1) for k in kinds]),
                   torch.cat([u_norm[k].reshape(-1) for k in kinds]), counts)
    labels, start = {}, 0
    for kind in kinds:
        n = s_norm[kind].numel()
        labels[kind] = flat[start:start + n].reshape(s_norm[kind].shape)
        start += n
    return labels


def _labels_per_layer(s_norm: dict, u_norm: dict, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each layer (both kinds pooled) gets its share of every group."""
    kinds = list(s_norm)
    num_layers = s_norm[kinds[0]].shape[0]
    units_per_layer = {kind: s_norm[kind].shape[1] for kind in kinds}
    per_layer_units = [sum(units_per_layer.values())] * num_layers
    capacity = list(per_layer_units)
    per_layer_counts: dict[str, list[int]] = {}
    for name in ASSIGNMENT_ORDER:
        per_layer_counts[name] = _apportion(counts[name], per_layer_units, capacity)
        capacity = [cap - n for cap, n in zip(capacity, per_layer_counts[name])]
    labels = {kind: torch.empty(num_layers, units_per_layer[kind], dtype=torch.int8) for kind in kinds}
    for layer in range(num_layers):
        layer_labels = _assign(torch.cat([s_norm[k][layer] for k in kinds]),
                               torch.cat([u_norm[k][layer] for k in kinds]),
                               {name: per_layer_counts[name][layer] for name in ASSIGNMENT_ORDER})
        start = 0
        for kind in kinds:
            labels[kind][layer] = layer_labels[start:start + units_per_layer[kind]]
            start += units_per_layer[kind]
    return labels


def _labels(safety: Scores, utility: Scores, s_norm: dict, u_norm: dict, counts: dict[str, int], ranking: str,
            ru: tuple[str, str], normalize: str) -> dict[str, torch.Tensor]:
    """Group codes per kind under (`normalize`, `ranking`), RU under its own definition `ru`
    (normalisation, ranking) where that differs."""
    if ru[1] not in RANKINGS:
        raise SsahError(f"unknown ranking {ru[1]!r} for RU; use one of {', '.join(RANKINGS)}")
    label = _labels_global if ranking == "global" else _labels_per_layer
    if ru == (normalize, ranking):
        return label(s_norm, u_norm, counts)
    labels = label(s_norm, u_norm, {**counts, "RU": 0})
    _relabel_ru(labels, normalize_scores(safety.values, ru[0], "safety scores"),
                normalize_scores(utility.values, ru[0], "utility scores"), counts["RU"], ru[1])
    return labels


def _relabel_ru(labels: dict[str, torch.Tensor], s_norm: dict, u_norm: dict, count: int, ranking: str) -> None:
    """Label as RU the `count` units still CU with the lowest S + U (scores normalised by RU's own
    definition), pooled over all units (`global`) or each layer's share apportioned over the layers as
    `_labels_per_layer` does (`per-layer`); in place."""
    kinds = list(labels)
    cu, ru = GROUP_NAMES.index("CU"), GROUP_NAMES.index("RU")
    if ranking == "global":
        key = torch.cat([(s_norm[k] + u_norm[k]).reshape(-1) for k in kinds])
        flat = torch.cat([labels[k].reshape(-1) for k in kinds])
        flat[_pick(key, flat == cu, count, highest=False)] = ru
        start = 0
        for kind in kinds:
            n = labels[kind].numel()
            labels[kind].copy_(flat[start:start + n].reshape(labels[kind].shape))
            start += n
        return
    num_layers = labels[kinds[0]].shape[0]
    units = [sum(labels[k].shape[1] for k in kinds)] * num_layers
    free = [sum(int((labels[k][layer] == cu).sum()) for k in kinds) for layer in range(num_layers)]
    for layer, share in enumerate(_apportion(count, units, free)):
        key = torch.cat([s_norm[k][layer] + u_norm[k][layer] for k in kinds])
        row = torch.cat([labels[k][layer] for k in kinds])
        row[_pick(key, row == cu, share, highest=False)] = ru
        start = 0
        for kind in kinds:
            n = labels[kind].shape[1]
            labels[kind][layer] = row[start:start + n]
            start += n


def _score_summary(scores: Scores) -> dict[str, Any]:
    keys = ("dataset_name", "dataset_fingerprint", "scorer", "token_scope", "responses", "tokens_seen", "num_records")
    summary = {key: scores.manifest.get(key) for key in keys}
    summary["values_sha256"] = scores.digest()
    return summary
