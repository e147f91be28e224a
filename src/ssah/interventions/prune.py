"""Structured pruning: zero every parameter entry a set of units owns.

`pruned(...)` is reversible (the model is restored on exit, even on error); `prune_` is
permanent. Both edit weights rather than add hooks, so a pruned model saved with
`save_pretrained` is a normal Hugging Face model that computes exactly what `pruned` computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

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


@contextlib.contextmanager
def pruned(model: nn.Module, layout: UnitLayout, mask: UnitMask, check: bool = True) -> Iterator[nn.Module]:
    """Within the block the masked units are zeroed; on exit the original weights come back.

    Only the owned slices are copied, so the memory cost is that of the pruned entries.
    """
    if check:
        mask.check_model(model_fingerprint(model), layout)
    params = dict(model.named_parameters())
    slices = mask.owned_slices(layout)
    saved = {(name, dim): params[name].detach().index_select(dim, pos.to(params[name].device)).clone()
             for (name, dim), pos in slices.items()}
    try:
        prune_(model, layout, mask, check=False)
        yield model
    finally:
        with torch.no_grad():
            for (name, dim), values in saved.items():
                params[name].index_copy_(dim, slices[(name, dim)].to(values.device), values)
