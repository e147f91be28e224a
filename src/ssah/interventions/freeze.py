"""Freeze units during training so their entries stay bit-identical.

Zeroing gradients is not enough: decoupled weight decay (AdamW), coupled decay folded into
momentum (SGD), and optimizer state all still move an entry whose gradient is zero. So the
`UnitFreezer` masks gradients of frozen entries with tensor hooks (clipping and data-parallel
all-reduce then see zeros there), and then keeps the entries fixed in one of two ways, chosen when
it is attached to the optimizer (`wrap_optimizer`):

- ``masked`` (no copy): for torch's Adam/AdamW (any weight decay when decoupled, as in AdamW) and
  SGD or Adam without weight decay, starting from empty optimizer state. Then the frozen entries'
  moments stay exactly zero, so the update there is exactly zero (Adam: 0 / (0 + eps); SGD: 0), and
  the only thing left that moves them, AdamW's decoupled decay, is taken over by the freezer: the
  groups' `weight_decay` is set to 0 and, right before each step, every parameter with a gradient is
  multiplied by (1 - lr * weight_decay) as AdamW would, except the frozen entries, which are
  multiplied by exactly 1. No copy of the frozen entries is kept.
- ``copy``: any other optimizer (or `copy=True`): a copy of the frozen entries is taken and written
  back after every optimizer step (`restore_`).

Parameters that are frozen whole (e.g. embeddings and norms when only a unit budget trains) get
`requires_grad=False` instead: no gradient, no optimizer state, no copy.

`check()` proves the result either way: each frozen slice's sha256, taken at the start, must match
at the end (max change 0); in ``copy`` mode the largest change is also measured.

Three ways to use it: `freezer.wrap_optimizer(opt)` (plain PyTorch), `freeze_callback(freezer)` for a
Hugging Face `Trainer` (attaches to the Trainer's optimizer when training begins), and
`ssah finetune --freeze`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ssah.errors import SsahError
from ssah.interventions.base import Intervention
from ssah.interventions.masks import UnitMask, outside_slices
from ssah.train.sharding import full, is_sharded, local, row_offset
from ssah.units.layout import UnitLayout


@dataclass
class _FrozenSlice:
    name: str
    param: nn.Parameter
    dim: int
    positions: torch.Tensor  # along `dim` of what `local()` returns (this process's shard when sharded)
    digest: str  # sha256 of the frozen entries before training
    entries: int  # frozen entries in the whole parameter
    values: torch.Tensor | None = None  # their copy (copy mode only)

    def local(self) -> torch.Tensor:
        return local(self.param.detach())

    def current(self) -> torch.Tensor:
        return self.local().index_select(self.dim, self.positions)


def _digest(values: torch.Tensor) -> str:
    flat = values.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit patterns
        flat = flat.view(torch.int16)
    return hashlib.sha256(flat.cpu().numpy().data).hexdigest()  # hashes the buffer, no bytes copy


def _masked_supported(optimizer: torch.optim.Optimizer, params: set[int]) -> str | None:
    """None when `masked` mode keeps the frozen entries exact with this optimizer, else the reason."""
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not adam and not isinstance(optimizer, torch.optim.SGD):
        return f"{type(optimizer).__name__} is not Adam, AdamW or SGD"
    for group in optimizer.param_groups:
        if not any(id(p) in params for p in group["params"]):
            continue
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        if group.get("weight_decay", 0) and not (adam and decoupled):
            return "its weight decay is added to the gradient (coupled), which would reach frozen entries"
        for p in group["params"]:
            if id(p) in params and optimizer.state.get(p):
                return "it already holds state for frozen parameters (a fresh optimizer starts from zero moments)"
    return None


class UnitFreezer(Intervention):
    """Keep some parameter entries fixed through any optimizer.

    `frozen`: units whose owned entries must not change. With `train_only=True` the meaning flips:
    the mask names the only units that may change, and every other parameter entry is frozen
    (the alignment budget). `copy`: None (default) picks ``masked`` mode when the optimizer allows it
    and ``copy`` otherwise (see the module docstring); True forces ``copy``; False demands ``masked``.

    The gradient hooks are in place from construction on; as an `Intervention`, leaving its `with`
    block removes them (`remove`).
    """

    kind = "frozen"

    def __init__(self, model: nn.Module, layout: UnitLayout, mask: UnitMask, train_only: bool = False,
                 copy: bool | None = None):
        self.model = model
        self.mask = mask
        self.train_only = train_only
        self.copy = copy
        self.mode: str | None = None  # "masked" or "copy", set by wrap_optimizer
        params = dict(model.named_parameters())
        self._slices: list[_FrozenSlice] = []
        self._whole: list[str] = []
        self._hooks = []
        self._decay: list[tuple[dict, float]] = []  # (param group, weight decay) taken over in masked mode
        self._optimizer_hooks = []
        if train_only:
            _, outside = outside_slices(mask, layout)  # frozen: every entry no budget unit owns
            partly = {name for name, _ in outside}
            for name, param in params.items():
                if name not in partly:
                    param.requires_grad_(False)
                    self._whole.append(name)
            for (name, dim), positions in outside.items():
                self._add(name, params[name], dim, positions)
        else:
            for (name, dim), positions in mask.owned_slices(layout).items():
                self._add(name, params[name], dim, positions)
        self._sharded = False  # parameters moved onto FSDP2 shards (see `_follow_shards`)
        self._index_rows()

    def _index_rows(self) -> None:
        # Per hooked parameter, the multiplier's shape and a [size along dim] bool of frozen positions.
        self._frozen_rows: dict[int, tuple[nn.Parameter, int, torch.Tensor]] = {}
        self._two_dims = False  # a parameter frozen along two dims: its decay needs a full mask, so copy mode
        for s in self._slices:
            _, dim, rows = self._frozen_rows.get(id(s.param), (s.param, s.dim, None))
            if dim != s.dim:
                self._two_dims = True
                continue
            if rows is None:
                rows = torch.zeros(s.local().shape[s.dim], dtype=torch.bool, device=s.positions.device)
            rows[s.positions] = True
            self._frozen_rows[id(s.param)] = (s.param, s.dim, rows)

    @property
    def key(self) -> str:
        return f"{'trainable' if self.train_only else 'frozen'}-{self.mask.digest()}"

    def undo(self) -> None:
        self.remove()

    def _add(self, name: str, param: nn.Parameter, dim: int, positions: torch.Tensor) -> None:
        if positions.numel() == 0 or not param.requires_grad:
            return
        positions = positions.to(param.device)
        digest = _digest(param.detach().index_select(dim, positions))
        entries = positions.numel() * (param.numel() // param.shape[dim])
        self._slices.append(_FrozenSlice(name, param, dim, positions, digest, entries))
        self._hooks.append(param.register_hook(lambda grad, d=dim, p=positions: grad.index_fill(d, p, 0)))

    def _follow_shards(self) -> None:
        """Point every slice at the parameter now registered under its name: FSDP2 (`fully_shard`)
        replaces parameters by DTensor shards, so a slice frozen along dim 0 keeps the rows this
        process holds. Shards get their gradients from FSDP's reduce-scatter, not from autograd, so
        tensor hooks never see them: their frozen gradient entries are zeroed right before each
        optimizer step instead (after clipping, which therefore counts them)."""
        current = dict(self.model.named_parameters())
        moved = [s for s in self._slices if current.get(s.name) is not s.param]
        for s in moved:
            param = current.get(s.name)
            if param is None:
                raise SsahError(f"parameter {s.name} is gone since the freezer was made; make it after wrapping")
            # Every process gathers the same slices in the same order (all-gathers are collective).
            if _digest(full(param.detach()).index_select(s.dim, s.positions.to(param.device))) != s.digest:
                raise SsahError("frozen entries changed before the freezer was attached to the optimizer; "
                                "attach it (wrap_optimizer / freeze_callback) before training starts")
            s.param, s.positions = param, s.positions.to(param.device)
            if s.dim == 0 and is_sharded(param):
                offset, rows = row_offset(param), s.local().shape[0]
                s.positions = s.positions[(s.positions >= offset) & (s.positions < offset + rows)] - offset
            s.digest = _digest(s.current())
        if moved:
            self._sharded = any(is_sharded(s.param) for s in self._slices)
            self._index_rows()

    @torch.no_grad()
    def _mask_shard_grads_(self) -> None:
        for s in self._slices:
            if s.param.grad is not None:
                local(s.param.grad).index_fill_(s.dim, s.positions, 0)

    # --- attaching to an optimizer -------------------------------------------------------------------
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Attach to `optimizer` before its first step: in ``masked`` mode it takes over the decay of
        the frozen parameters' groups (pre-step hook); in ``copy`` mode `step()` restores them after."""
        if self.mode is not None:
            raise SsahError("this UnitFreezer is already attached to an optimizer; make one freezer per run")
        self._follow_shards()
        self._check_untouched()
        if self._sharded:
            self._optimizer_hooks.append(optimizer.register_step_pre_hook(lambda *_: self._mask_shard_grads_()))
        reason = "a parameter is frozen along two dimensions" if self._two_dims \
            else _masked_supported(optimizer, set(self._frozen_rows))
        if self.copy is False and reason:
            raise SsahError(f"UnitFreezer(copy=False) cannot keep frozen entries exact with this optimizer: {reason}")
        if self.copy or reason:
            self.mode = "copy"
            for s in self._slices:
                s.values = s.current().clone()
            self._optimizer_hooks.append(optimizer.register_step_post_hook(lambda *_: self.restore_()))
            return optimizer
        self.mode = "masked"
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0) and any(id(p) in self._frozen_rows for p in group["params"]):
                self._decay.append((group, float(group["weight_decay"])))
                group["weight_decay"] = 0.0
        if self._decay:
            self._optimizer_hooks.append(optimizer.register_step_pre_hook(lambda *_: self._decoupled_decay_()))
        return optimizer

    def _check_untouched(self) -> None:
        for s in self._slices:
            if _digest(s.current()) != s.digest:
                raise SsahError("frozen entries changed before the freezer was attached to the optimizer; "
                                "attach it (wrap_optimizer / freeze_callback) before training starts")

    @torch.no_grad()
    def _decoupled_decay_(self) -> None:
        """AdamW's decay, p *= 1 - lr * wd, for every parameter with a gradient, frozen entries excepted."""
        with torch.profiler.record_function("ssah::freezer_decay"):  # named for benchmarks/bench_freeze.py
            self._decay_groups_()

    def _decay_groups_(self) -> None:
        for group, decay in self._decay:
            factor = 1.0 - group["lr"] * decay
            for p in group["params"]:
                if p.grad is None:
                    continue
                frozen = self._frozen_rows.get(id(p))
                if frozen is None:
                    p.mul_(factor)
                    continue
                _, dim, rows = frozen
                shape = [1] * p.dim()
                shape[dim] = -1
                scale = torch.full(rows.shape, factor, dtype=torch.float32, device=rows.device)
                local(p).mul_(scale.masked_fill(rows, 1.0).view(shape))

    @torch.no_grad()
    def restore_(self) -> None:
        """Copy every frozen entry back (copy mode; a no-op in masked mode, which needs no restore)."""
        for s in self._slices:
            if s.values is not None:
                local(s.param).index_copy_(s.dim, s.positions, s.values.to(s.param.dtype))

    def remove(self) -> None:
        """Detach: drop the gradient and optimizer hooks and give the optimizer back its weight decay
        (frozen whole parameters stay requires_grad=False). Call `check()` before."""
        for hook in self._hooks + self._optimizer_hooks:
            hook.remove()
        self._hooks.clear()
        self._optimizer_hooks.clear()
        for group, decay in self._decay:
            group["weight_decay"] = decay
        self._decay.clear()

    def copy_bytes(self) -> int:
        """Memory held by the copy of the frozen entries (0 in masked mode)."""
        return sum(s.values.numel() * s.values.element_size() for s in self._slices if s.values is not None)

    @torch.no_grad()
    def check(self) -> dict:
        """Largest change on frozen entries (must be 0) and share of trainable entries that changed.

        Call after training, before `remove()`. Every frozen slice is compared with its sha256 from the
        start: equal digests mean a change of exactly 0; otherwise the largest change is measured
        against the copy (copy mode) or reported as NaN (masked mode keeps no copy).
        The trainable share needs the starting weights, so it is measured by `TrainingCheck`.
        """
        worst = 0.0
        for s in self._slices:
            now = s.current()
            if _digest(now) == s.digest:
                continue
            worst = max(worst, float((now.float() - s.values.float()).abs().max())) if s.values is not None \
                else float("inf")  # masked mode keeps no copy to measure against
        if self._sharded:  # every process checked its own shards
            import torch.distributed as dist

            across = torch.tensor([worst], device=self._slices[0].positions.device)
            dist.all_reduce(across, op=dist.ReduceOp.MAX)
            worst = float(across)
        worst = float("nan") if worst == float("inf") else worst
        return {"max_abs_change_frozen": worst, "frozen_entries": self.frozen_entries(),
                "frozen_whole_parameters": len(self._whole), "freeze_mode": self.mode}

    def frozen_entries(self) -> int:
        total = sum(s.entries for s in self._slices)
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
        flat = full(param.detach()).reshape(-1)  # gathered when sharded (every process calls this)
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


