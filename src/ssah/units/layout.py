"""The unit layout: which parameter entries each neuron-level unit owns.

Every transformer block holds two depth-2 maps f(X) = B s(A X) (see ssah.models.adapters).
A *unit* is one hidden channel of such a map: output j of A and input channel j of B.

Two unit kinds per layer:

- ``mlp``: one unit per intermediate neuron. It owns row j of every A matrix (gate and up; for
  Phi-3's fused gate_up_proj both halves, rows j and I + j), the bias entries j of A where they
  exist, and input column j of B (down_proj). B's own bias is shared by all units and owned by none.
- ``attn``: one unit per input channel of the output projection (heads x head_dim channels).
  It owns column j of o_proj. q and k rows are never owned by a channel: they shape the attention
  pattern of the whole head. The value row that produces channel j is owned only when it feeds
  this channel alone, i.e. without grouped-query attention (num_key_value_heads == num_heads).
  Under GQA one value channel feeds heads/kv_heads channels and stays shared (unowned), so
  zeroing or freezing a unit never touches another unit's activation.
  With ``attn_unit="head"`` a unit is a whole head: all its o_proj columns and q rows, plus its
  k/v rows when its key-value head is not shared.

Zeroing all of a unit's owned entries removes exactly its contribution to the output of B (the B
column alone is enough for that); tests check this against a hook that zeroes the unit at the input
of B.

Post norms (Gemma 2 and 3). There the output y = B X of each sublayer passes an RMSNorm before the
residual add: the residual stream receives g * y / rms(y) per token, with a learned per-channel gain
g = 1 + w (`PostNorm`). A unit's contribution there is g * B[:, j] X_j / rms(y): its gain is fixed,
its per-token scale 1 / rms(y) is shared by all units of the sublayer. So on these families:

- pruning a unit removes its term from y exactly, but the residual change is not its term alone:
  the remaining units' terms are divided by the new rms of y, so they are rescaled;
- pruning a group keeps the sublayer's output at the same rms per token (only its direction
  changes); only pruning every unit of a sublayer (y = 0) removes the sublayer's output;
- activation scores (`ssah.units.scoring`) measure each unit's term where it enters the residual
  stream, gain and per-token scale included; gradient scores see the norm through autograd.

This module is the only one (besides the adapters) that maps units to module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from ssah.errors import SsahError
from ssah.models.adapters import Adapter, adapter_for

UNIT_KINDS: tuple[str, ...] = ("mlp", "attn")
AttnUnit = Literal["channel", "head"]


@dataclass(frozen=True)
class OwnedSlice:
    """Entries of one parameter owned by the units of a block.

    `index[u]` lists the positions along axis `dim` of parameter `param` that unit u owns.
    """

    param: str
    dim: int
    index: torch.Tensor  # long, [num_units, width]

    def positions(self, units: torch.Tensor | list[int]) -> torch.Tensor:
        """Flat positions along `dim` owned by the given units."""
        return self.index[torch.as_tensor(units, dtype=torch.long)].reshape(-1)


@dataclass(frozen=True)
class PostNorm:
    """An RMSNorm between the output y of B and the residual add: y * (gain_offset + w) / rms(y)."""

    module: str
    gain_offset: float

    def gain(self, model: nn.Module) -> torch.Tensor:
        """The per-channel gain g (float64 [hidden])."""
        return model.get_submodule(self.module).weight.detach().to(torch.float64) + self.gain_offset

    def scale(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """1 / rms(y) per token (float64 [..., 1]), with the norm's own epsilon."""
        norm = model.get_submodule(self.module)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        if eps is None:
            raise SsahError(f"{self.module} has no epsilon (eps); the adapter in ssah/models/adapters.py "
                            "does not match this implementation")
        return torch.rsqrt(y.to(torch.float64).square().mean(dim=-1, keepdim=True) + eps)


@dataclass(frozen=True)
class UnitBlock:
    """The units of one kind in one layer."""

    kind: str
    layer: int
    num_units: int
    b_module: str  # module whose input channels are the units' activations X
    b_weight: str  # that module's weight parameter
    b_in_dim: int  # axis of b_weight indexing input channels
    b_channels: torch.Tensor  # long [num_units, width]: B input channels of each unit
    owned: tuple[OwnedSlice, ...]
    post_norm: PostNorm | None = None  # the norm applied to B's output before the residual add

    def residual_weight(self, model: nn.Module) -> torch.Tensor:
        """B's weight (float64) as its output reaches the residual stream: with a post norm, each output
        channel multiplied by the norm's gain."""
        weight = model.get_submodule(self.b_module).weight.detach().to(torch.float64)
        if self.post_norm is None:
            return weight
        shape = [1, 1]
        shape[1 - self.b_in_dim] = -1
        return weight * self.post_norm.gain(model).to(weight.device).reshape(shape)


