"""Freeze units during training so their entries stay bit-identical.

Zeroing gradients is not enough: decoupled weight decay (AdamW), coupled decay folded into
momentum (SGD), and optimizer state all still move an entry whose gradient is zero. So the
`UnitFreezer`

1. masks gradients of frozen entries with tensor hooks (clipping and data-parallel all-reduce
   then see zeros there), and
2. copies the frozen entries back after every optimizer step (`restore_`), keeping only the
   frozen slices in memory.

Parameters that are frozen whole (e.g. embeddings and norms when only a unit budget trains)
get `requires_grad=False` instead: no gradient, no optimizer state, no copy.

Three ways to use it: `freezer.wrap_optimizer(opt)` (plain PyTorch: restores after each
`step()`), `FreezeCallback(freezer)` for a Hugging Face `Trainer`, and `ssah finetune --freeze`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssah.interventions.masks import UnitMask
from ssah.units.layout import UnitLayout


@dataclass
class _FrozenSlice:
    param: nn.Parameter
    dim: int
    positions: torch.Tensor
    values: torch.Tensor  # the frozen entries as they were before training


class UnitFreezer:
    """Keep some parameter entries fixed through any optimizer.

    `frozen`: units whose owned entries must not change. With `train_only=True` the meaning flips:
    the mask names the only units that may change, and every other parameter entry is frozen
    (the alignment budget).
    """

    def __init__(self, model: nn.Module, layout: UnitLayout, mask: UnitMask, train_only: bool = False):
        self.model = model
        self.mask = mask
        self.train_only = train_only
        params = dict(model.named_parameters())
        slices = mask.owned_slices(layout)
        self._slices: list[_FrozenSlice] = []
        self._whole: list[str] = []
        self._hooks = []
        if train_only:
            trainable_params = {name for name, _ in slices}
            for name, param in params.items():
                if name not in trainable_params:
                    param.requires_grad_(False)
                    self._whole.append(name)
            for (name, dim), keep in slices.items():
                # Frozen = every position along `dim` that no budget unit owns.
                frozen = torch.ones(params[name].shape[dim], dtype=torch.bool)
                frozen[keep] = False
                self._add(params[name], dim, frozen.nonzero().flatten())
        else:
            for (name, dim), positions in slices.items():
                self._add(params[name], dim, positions)

    def _add(self, param: nn.Parameter, dim: int, positions: torch.Tensor) -> None:
        if positions.numel() == 0 or not param.requires_grad:
            return
        positions = positions.to(param.device)
        values = param.detach().index_select(dim, positions).clone()
        self._slices.append(_FrozenSlice(param, dim, positions, values))
        self._hooks.append(param.register_hook(lambda grad, d=dim, p=positions: grad.index_fill(d, p, 0)))

    @torch.no_grad()
    def restore_(self) -> None:
        """Copy every frozen entry back (call after each optimizer step)."""
        for s in self._slices:
            s.param.index_copy_(s.dim, s.positions, s.values.to(s.param.dtype))

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make `optimizer.step()` restore the frozen entries right after it runs."""
        optimizer.register_step_post_hook(lambda *_: self.restore_())
        return optimizer

    def remove(self) -> None:
        """Drop the gradient hooks (frozen whole parameters stay requires_grad=False)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @torch.no_grad()
    def check(self) -> dict:
        """Largest change on frozen entries (must be 0) and share of trainable entries that changed.

        Call after training, before `remove()`; compares against the snapshot taken at start.
        The trainable share needs the starting weights, so it is measured by `TrainingCheck`.
        """
        worst = 0.0
        for s in self._slices:
            now = s.param.detach().index_select(s.dim, s.positions)
            worst = max(worst, float((now.float() - s.values.float()).abs().max()))
        return {"max_abs_change_frozen": worst, "frozen_entries": self.frozen_entries(),
                "frozen_whole_parameters": len(self._whole)}

    def frozen_entries(self) -> int:
        total = sum(s.values.numel() for s in self._slices)
        params = dict(self.model.named_parameters())
        return total + sum(params[name].numel() for name in self._whole)


class TrainingCheck:
    """A CPU snapshot of the weights before training, to report afterwards what moved.

    Exact for models up to `max_exact` parameters; above that, a fixed evenly spaced sample of
    65,536 entries per parameter (reported as such) keeps host memory small on 7B+ models.
    """

    SAMPLE = 65536

    def __init__(self, model: nn.Module, max_exact: int = 500_000_000):
        self.exact = sum(p.numel() for p in model.parameters()) <= max_exact
        self.before = {n: self._view(p).to("cpu", copy=True) for n, p in model.named_parameters()}

    def _view(self, param: torch.Tensor) -> torch.Tensor:
        flat = param.detach().reshape(-1)
        return flat if self.exact else flat[:: max(1, flat.numel() // self.SAMPLE)]

    @torch.no_grad()
    def report(self, model: nn.Module, freezer: UnitFreezer | None) -> dict:
        changed = total = 0
        for name, param in model.named_parameters():
            moved = self._view(param).cpu() != self.before[name]
            changed += int(moved.sum())
            total += moved.numel()
        share = changed / max(1, total)
        out = {"share_entries_changed": share, "changed_share_is_sampled": not self.exact}
        if freezer is not None:
            out.update(freezer.check())
            all_entries = sum(p.numel() for p in model.parameters())
            trainable_share = 1 - out["frozen_entries"] / max(1, all_entries)
            out["share_trainable_entries_changed"] = share / max(trainable_share, 1e-12)
        return out


def freeze_callback(freezer: UnitFreezer):
    """A Hugging Face `TrainerCallback` that restores frozen entries after every optimizer step."""
    from transformers import TrainerCallback

    class FreezeCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            freezer.restore_()

        def on_step_end(self, args, state, control, **kwargs):
            freezer.restore_()

    return FreezeCallback()
