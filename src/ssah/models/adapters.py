"""Architecture adapters: the only place in ssah that knows module names.

An adapter says, for one family of decoder-only models, where the transformer blocks are and
which linear maps form each block's two depth-2 maps f(X) = B s(A X) (paper Eq. 1):

- MLP:       A = gate/up projections (fused in Phi-3), B = down projection.
- attention: A = q/k/v projections, B = output projection.

Gemma 2 and 3 also normalise each sublayer's output before adding it to the residual stream
(`post_norms`): there a unit's contribution reaches the residual stream as
B[:, j] X_j * (offset + w) / rms(B X), see `ssah.units.layout.PostNorm`.

Everything else (the unit layout, scorers, masks) asks `ssah.units.layout.UnitLayout`, which
is built from an adapter. To support a new family, add an `Adapter` to `ADAPTERS` below with
its `config.model_type` values and module paths, then run `pytest tests/test_layout.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssah.errors import SsahError

QkvLayout = Literal["separate", "fused", "neox_interleaved"]


@dataclass(frozen=True)
class Adapter:
    """Module paths of one model family, relative to the model (layers) or to a block."""

    model_types: tuple[str, ...]
    layers: str  # the ModuleList of transformer blocks
    mlp_in: tuple[str, ...]  # the A modules of the MLP (each row j feeds hidden unit j)
    mlp_in_chunks: int  # 2 when gate and up share one matrix (gate rows first, then up rows)
    mlp_out: str  # B of the MLP: its input channel j is MLP unit j
    attn_out: str  # B of attention: its input channel j is attention unit j
    attn_qkv: tuple[str, ...]  # (q, k, v) modules, or one fused module
    qkv_layout: QkvLayout
    conv1d: bool = False  # GPT-2 style Conv1D stores weights as [in, out] instead of [out, in]
    # RMSNorms applied to the output of B before the residual add: (after attention, after the MLP).
    post_norms: tuple[str, str] | None = None
    post_norm_gain_offset: float = 0.0  # the norm multiplies by offset + weight (Gemma: 1 + weight)

    @property
    def out_dim(self) -> int:
        """Weight axis that indexes a module's output channels."""
        return 1 if self.conv1d else 0

    @property
    def in_dim(self) -> int:
        """Weight axis that indexes a module's input channels."""
        return 0 if self.conv1d else 1


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_in_chunks=1,
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    attn_qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    qkv_layout="separate",
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        # Gemma (1)'s post_attention_layernorm is the norm before the MLP, not a post norm.
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
        **_LLAMA_LIKE,
    ),
    Adapter(
        model_types=("gemma2", "gemma3_text"),
        **_LLAMA_LIKE,
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        post_norm_gain_offset=1.0,
    ),
    Adapter(
        model_types=("phi3",),
        layers="model.layers",
        mlp_in=("mlp.gate_up_proj",),
        mlp_in_chunks=2,
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
        attn_qkv=("self_attn.qkv_proj",),
        qkv_layout="fused",
    ),
    Adapter(
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_in_chunks=1,
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        attn_qkv=("attention.query_key_value",),
        qkv_layout="neox_interleaved",
    ),
    Adapter(
        model_types=("gpt2",),
        layers="transformer.h",
        mlp_in=("mlp.c_fc",),
        mlp_in_chunks=1,
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        attn_qkv=("attn.c_attn",),
        qkv_layout="fused",
        conv1d=True,
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter for a `config.model_type`, or one clear error listing the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise SsahError(
        f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "To add one, append an Adapter with its module paths to ADAPTERS in ssah/models/adapters.py"
    )