@dataclass
class UnitLayout:
    """All units of a model, per kind and layer, with the parameter slices each one owns."""

    model_type: str
    num_layers: int
    attn_unit: AttnUnit
    blocks: dict[str, list[UnitBlock]]
    param_shapes: dict[str, tuple[int, ...]] = field(repr=False)

    @classmethod
    def from_model(cls, model: nn.Module, attn_unit: AttnUnit = "channel") -> UnitLayout:
        """Build the layout of a Hugging Face causal LM through its family's adapter."""
        if attn_unit not in ("channel", "head"):
            raise SsahError(f"attn_unit must be 'channel' or 'head', got {attn_unit!r}")
        config = model.config
        adapter = adapter_for(config.model_type)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        try:
            layers = model.get_submodule(adapter.layers)
        except AttributeError as err:
            raise SsahError(
                f"model of type {config.model_type!r} has no {adapter.layers!r}; "
                "its adapter in ssah/models/adapters.py does not match this implementation"
            ) from err
        num_layers = len(layers)
        blocks: dict[str, list[UnitBlock]] = {"mlp": [], "attn": []}
        for layer in range(num_layers):
            prefix = f"{adapter.layers}.{layer}."
            blocks["mlp"].append(_mlp_block(adapter, prefix, layer, shapes))
            blocks["attn"].append(_attn_block(adapter, prefix, layer, shapes, config, attn_unit))
        if adapter.post_norms is not None:
            for kind, module in zip(("attn", "mlp"), adapter.post_norms):
                for layer, block in enumerate(blocks[kind]):
                    name = f"{adapter.layers}.{layer}.{module}"
                    _require(shapes, f"{name}.weight")
                    blocks[kind][layer] = replace(block, post_norm=PostNorm(name, adapter.post_norm_gain_offset))
        return cls(config.model_type, num_layers, attn_unit, blocks, shapes)

    # -- sizes -------------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return UNIT_KINDS

    @property
    def units_per_layer(self) -> dict[str, int]:
        """Units per layer for each kind (every supported family is uniform across layers)."""
        return {kind: self.blocks[kind][0].num_units for kind in self.kinds}

    def num_units(self, kind: str) -> int:
        return self.num_layers * self.units_per_layer[kind]

    @property
    def total_units(self) -> int:
        return sum(self.num_units(kind) for kind in self.kinds)

    def block(self, kind: str, layer: int) -> UnitBlock:
        if kind not in self.blocks:
            raise SsahError(f"unknown unit kind {kind!r}; known: {', '.join(self.kinds)}")
        return self.blocks[kind][layer]

    def owned_numel(self) -> int:
        """Number of parameter entries owned by some unit."""
        total = 0
        for kind in self.kinds:
            for block in self.blocks[kind]:
                for owned in block.owned:
                    shape = self.param_shapes[owned.param]
                    rest = 1
                    for axis, size in enumerate(shape):
                        if axis != owned.dim:
                            rest *= size
                    total += owned.index.numel() * rest
        return total

    def summary(self) -> dict:
        """A JSON-ready description: model type, layers, units per kind, parameter ownership."""
        total_params = sum(_numel(s) for s in self.param_shapes.values())
        owned = self.owned_numel()
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "attn_unit": self.attn_unit,
            "units_per_layer": self.units_per_layer,
            "units_per_kind": {kind: self.num_units(kind) for kind in self.kinds},
            "total_units": self.total_units,
            "parameters_total": total_params,
            "parameters_owned_by_units": owned,
            "parameters_not_owned": total_params - owned,
            # Per kind, the norm applied to B's output before the residual add (None: the output is added as is).
            "post_norms": {kind: (self.blocks[kind][0].post_norm.module.rsplit(".", 1)[-1]
                                  if self.blocks[kind][0].post_norm else None) for kind in self.kinds},
        }

    # -- parameter edits -----------------------------------------------------------------
    @torch.no_grad()
    def zero_units_(self, model: nn.Module, kind: str, layer: int, units: torch.Tensor | list[int]) -> None:
        """Zero every entry the given units own (structured pruning, in place)."""
        params = dict(model.named_parameters())
        for owned in self.block(kind, layer).owned:
            param = params[owned.param]
            param.index_fill_(owned.dim, owned.positions(units).to(param.device), 0)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _require(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise SsahError(f"parameter {name!r} not found; the adapter in ssah/models/adapters.py does not fit this model")
    return shapes[name]


def _mlp_block(adapter: Adapter, prefix: str, layer: int, shapes: dict) -> UnitBlock:
    b_weight = f"{prefix}{adapter.mlp_out}.weight"
    num_units = _require(shapes, b_weight)[adapter.in_dim]
    units = torch.arange(num_units).unsqueeze(1)
    owned = [OwnedSlice(b_weight, adapter.in_dim, units)]
    for module in adapter.mlp_in:
        # Fused gate_up: unit j owns row j of the gate half and row I + j of the up half.
        index = torch.cat([units + chunk * num_units for chunk in range(adapter.mlp_in_chunks)], dim=1)
        weight = f"{prefix}{module}.weight"
        if _require(shapes, weight)[adapter.out_dim] != num_units * adapter.mlp_in_chunks:
            raise SsahError(f"{weight} does not match {adapter.mlp_out}; check the adapter")
        owned.append(OwnedSlice(weight, adapter.out_dim, index))
        if f"{prefix}{module}.bias" in shapes:
            owned.append(OwnedSlice(f"{prefix}{module}.bias", 0, index))
    return UnitBlock(
        "mlp", layer, num_units, f"{prefix}{adapter.mlp_out}", b_weight,
        adapter.in_dim, units, tuple(owned),
    )


def _attn_block(adapter: Adapter, prefix: str, layer: int, shapes: dict, config, attn_unit: AttnUnit) -> UnitBlock:
    b_weight = f"{prefix}{adapter.attn_out}.weight"
    channels = _require(shapes, b_weight)[adapter.in_dim]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = channels // heads
    group = heads // kv_heads  # query heads sharing one key-value head
    channel_ids = torch.arange(channels)

    # Positions, along the output axis of the q/k/v weights, of q, k and v channels.
    q_pos, k_pos, v_pos = _qkv_positions(adapter, heads, kv_heads, head_dim)

    if attn_unit == "channel":
        b_channels = channel_ids.unsqueeze(1)  # [channels, 1]
        owned = [OwnedSlice(b_weight, adapter.in_dim, b_channels)]
        if group == 1:
            owned += _qkv_slices(adapter, prefix, shapes, "v", v_pos.unsqueeze(1))
    else:
        b_channels = channel_ids.view(heads, head_dim)  # [heads, head_dim]
        owned = [OwnedSlice(b_weight, adapter.in_dim, b_channels)]
        owned += _qkv_slices(adapter, prefix, shapes, "q", q_pos.view(heads, head_dim))
        if group == 1:
            owned += _qkv_slices(adapter, prefix, shapes, "k", k_pos.view(heads, head_dim))
            owned += _qkv_slices(adapter, prefix, shapes, "v", v_pos.view(heads, head_dim))
    return UnitBlock(
        "attn", layer, b_channels.shape[0], f"{prefix}{adapter.attn_out}", b_weight,
        adapter.in_dim, b_channels, tuple(owned),
    )


def _qkv_positions(adapter: Adapter, heads: int, kv_heads: int, head_dim: int):
    """Output-axis positions of every q, k and v channel inside the q/k/v weights.

    For separate projections each is relative to its own matrix; for fused ones, to the fused
    matrix. Channel c of q is head c // head_dim, dim c % head_dim; k/v channels count kv heads.
    """
    q = torch.arange(heads * head_dim)
    kv = torch.arange(kv_heads * head_dim)
    if adapter.qkv_layout == "separate":
        return q, kv, kv
    if adapter.qkv_layout == "fused":  # [q | k | v] blocks (Phi-3 qkv_proj, GPT-2 c_attn)
        return q, q.numel() + kv, q.numel() + kv.numel() + kv
    # GPT-NeoX: per head [q(head_dim), k(head_dim), v(head_dim)] interleaved; no GQA there.
    head, dim = q // head_dim, q % head_dim
    base = head * 3 * head_dim + dim
    return base, base + head_dim, base + 2 * head_dim


def _qkv_slices(adapter: Adapter, prefix: str, shapes: dict, which: str, index: torch.Tensor) -> list[OwnedSlice]:
    """Owned slices of the q, k or v weight (and bias) at the given output positions."""
    if adapter.qkv_layout == "separate":
        module = adapter.attn_qkv["qkv".index(which)]
    else:
        module = adapter.attn_qkv[0]
    weight = f"{prefix}{module}.weight"
    _require(shapes, weight)
    slices = [OwnedSlice(weight, adapter.out_dim, index)]
    if f"{prefix}{module}.bias" in shapes:
        slices.append(OwnedSlice(f"{prefix}{module}.bias", 0, index))
    return slices
