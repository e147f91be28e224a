"""Structured pruning: zero every parameter entry a set of units owns.

`pruned(...)` is reversible (an `Intervention`: the model is restored on exit, even on error);
`prune_` is permanent. Both edit weights rather than add hooks, so a pruned model saved with
`save_pretrained` is a normal Hugging Face model that computes exactly what `pruned` computed.

Where a norm follows each sublayer before the residual add (Gemma 2 and 3, see
`ssah.units.layout`), zeroing removes the units' terms from the sublayer's output, but the norm
rescales what remains to the same rms per token: pruning a group changes the direction of that
sublayer's contribution to the residual stream, not its size, and the remaining units of the
sublayer are scaled up. Only pruning all of a sublayer's units removes its contribution.
"""

from __future__ import annotations

import torch
from torch import nn

from ssah.interventions.base import Intervention
from ssah.interventions.masks import UnitMask
from ssah.models.fingerprint import model_fingerprint
from ssah.units.layout import UnitLayout


@torch.no_grad()
def prune_(model: nn.Module, layout: UnitLayout, mask: UnitMask, check: bool = True) -> int:
    """Zero the masked units' owned entries in place; returns the number of entries zeroed."""
    if check:
        mask.check_model(model_fingerprint(model), layout)
    params = dict(model.named_parameters())
    zeroed = 0
    for (name, dim), positions in mask.owned_slices(layout).items():
        param = params[name]
        param.index_fill_(dim, positions.to(param.device), 0)
        zeroed += positions.numel() * param.numel() // param.shape[dim]
    return zeroed


class Pruning(Intervention):
    """The masked units zeroed while the `with` block runs; the original weights come back on exit.

    Only the owned slices are copied, so the memory cost is that of the pruned entries.
    """

    kind = "pruned"

    def __init__(self, model: nn.Module, layout: UnitLayout, mask: UnitMask, check: bool = True):
        if check:
            mask.check_model(model_fingerprint(model), layout)
        self.model, self.layout, self.mask = model, layout, mask
        self.key = f"pruned-{mask.digest()}"
        self._saved: dict | None = None

    def apply(self) -> None:
        params = dict(self.model.named_parameters())
        self._slices = self.mask.owned_slices(self.layout)
        self._saved = {(name, dim): params[name].detach().index_select(dim, pos.to(params[name].device)).clone()
                       for (name, dim), pos in self._slices.items()}
        prune_(self.model, self.layout, self.mask, check=False)

    @torch.no_grad()
    def undo(self) -> None:
        if self._saved is None:
            return
        params = dict(self.model.named_parameters())
        for (name, dim), values in self._saved.items():
            params[name].index_copy_(dim, self._slices[(name, dim)].to(values.device), values)
        self._saved = None

    def report_block(self, rows: list[dict]) -> dict:
        return {"mask": self.mask.expression, "groups": self.mask.groups_digest, "units": self.mask.count(),
                "share": self.mask.share(), "digest": self.mask.digest()}


def pruned(model: nn.Module, layout: UnitLayout, mask: UnitMask, check: bool = True) -> Pruning:
    """Within `with pruned(...)` the masked units are zeroed; on exit the original weights come back."""
    return Pruning(model, layout, mask, check)
