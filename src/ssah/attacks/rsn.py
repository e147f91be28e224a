"""RSN-Tune (Zhao et al., ICLR 2025), written from the paper's description: robust safety neurons,
tuned on safety data before anyone fine-tunes the model.

Detector. A unit's importance for an input is how much the block's output moves when the unit is
switched off: the norm, over the input's tokens, of its activation times its outgoing weights (the
column of B it owns), which factors into the L2 norm of the activation over the tokens times the
column's norm. Where a norm follows B before the residual add (Gemma 2 and 3's post norms), both are
taken where the unit enters the residual stream, as `ssah.units.scoring` does: the activation divided
per token by the rms of B's output, the column multiplied by the norm's per-channel gain. A unit is
important for an input when it ranks in the top `top` share of its block (kind and layer); a *safety*
unit is important consistently, on at least `min_share` of the harmful queries (default: every one),
a *foundation* unit likewise on general inputs. Robust safety units are safety units that are not
foundation units, so ordinary fine-tuning, which works through foundation units, should leave them alone.

Tuning. Only the robust safety units train, on harmful prompts answered with built-in refusals, at the
paper's learning rate (`attacks.rsn_lr`, 1e-6); everything else stays bit-identical. The downstream
fine-tuning attack then runs as usual.

Departures from the paper that remain:
- units are ssah's (MLP neurons and attention value/output channels); the paper's query and key
  neurons, whose effect passes through the softmax, are not detected;
- "important" is a top share of the unit's block, not the paper's threshold on the importance itself;
- foundation units come from benign instructions (`data.benign_calibration`), not a general web-text
  corpus: ssah's only prose corpus measures perplexity, and a corpus must not both build and measure;
- the safety data are ssah's built-in refusals to `harmful:train` prompts, and the tuning runs
  `attacks.rsn_steps` steps, far fewer than the paper's.
"""

from __future__ import annotations

import torch

from ssah.interventions.masks import UnitMask
from ssah.units.layout import UnitLayout
from ssah.units.scoring import block_inputs, make_batches


@torch.no_grad()
def importance_counts(model, layout: UnitLayout, batches, top: float) -> tuple[dict[str, torch.Tensor], int]:
    """Per unit (kind -> [layers, units]), on how many inputs it was among the top `top` share of its
    block by ||activation over the input's tokens|| x ||outgoing weights||; and the number of inputs."""
    blocks = [block for kind in layout.kinds for block in layout.blocks[kind]]
    modules = [model.get_submodule(block.b_module) for block in blocks]
    norms = [_outgoing_norms(model, block, module) for block, module in zip(blocks, modules)]
    counts = {kind: torch.zeros(layout.num_layers, layout.units_per_layer[kind]) for kind in layout.kinds}
    current = {"mask": None}

    def on_input(index: int, x: torch.Tensor) -> None:
        block = blocks[index]
        mask = current["mask"].to(x.device)
        # switching a channel off moves the block's output by |x_t| x its column at every token t: over
        # the input, the L2 norm of x over the tokens times the column's norm
        magnitude = (x.float().square() * mask[..., None]).sum(1).sqrt()
        unit_score = (magnitude * norms[index].to(magnitude.device))[:, block.b_channels].sum(-1)  # [B, units]
        keep = max(1, round(top * unit_score.shape[1]))
        top_units = unit_score.topk(keep, dim=1).indices
        counts[block.kind][block.layer] += torch.zeros_like(unit_score).scatter_(1, top_units, 1.0).sum(0).cpu()

    inputs = 0
    with block_inputs(model, modules, on_input, [block.post_norm for block in blocks]) as forward:
        for batch in batches:
            current["mask"] = batch["attention_mask"].float()
            forward(batch)
            inputs += batch["input_ids"].shape[0]
    return counts, inputs


def _outgoing_norms(model, block, module) -> torch.Tensor:
    """Per input channel of B, the norm of the weights it writes through, as they reach the residual
    stream: where a post norm follows B (Gemma 2 and 3), each output row is multiplied by its gain."""
    if block.post_norm is None:
        return module.weight.detach().float().norm(dim=1 - block.b_in_dim)
    return block.residual_weight(model).norm(dim=1 - block.b_in_dim).float()


def robust_safety_units(loaded, harmful: list[str], general: list[str], *, top: float = 0.01,
                        min_share: float = 1.0, batch_size: int = 8, max_length: int = 256) -> tuple[UnitMask, dict]:
    """The robust safety units of a loaded model (see the module docstring) and how many of each kind."""
    def frequent(prompts: list[str]) -> dict[str, torch.Tensor]:
        batches = make_batches(loaded.tokenizer, [(p, None) for p in prompts], batch_size, max_length)
        counts, n = importance_counts(loaded.model, loaded.layout, batches, top)
        return {kind: value >= min_share * n for kind, value in counts.items()}

    safety, foundation = frequent(harmful), frequent(general)
    robust = {kind: safety[kind] & ~foundation[kind] for kind in safety}
    mask = UnitMask(robust, "rsn", loaded.fingerprint)
    sizes = {"safety_units": int(sum(m.sum() for m in safety.values())),
             "foundation_units": int(sum(m.sum() for m in foundation.values())),
             "robust_safety_units": mask.count(), "share": mask.share()}
    return mask, sizes
