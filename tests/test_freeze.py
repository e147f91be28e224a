"""Frozen entries stay bit-identical through real training; trainable ones move."""

import pytest
import torch

from ssah.interventions.freeze import UnitFreezer, freeze_callback
from ssah.interventions.masks import UnitMask
from ssah.models.tiny import tiny_model
from ssah.train.sft import TrainConfig, train_sft
from ssah.units.layout import UnitLayout

PAIRS = [(f"Question number {i}: what is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)]


def random_mask(layout: UnitLayout, share: float, seed: int = 0) -> UnitMask:
    gen = torch.Generator().manual_seed(seed)
    units = {k: torch.rand(layout.num_layers, layout.units_per_layer[k], generator=gen) < share
             for k in layout.kinds}
    return UnitMask(units, f"random:frac={share}")


def frozen_values(model, layout, mask):
    params = dict(model.named_parameters())
    return {key: params[key[0]].detach().index_select(key[1], pos).clone()
            for key, pos in mask.owned_slices(layout).items()}


def test_frozen_units_bit_identical_every_family(family):
    model, tokenizer = tiny_model(family)
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.3)
    before = frozen_values(model, layout, mask)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    freezer = UnitFreezer(model, layout, mask)
    config = TrainConfig(lr=1e-2, max_steps=4, batch_size=3, grad_accum=2, weight_decay=0.1,
                         grad_clip=0.5, max_length=64)
    result = train_sft(model, tokenizer, PAIRS, config, freezer=freezer, progress=False)
    after = frozen_values(model, layout, mask)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert result.check["max_abs_change_frozen"] == 0.0
    assert result.check["share_trainable_entries_changed"] > 0.5
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert any("weight" in n for n in moved)
    assert len(result.loss_curve) == 4


@pytest.mark.parametrize("optim", ["adamw", "sgd_momentum"])
def test_freeze_with_plain_pytorch_optimizers_and_bf16_autocast(optim):
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.5, seed=3)
    before = frozen_values(model, layout, mask)
    freezer = UnitFreezer(model, layout, mask)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1) if optim == "adamw"
           else torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1))
    freezer.wrap_optimizer(opt)
    ids = tokenizer(["some text to fit", "another bit of text"], return_tensors="pt", padding=True)
    model.train()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    after = frozen_values(model, layout, mask)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_only_budget_keeps_everything_else(family):
    """Alignment budget: only the budget units' entries may move; embeddings and norms too stay."""
    model, tokenizer = tiny_model(family)
    layout = UnitLayout.from_model(model)
    budget = random_mask(layout, 0.2, seed=1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    freezer = UnitFreezer(model, layout, budget, train_only=True)
    config = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, weight_decay=0.1, max_length=64)
    train_sft(model, tokenizer, PAIRS, config, freezer=freezer, progress=False)
    allowed = budget.owned_slices(layout)
    params = dict(model.named_parameters())
    moved_any = False
    for name, param in params.items():
        diff = param.detach() != start[name]
        for (pname, dim), positions in allowed.items():
            if pname == name:
                index = [slice(None)] * diff.dim()
                index[dim] = positions
                moved_any |= bool(diff[tuple(index)].any())
                diff[tuple(index)] = False
        assert not diff.any(), f"{name} moved outside the budget"
    assert moved_any


def test_trainer_callback_keeps_frozen_entries(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ssah.data.chat import collate_pairs, encode_pair

    model, tokenizer = tiny_model("qwen2")
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.4, seed=2)
    before = frozen_values(model, layout, mask)
    freezer = UnitFreezer(model, layout, mask)
    items = [encode_pair(tokenizer, p, r) for p, r in PAIRS]

    def collate(batch):
        out = collate_pairs(batch, tokenizer.pad_token_id)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"],
                "labels": out["input_ids"].masked_fill(~out["response_mask"], -100)}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=items, data_collator=collate,
            callbacks=[freeze_callback(freezer)]).train()
    after = frozen_values(model, layout, mask)
    assert all(torch.equal(before[k], after[k]) for k in before)
