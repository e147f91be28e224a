"""LoRA through peft: the parameter-efficient baseline the paper compares freezing against."""

from __future__ import annotations

from ssah.models.adapters import adapter_for


def lora_target_modules(model) -> list[str]:
    """Leaf names of every linear map of the blocks (q/k/v/o and the MLP), from the adapter."""
    adapter = adapter_for(model.config.model_type)
    paths = (*adapter.mlp_in, adapter.mlp_out, adapter.attn_out, *adapter.attn_qkv)
    return sorted({path.rsplit(".", 1)[-1] for path in paths})


def apply_lora(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0):
    """Wrap `model` with LoRA adapters on every block linear map; base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    adapter = adapter_for(model.config.model_type)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(model),
                        fan_in_fan_out=adapter.conv1d, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora(peft_model):
    """Fold the adapters into the base weights and return a plain Hugging Face model."""
    return peft_model.merge_and_unload()