def trainable_share(model: nn.Module, freezer: UnitFreezer | None = None, total: int | None = None) -> float:
    """The share of `total` parameter entries (default: the model's) that training may change: those
    with requires_grad outside the freezer's frozen slices (with LoRA adapters, the adapters' entries
    over the base model's)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if freezer is not None:
        trainable -= sum(s.entries for s in freezer._slices)
    return trainable / max(1, total if total is not None else sum(p.numel() for p in model.parameters()))


def ensure_intact(check: dict) -> None:
    """Raise when a training run's check (`UnitFreezer.check`, via `TrainingCheck.report`) shows that a
    frozen entry changed: a frozen set that did not hold makes every result drawn from it wrong."""
    if "max_abs_change_frozen" not in check:
        return
    change = check["max_abs_change_frozen"]
    if change != 0.0:  # NaN (masked mode keeps no copy to measure with) is a change too
        size = "by an unmeasured amount" if change != change else f"by up to {change:g}"
        raise SsahError(f"freeze breach: frozen entries changed {size} during training "
                        f"({check.get('freeze_mode')} mode, {check.get('frozen_entries')} frozen entries); "
                        "the model was not saved")


def freeze_callback(freezer: UnitFreezer):
    """A Hugging Face `TrainerCallback` that attaches the freezer to the Trainer's optimizer when
    training begins (before the first step)."""
    from transformers import TrainerCallback

    class FreezeCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is None:
                raise SsahError("the Trainer passed no optimizer to the freeze callback; use "
                                "freezer.wrap_optimizer(optimizer) on the optimizer you give the Trainer")
            # The Trainer's optimizer may be wrapped (accelerate); the freezer hooks the torch one.
            freezer.wrap_optimizer(getattr(optimizer, "optimizer", optimizer))

    return FreezeCallback()
