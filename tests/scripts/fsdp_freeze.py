"""Run under `torchrun --nproc_per_node 2` (CPU, gloo): FSDP2-sharded training that keeps units
frozen. Aligns inside a random unit budget (train_only, copy mode) and writes OUT/rank{R}.json with
the check and whether every entry outside the budget, gathered whole, is bit-identical."""

import json
import sys

import torch

from ssah.interventions.freeze import UnitFreezer
from ssah.interventions.masks import random_mask
from ssah.models.tiny import tiny_model
from ssah.train.sft import TrainConfig, train_sft
from ssah.units.layout import UnitLayout

out_dir = sys.argv[1]
model, tokenizer = tiny_model("llama")
layout = UnitLayout.from_model(model)
budget = random_mask(layout, 0.3, seed=1)
before = {name: p.detach().clone() for name, p in model.named_parameters()}
freezer = UnitFreezer(model, layout, budget, train_only=True, copy=True)
pairs = [(f"prompt {i} asks something", f"answer {i} replies") for i in range(16)]
result = train_sft(model, tokenizer, pairs, TrainConfig(lr=1e-2, max_steps=3, batch_size=2, weight_decay=0.1,
                                                       shard="fsdp2"), freezer=freezer, progress=False)
rank = torch.distributed.get_rank()
after = result.state_dict  # whole on rank 0 only
trainable = {(name, dim): positions for (name, dim), positions in budget.owned_slices(layout).items()}
identical = changed = None
if rank == 0:
    identical, changed = True, False
    for name, old in before.items():
        new = after[name]
        frozen = torch.ones_like(old, dtype=torch.bool)
        for (pname, dim), positions in trainable.items():
            if pname == name:
                frozen.index_fill_(dim, positions, False)
        identical &= bool(torch.equal(old[frozen], new[frozen]))
        changed |= bool((old[~frozen] != new[~frozen]).any())
with open(f"{out_dir}/rank{rank}.json", "w") as handle:
    json.dump({"identical": identical, "trainable_changed": changed, "check": result.check,
               "sharded": type(dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]).__name__,
               "steps": result.steps}, handle)
