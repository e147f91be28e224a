"""A stable fingerprint of a model's identity, stored by every artifact made from it.

Hash of: the config (minus fields that describe how it was loaded rather than what it is),
every parameter's name and shape, and a sample of 4096 evenly spaced entries of every
parameter. The sample is rounded to bfloat16 before hashing so the same weights loaded in
fp32 on a CPU and in bf16 on a GPU share one fingerprint, while any real training step
(which moves many sampled entries well beyond bf16 precision) changes it.
"""

from __future__ import annotations

import hashlib
import json

import torch

# Config fields that vary with how a model was loaded or saved, not with what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
    "_attn_implementation", "_attn_implementation_autoset", "use_cache", "architectures",
    "_commit_hash", "output_attentions", "output_hidden_states", "return_dict",
}
SAMPLES_PER_PARAM = 4096


def config_digest(config) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def sample_bytes(tensor: torch.Tensor) -> bytes:
    """`SAMPLES_PER_PARAM` evenly spaced entries of a tensor, rounded to bfloat16, as bytes."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_PARAM)
    return flat[::step][:SAMPLES_PER_PARAM].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Hex sha256 (first 16 hex digits) identifying a model's architecture and weights."""
    digest = hashlib.sha256(config_digest(model.config).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        if param.device.type == "meta":  # offloaded: shape only
            continue
        digest.update(sample_bytes(param))
    return digest.hexdigest()[:16]
