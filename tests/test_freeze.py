"""Frozen entries stay bit-identical through real training; trainable ones move."""

import math

import pytest
import torch

from ssah.errors import SsahError
from ssah.interventions.freeze import UnitFreezer, freeze_callback
from ssah.interventions.masks import random_mask
from ssah.models.tiny import tiny_model
from ssah.train.sft import TrainConfig, train_sft
from ssah.units.layout import UnitLayout

PAIRS = [(f"Question number {i}: what is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)]


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
    assert freezer.mode == "masked"  # the Trainer's AdamW needs no copy
    assert freezer.check()["max_abs_change_frozen"] == 0.0


def _adamw_steps(model, tokenizer, optimizer, steps: int = 3) -> None:
    ids = tokenizer(["some text to fit", "another bit of text"], return_tensors="pt", padding=True)
    model.train()
    for _ in range(steps):
        model(**ids, labels=ids["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_masked_mode_keeps_no_copy_and_trains_exactly_like_copy_mode():
    """AdamW with decay: masked mode (no copy, decay taken over by the freezer) and copy mode give the
    same weights entry for entry, frozen and trainable alike."""
    runs = {}
    for copy in (False, True):
        model, tokenizer = tiny_model("llama")
        layout = UnitLayout.from_model(model)
        freezer = UnitFreezer(model, layout, random_mask(layout, 0.5, seed=4), copy=copy)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = freezer.wrap_optimizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1))
        _adamw_steps(model, tokenizer, optimizer)
        assert freezer.mode == ("copy" if copy else "masked")
        assert (freezer.copy_bytes() > 0) == copy
        assert freezer.check()["max_abs_change_frozen"] == 0.0
        runs[copy] = {n: p.detach().clone() for n, p in model.named_parameters()}
        freezer.remove()  # the optimizer gets its decay back and no hook of the freezer runs any more
        assert optimizer.param_groups[0]["weight_decay"] == 0.1
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert all(torch.equal(runs[False][n], runs[True][n]) for n in runs[True])


def test_optimizers_that_could_move_frozen_entries_get_copy_mode():
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.3, seed=5)
    params = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    coupled = UnitFreezer(model, layout, mask)
    coupled.wrap_optimizer(torch.optim.SGD(params(), lr=1e-2, momentum=0.9, weight_decay=0.1))
    assert coupled.mode == "copy"
    coupled.remove()
    with pytest.raises(SsahError, match="coupled"):
        UnitFreezer(model, layout, mask, copy=False).wrap_optimizer(
            torch.optim.Adam(params(), lr=1e-2, weight_decay=0.1))
    # An optimizer that already has moments for the frozen parameters cannot be trusted to leave them.
    stale = torch.optim.AdamW(params(), lr=1e-2)
    _adamw_steps(model, tokenizer, stale, steps=1)
    before = frozen_values(model, layout, mask)
    freezer = UnitFreezer(model, layout, mask)
    freezer.wrap_optimizer(stale)
    assert freezer.mode == "copy"
    _adamw_steps(model, tokenizer, stale, steps=2)
    assert all(torch.equal(before[k], frozen_values(model, layout, mask)[k]) for k in before)


def test_check_catches_a_frozen_entry_that_moved_and_a_late_attach():
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.3, seed=6)
    (name, dim), positions = next(iter(mask.owned_slices(layout).items()))
    param = dict(model.named_parameters())[name]
    late = UnitFreezer(model, layout, mask)
    with torch.no_grad():
        param.index_fill_(dim, positions[:1], 0.5)
    with pytest.raises(SsahError, match="before training starts"):
        late.wrap_optimizer(torch.optim.AdamW([param], lr=1e-2))
    late.remove()
    for copy in (False, True):
        freezer = UnitFreezer(model, layout, mask, copy=copy)
        freezer.wrap_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
        with torch.no_grad():
            param.index_fill_(dim, positions[:1], 0.75 + copy)  # 0.5 -> 0.75, then 0.75 -> 1.75
        worst = freezer.check()["max_abs_change_frozen"]
        assert worst == pytest.approx(1.0) if copy else math.isnan(worst)
        freezer.remove()


def _pairs_file(tmp_path):
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return f"jsonl:{path}"


