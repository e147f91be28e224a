"""Safe LoRA (Hsu et al., NeurIPS 2024), written from the paper's description.

For each weight LoRA adapts, V = W_aligned - W_base (what alignment changed there) gives the matrix
C = V V^T / ||V||_F. After LoRA fine-tuning, the update dW = B A of a layer whose projection C dW is
too unlike dW (cosine similarity below a threshold) is replaced by C dW, so the update keeps only the
part that lies along the alignment's own directions; the others are kept. Training-free: it only
post-processes a LoRA run. A weight alignment did not change (V = 0) keeps its update as it is.
"""

from __future__ import annotations

import torch


def _project(delta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """C @ delta with C = v v^T / ||v||_F, without forming C."""
    return v @ (v.T @ delta) / v.norm()


@torch.no_grad()
def safe_lora_merge(peft_model, base_weights: dict[str, torch.Tensor], threshold: float):
    """Merge a peft LoRA model's updates into its base weights, the dissimilar ones projected; returns
    (plain model, report). `base_weights` maps a weight's name in the plain model to the unaligned
    model's values of it."""
    from peft.tuners.lora import LoraLayer

    updates, projected, similarities = {}, 0, {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        weight_name = name.removeprefix("base_model.model.") + ".weight"
        delta = module.get_delta_weight("default").float()
        base = base_weights.get(weight_name)
        if base is None:
            updates[weight_name] = delta
            continue
        v = module.get_base_layer().weight.detach().float() - base.to(delta.device).float()
        if module.fan_in_fan_out:  # Conv1D stores weights transposed: project along the output axis
            v, delta = v.T, delta.T
        if v.norm() == 0:
            updates[weight_name] = delta.T if module.fan_in_fan_out else delta
            continue
        proj = _project(delta, v)
        similarity = float((delta * proj).sum() / (delta.norm() * proj.norm()).clamp_min(1e-12))
        similarities[weight_name] = similarity
        if similarity < threshold:
            delta, projected = proj, projected + 1
        updates[weight_name] = delta.T if module.fan_in_fan_out else delta
    model = peft_model.unload()
    params = dict(model.named_parameters())
    for weight_name, delta in updates.items():
        params[weight_name].add_(delta.to(params[weight_name].dtype))
    report = {"layers": len(updates), "projected": projected, "threshold": threshold,
              "mean_similarity": sum(similarities.values()) / len(similarities) if similarities else None}
    return model, report


def base_weights_for(lora_model, base_model) -> dict[str, torch.Tensor]:
    """The unaligned model's values of every weight LoRA adapts in `lora_model` (a plain model's names)."""
    from peft.tuners.lora import LoraLayer

    params = dict(base_model.named_parameters())
    names = [name.removeprefix("base_model.model.") + ".weight" for name, module in lora_model.named_modules()
             if isinstance(module, LoraLayer)]
    return {name: params[name].detach().cpu().clone() for name in names if name in params}
