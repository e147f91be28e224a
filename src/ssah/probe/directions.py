"""Per-layer harmful-vs-benign directions: difference of means and a logistic-regression probe.

Inputs are last-token states of chat-formatted prompts, float32 [N, L, H] (see `ssah.probe.hidden`).

- Difference of means (the "refusal direction" of Arditi et al.): mean(harmful) - mean(benign) per
  layer, normalised to unit length. A state's *projection* is its dot product with that unit vector.
- Linear probe: logistic regression per layer in torch (L-BFGS, L2 penalty, standardised features),
  fitted on a stratified split and scored on the held-out part.
- Separation: for a direction fitted on the train split, the gap between the held-out harmful and
  benign mean projections in units of the within-class spread (a Cohen's d); the monitor uses it to
  pick a layer without touching evaluation data.

`Directions` bundles all of it with the per-prompt projection scores and saves as safetensors.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssah.errors import SsahError
from ssah.io import read_tensors_with_metadata, save_tensors_atomic


def diff_of_means(harmful: torch.Tensor, benign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit direction [L, H], mean harmful [L, H], mean benign [L, H]) from [N, L, H] states."""
    mean_harmful, mean_benign = harmful.mean(0), benign.mean(0)
    delta = mean_harmful - mean_benign
    return delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12), mean_harmful, mean_benign


def stratified_split(n_harmful: int, n_benign: int, test_fraction: float = 0.25,
                     seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, test) indices into harmful-then-benign order; each class is split by `test_fraction`.

    Every class keeps at least one example on each side, so it needs at least two examples.
    """
    if min(n_harmful, n_benign) < 2:
        raise SsahError(f"the probe split needs at least 2 harmful and 2 benign prompts "
                        f"(got {n_harmful} and {n_benign}); raise --limit or use larger datasets")
    if not 0.0 < test_fraction < 1.0:
        raise SsahError(f"test fraction {test_fraction} must be between 0 and 1")
    rng = random.Random(seed)
    train, test = [], []
    for offset, n in ((0, n_harmful), (n_harmful, n_benign)):
        indices = [offset + i for i in range(n)]
        rng.shuffle(indices)
        n_test = min(n - 1, max(1, round(test_fraction * n)))
        test += sorted(indices[:n_test])
        train += sorted(indices[n_test:])
    return sorted(train), sorted(test)


@dataclass
class LinearProbe:
    """Per-layer logistic regression in the raw state space: logit = states @ weight[l] + bias[l]."""

    weight: torch.Tensor  # [L, H]
    bias: torch.Tensor  # [L]
    accuracy: torch.Tensor  # [L] held-out accuracy
    n_train: int
    n_test: int

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[N, L] logits (positive = harmful) of [N, L, H] states."""
        return torch.einsum("nlh,lh->nl", states, self.weight) + self.bias


def fit_linear_probe(states: torch.Tensor, labels: torch.Tensor, train: list[int], test: list[int],
                     l2: float = 1e-2, max_iter: int = 100) -> LinearProbe:
    """Logistic regression per layer (all layers fitted jointly: their losses are independent).

    `states` [N, L, H], `labels` [N] with 1 = harmful. Features are standardised with train-split
    statistics, which keeps L-BFGS well conditioned; the returned weights are mapped back to raw space.
    """
    x, y = states.double(), labels.double()
    train_x, train_y = x[train], y[train]
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    z = (train_x - mean) / std
    n_layers, hidden = x.shape[1], x.shape[2]
    weight = torch.zeros(n_layers, hidden, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_layers, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    targets = train_y[:, None].expand(-1, n_layers)

    def closure():
        optimizer.zero_grad()
        logits = torch.einsum("nlh,lh->nl", z, weight) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0).sum()
        loss = loss + 0.5 * l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    raw_weight = (weight.detach() / std)
    raw_bias = bias.detach() - (raw_weight * mean).sum(-1)
    probe = LinearProbe(raw_weight.float(), raw_bias.float(), torch.zeros(n_layers), len(train), len(test))
    predictions = probe.logits(states[test].float()) > 0
    probe.accuracy = (predictions == labels[test].bool()[:, None]).float().mean(0)
    return probe