def test_a_freeze_breach_stops_the_run_and_saves_nothing(tmp_path):
    """Something that writes into frozen entries mid-training (here a forward hook) is caught by the
    check after training: one SsahError, no model folder."""
    from ssah.data import load_dataset
    from ssah.models.loading import load_model
    from ssah.train.recipes import finetune
    from ssah.train.settings import TrainSettings

    loaded = load_model("tiny:llama", device="cpu")
    mask = random_mask(loaded.layout, 0.3, seed=8)
    (name, dim), positions = next(iter(mask.owned_slices(loaded.layout).items()))
    param = dict(loaded.model.named_parameters())[name]
    calls = []

    def tamper(module, args):
        calls.append(1)
        if len(calls) == 2:  # after the freezer has attached, before the second step
            with torch.no_grad():
                param.index_fill_(dim, positions[:1], 0.25)

    handle = loaded.model.register_forward_pre_hook(tamper)
    settings = TrainSettings(lr=1e-2, max_steps=3, batch_size=4, max_length=64)
    with pytest.raises(SsahError, match="freeze breach"):
        finetune(loaded, load_dataset(_pairs_file(tmp_path)), settings, tmp_path / "ft", freeze=mask)
    handle.remove()
    assert not (tmp_path / "ft").exists()
    # the same run without the tampering finishes, its frozen entries intact
    loaded = load_model("tiny:llama", device="cpu")
    record = finetune(loaded, load_dataset(_pairs_file(tmp_path)), settings, tmp_path / "ft", freeze=mask)
    assert record["result"]["check"]["max_abs_change_frozen"] == 0.0


def test_finetune_with_only_some_units_trainable_freezes_what_no_unit_owns(tmp_path):
    """freeze_ii_strict's recipe: only the trainable units' entries move; embeddings, norms, the head
    and q/k rows stay; the record's trainable share is what the units own, over all entries."""
    from ssah.data import load_dataset
    from ssah.interventions.masks import complement
    from ssah.models.loading import load_model
    from ssah.train.recipes import finetune
    from ssah.train.settings import TrainSettings

    loaded = load_model("tiny:llama", device="cpu")
    frozen = random_mask(loaded.layout, 0.6, seed=9)
    trainable = complement(frozen)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    settings = TrainSettings(lr=1e-2, max_steps=3, batch_size=4, max_length=64)
    record = finetune(loaded, load_dataset(_pairs_file(tmp_path)), settings, tmp_path / "strict", trainable=trainable)
    owned = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in start.items()}
    for (name, dim), positions in trainable.owned_slices(loaded.layout).items():
        owned[name].index_fill_(dim, positions, True)
    total = sum(p.numel() for p in start.values())
    assert record["trainable_share"] == pytest.approx(sum(int(o.sum()) for o in owned.values()) / total)
    moved = {n: p.detach() != start[n] for n, p in loaded.model.named_parameters()}
    assert all(not (moved[n] & ~owned[n]).any() for n in moved)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert not moved[name].any(), name
    assert sum(int(m.sum()) for m in moved.values()) > 0
    # freezing the complement instead (freeze_ii's way) leaves those parameters trainable: a larger share
    loaded = load_model("tiny:llama", device="cpu")
    loose = finetune(loaded, load_dataset(_pairs_file(tmp_path)), settings, tmp_path / "loose", freeze=frozen)
    assert loose["trainable_share"] > record["trainable_share"]
    with pytest.raises(SsahError, match="not both"):
        finetune(loaded, load_dataset(_pairs_file(tmp_path)), settings, tmp_path / "x", freeze=frozen,
                 trainable=trainable)


def test_random_draws_match_per_layer_per_kind_sizes():
    from ssah.interventions.masks import overlap, random_like

    layout = UnitLayout.from_model(tiny_model("llama")[0])
    small, large = random_mask(layout, 0.2, seed=10), random_mask(layout, 0.7, seed=11)
    for mask, outside in ((small, True), (large, False), (large, True)):
        draws = [random_like(mask, seed, outside=outside) for seed in (0, 1)]
        for drawn in draws:
            for kind in mask.units:
                assert torch.equal(drawn.units[kind].sum(dim=1), mask.units[kind].sum(dim=1))
        assert draws[0].digest() != draws[1].digest()
        assert random_like(mask, 0, outside=outside).digest() == draws[0].digest()  # seeded
    assert overlap(random_like(small, 0), small) == 0.0  # room outside: drawn from there only
    # no room outside: every unit outside, the rest from inside
    filled, crowded = random_like(large, 0), 0
    for kind, units in large.units.items():
        for layer in range(units.shape[0]):
            if int(units[layer].sum()) >= int((~units[layer]).sum()):
                crowded += 1
                assert (filled.units[kind][layer] | units[layer]).all()
    assert crowded > 0
    # 70% of units leave no room outside: drawn over all units, about 70% of them inside by chance
    assert 0.5 < overlap(random_like(large, 0, outside=False), large) < 0.9
