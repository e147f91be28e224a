"""Run under `accelerate launch --cpu --num_processes 2`: data-parallel training with frozen units.

Each rank writes its frozen-entry check and a digest of all its weights to OUT/rank{R}.json.
"""

import hashlib
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
mask = random_mask(layout, 0.3, seed=0)
params = dict(model.named_parameters())
before = {k: params[k[0]].detach().index_select(k[1], p).clone() for k, p in mask.owned_slices(layout).items()}
freezer = UnitFreezer(model, layout, mask)
pairs = [(f"prompt {i} asks something", f"answer {i} replies") for i in range(16)]
result = train_sft(model, tokenizer, pairs, TrainConfig(lr=1e-2, max_steps=3, batch_size=2, weight_decay=0.1),
                   freezer=freezer, progress=False)
identical = all(torch.equal(before[k], params[k[0]].detach().index_select(k[1], p))
                for k, p in mask.owned_slices(layout).items())
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
with open(f"{out_dir}/rank{rank}.json", "w") as handle:
    json.dump({"identical": identical, "max_change": result.check["max_abs_change_frozen"],
               "digest": digest, "world": world, "steps": result.steps}, handle)