@dataclass
class Directions:
    """Per-layer directions and the statistics the monitor needs, for the layers in `layers`.

    All tensors are indexed by position in `layers` (not by layer number).
    """

    layers: list[int]
    direction: torch.Tensor  # [L, H] unit vector: mean harmful - mean benign
    mean_harmful: torch.Tensor  # [L, H]
    mean_benign: torch.Tensor  # [L, H]
    harmful_scores: torch.Tensor  # [L, Nh] projections of each harmful prompt's last-token state
    benign_scores: torch.Tensor  # [L, Nb]
    separation: torch.Tensor  # [L] held-out separation (Cohen's d) of the projections
    probe: LinearProbe
    benign_logits: torch.Tensor  # [L, Nb] probe logits of the benign prompts (to standardise probe scores)
    meta: dict = field(default_factory=dict)

    def index(self, layer: int) -> int:
        """Position of `layer` in `layers`, or one clear error."""
        if layer not in self.layers:
            raise SsahError(f"layer {layer} is not in these directions (layers {self.layers[0]}..{self.layers[-1]}); "
                            "recompute them with that layer")
        return self.layers.index(layer)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; `meta` and the probe sizes go into its JSON metadata."""
        tensors = {
            "layers": torch.tensor(self.layers, dtype=torch.long),
            "direction": self.direction, "mean_harmful": self.mean_harmful, "mean_benign": self.mean_benign,
            "harmful_scores": self.harmful_scores, "benign_scores": self.benign_scores,
            "separation": self.separation, "probe_weight": self.probe.weight, "probe_bias": self.probe.bias,
            "probe_accuracy": self.probe.accuracy, "benign_logits": self.benign_logits,
        }
        meta = {"meta": json.dumps(self.meta), "probe_n_train": str(self.probe.n_train),
                "probe_n_test": str(self.probe.n_test), "format": "ssah.directions/1"}
        return save_tensors_atomic(path, {k: v.float() if k != "layers" else v for k, v in tensors.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Directions:
        tensors, meta = read_tensors_with_metadata(path, "directions file", "create it with `ssah probe --out DIR`")
        if meta.get("format") != "ssah.directions/1":
            raise SsahError(f"{path} is not a directions file written by `ssah probe`")
        probe = LinearProbe(tensors["probe_weight"], tensors["probe_bias"], tensors["probe_accuracy"],
                            int(meta["probe_n_train"]), int(meta["probe_n_test"]))
        return cls(tensors["layers"].tolist(), tensors["direction"], tensors["mean_harmful"], tensors["mean_benign"],
                   tensors["harmful_scores"], tensors["benign_scores"], tensors["separation"], probe,
                   tensors["benign_logits"], json.loads(meta.get("meta", "{}")))


def compute_directions(harmful: torch.Tensor, benign: torch.Tensor, layers: list[int],
                       test_fraction: float = 0.25, seed: int = 0, meta: dict | None = None) -> Directions:
    """Directions, probe and held-out separation from last-token states [Nh, L, H] and [Nb, L, H].

    The saved direction uses all prompts; the probe accuracy and the separation use a direction or
    probe fitted on the train split and scored on the held-out split.
    """
    train, test = stratified_split(len(harmful), len(benign), test_fraction, seed)
    states = torch.cat([harmful, benign])
    labels = torch.cat([torch.ones(len(harmful)), torch.zeros(len(benign))])
    probe = fit_linear_probe(states, labels, train, test)

    train_h = [i for i in train if i < len(harmful)]
    train_b = [i for i in train if i >= len(harmful)]
    split_direction, _, _ = diff_of_means(states[train_h], states[train_b])
    projections = torch.einsum("nlh,lh->nl", states, split_direction)
    is_harmful = labels.bool()
    # Held-out mean gap over a within-class spread pooled over all prompts: with few held-out prompts
    # their own spread alone is degenerate (one prompt per class has none).
    residuals = torch.where(is_harmful[:, None], projections - projections[is_harmful].mean(0),
                            projections - projections[~is_harmful].mean(0))
    spread = residuals.pow(2).mean(0).sqrt().clamp_min(1e-12)
    test_h = [i for i in test if i < len(harmful)]
    test_b = [i for i in test if i >= len(harmful)]
    separation = (projections[test_h].mean(0) - projections[test_b].mean(0)) / spread

    direction, mean_harmful, mean_benign = diff_of_means(harmful, benign)
    return Directions(
        layers=list(layers), direction=direction, mean_harmful=mean_harmful, mean_benign=mean_benign,
        harmful_scores=torch.einsum("nlh,lh->ln", harmful, direction),
        benign_scores=torch.einsum("nlh,lh->ln", benign, direction),
        separation=separation, probe=probe, benign_logits=probe.logits(benign).T.contiguous(), meta=dict(meta or {}),
    )
