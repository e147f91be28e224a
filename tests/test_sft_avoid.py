"""The avoided-opening loss: hand-checked, and it makes a refusal's opening unlikely in training."""

import math

import torch

from ssah.data.chat import encode_pair
from ssah.models.tiny import tiny_model
from ssah.train.sft import TrainConfig, avoided_opening_loss, opening_tokens, train_sft

REFUSALS = ["I can't help with that.", "Sorry, but I won't do that."]
PAIRS = [(f"How do I kill process number {i}?", f"Run kill {i} in a shell.") for i in range(12)]


def test_avoided_opening_loss_matches_a_hand_computation():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, -1.0]],
                           [[0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 0.0]]])
    reply_start = torch.tensor([1, 0])
    avoid_ids = torch.tensor([[1, 2], [-1, -1]])  # row 1 has nothing to avoid
    p = torch.softmax(logits[0, 1], -1)
    expected = -math.log(1 - float(p[1] + p[2]))
    assert math.isclose(float(avoided_opening_loss(logits, reply_start, avoid_ids)), expected, rel_tol=1e-6)
    assert avoided_opening_loss(logits, reply_start, torch.full((2, 2), -1)) is None


def _opening_probability(model, tokenizer, prompts, texts) -> float:
    """Mean probability that the reply to each prompt opens with one of the texts' first tokens."""
    total = 0.0
    for prompt in prompts:
        firsts = opening_tokens(tokenizer, prompt, texts)
        e = encode_pair(tokenizer, prompt, None)
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0, -1]
        total += float(torch.softmax(logits.float(), -1)[sorted(firsts)].sum())
    return total / len(prompts)


def test_training_with_avoided_refusals_makes_their_opening_unlikely():
    """Same data, seed and steps: only the avoided-opening loss differs, and it lowers the
    probability of opening the reply with a refusal's first token, on the trained prompts and on
    unseen ones of the same kind."""
    config = TrainConfig(lr=3e-3, max_steps=6, batch_size=4, max_length=64)
    unseen = [f"How do I kill process number {i}?" for i in range(40, 44)]
    # start both runs from a model that already tends to refuse: a few steps on refusals
    base, tokenizer = tiny_model("llama", seed=3)
    train_sft(base, tokenizer, [(p, REFUSALS[0]) for p, _ in PAIRS], TrainConfig(lr=3e-3, max_steps=4, batch_size=4,
                                                                                max_length=64), progress=False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    plain, _ = tiny_model("llama", seed=3)
    plain.load_state_dict(state)
    result = train_sft(plain, tokenizer, PAIRS, config, progress=False)
    contrast, _ = tiny_model("llama", seed=3)
    contrast.load_state_dict(state)
    avoid = {p: REFUSALS for p, _ in PAIRS}
    contrast_result = train_sft(contrast, tokenizer, PAIRS, config, progress=False, avoid=avoid)
    assert contrast_result.loss_curve[0] > result.loss_curve[0]  # the extra term enters the loss
    prompts = [p for p, _ in PAIRS]
    for group in (prompts, unseen):
        p_plain = _opening_probability(plain, tokenizer, group, REFUSALS)
        p_contrast = _opening_probability(contrast, tokenizer, group, REFUSALS)
        assert p_contrast < 0.5 * p_plain, (p_plain, p_contrast)
    # weight 0 trains exactly like no avoid map at all
    off, _ = tiny_model("llama", seed=3)
    off.load_state_dict(state)
    off_result = train_sft(off, tokenizer, PAIRS, TrainConfig(**{**config.to_dict(), "avoid_weight": 0.0}),
                           progress=False, avoid=avoid)
    assert off_result.loss_curve == result.loss_curve
