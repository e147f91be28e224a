"""Unit importance scorers and their registry.

A scorer turns one pass over calibration tokens into one number per unit. Two families:

- **activation scorers** see per-channel statistics of X, the input of each B module (the units'
  activations), accumulated over the tokens in scope, plus the squared norms of B's input columns.
  They return one score per B input channel; head-level units sum their channels' scores.
- **gradient scorers** see each owned parameter's weight and its gradient of the loss on the tokens
  in scope, and return an element-wise saliency; it is summed over each unit's owned slices.

Adding a scorer takes a few lines::

    from ssah.units.scorers import register_scorer

    @register_scorer("rms", description="root mean square of X_j")
    def rms(stats, col_sq_norms):
        return (stats.sq_sum() / stats.count).sqrt()

    @register_scorer("taylor2", needs="gradients", description="(W * dL/dW)^2")
    def taylor2(weight, grad):
        return (weight * grad).square()

after which ``compute_scores(..., scorer="rms")`` and ``ssah score --scorer rms`` use it (the CLI sees
scorers registered by modules imported before it runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ssah.errors import SsahError

TOKEN_SCOPES: tuple[str, ...] = ("all", "prompt", "response")
Needs = Literal["activations", "gradients"]


@dataclass(frozen=True)
class Scorer:
    """A registered scorer.

    `fn` is ``fn(stats: ChannelStats, col_sq_norms: Tensor[C]) -> Tensor[C]`` for activation
    scorers and ``fn(weight: Tensor, grad: Tensor) -> Tensor`` (same shape, element-wise) for
    gradient scorers. `default_scope` is the token scope used when none is given.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs: Needs
    default_scope: str
    description: str

    @property
    def batch_invariant(self) -> bool:
        """Activation statistics are merged exactly, so batch size does not change the result.

        Gradient scorers take an absolute value per batch, so gradients of sequences that share a
        batch can cancel: their result depends on the batch size.
        """
        return self.needs == "activations"


SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, needs: Needs = "activations", default_scope: str | None = None,
                    description: str = "") -> Callable[[Callable], Callable]:
    """Decorator registering `fn` under `name` (see the module docstring for the two signatures).

    `default_scope` defaults to "all" for activation scorers and "response" for gradient scorers
    (their loss is the language-modelling loss of the reply, as in SNIP-style safety attribution).
    """
    if needs not in ("activations", "gradients"):
        raise ValueError(f"needs must be 'activations' or 'gradients', got {needs!r}")
    scope = default_scope or ("all" if needs == "activations" else "response")
    if scope not in TOKEN_SCOPES:
        raise ValueError(f"default_scope must be one of {TOKEN_SCOPES}, got {scope!r}")

    def decorate(fn: Callable) -> Callable:
        SCORERS[name] = Scorer(name, fn, needs, scope, description or (fn.__doc__ or "").strip())
        return fn

    return decorate


def get_scorer(name: str) -> Scorer:
    """The scorer registered as `name`, or one clear error listing the known ones."""
    if name not in SCORERS:
        raise SsahError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def resolve_scope(scorer: Scorer, token_scope: str | None) -> str:
    scope = token_scope or scorer.default_scope
    if scope not in TOKEN_SCOPES:
        raise SsahError(f"unknown token scope {scope!r}; use one of {', '.join(TOKEN_SCOPES)}")
    return scope


class ChannelStats:
    """Running per-channel statistics of activations, in float64.

    Keeps the count, the mean, M2 (sum of squared deviations from the mean) and the sum of absolute
    values. Batches are merged with Chan et al.'s parallel update, and each batch is centred on its
    own mean before squaring, so the result does not depend on how tokens are split into batches
    (up to float64 rounding) and never suffers the cancellation of E[x^2] - E[x]^2.
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(channels, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch of activations `x` [tokens, channels] (any float dtype)."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.to(torch.float64)
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).square_().sum(dim=0)
        self.abs_sum += x.abs().sum(dim=0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square_() * (n_a * n_b / n)
        self.count = n

    def variance(self, ddof: int = 1) -> torch.Tensor:
        if self.count <= ddof:
            raise SsahError(f"variance needs more than {ddof} token(s) in scope, got {self.count}; "
                            "score more records or widen the token scope")
        return self.m2 / (self.count - ddof)

    def sq_sum(self) -> torch.Tensor:
        """Sum over tokens of x^2, from the centred statistics."""
        return self.m2 + self.count * self.mean.square()

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def to(self, device: torch.device | str) -> ChannelStats:
        for name in ("mean", "m2", "abs_sum"):
            setattr(self, name, getattr(self, name).to(device))
        return self


# -- built-in scorers ---------------------------------------------------------------------------

@register_scorer("variance", description="Var_n(X_j) * ||W_B[:, j]||^2 (paper Eq. 1; FLAP's fluctuation)")
def variance(stats: ChannelStats, col_sq_norms: torch.Tensor) -> torch.Tensor:
    return stats.variance(ddof=1) * col_sq_norms


@register_scorer("wanda", description="||X_j||_2 * ||W_B[:, j]||_2 (neuron-level Wanda)")
def wanda(stats: ChannelStats, col_sq_norms: torch.Tensor) -> torch.Tensor:
    return stats.sq_sum().clamp_min(0).sqrt() * col_sq_norms.sqrt()


@register_scorer("activation", description="mean |X_j| over the tokens in scope")
def activation(stats: ChannelStats, col_sq_norms: torch.Tensor) -> torch.Tensor:
    return stats.abs_mean()


@register_scorer("snip", needs="gradients",
                 description="|W * dL/dW| summed over the unit's owned slices; L = NLL of the tokens in scope")
def snip(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return (weight * grad).abs_()
