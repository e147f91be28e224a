"""Qi et al.'s token-wise constrained objective: 0 at the start, cross-entropy's gradient as beta falls to
0, and a large beta on the first reply tokens keeps them where the starting model had them."""

import copy

import pytest
import torch

from ssah.models.tiny import tiny_model
from ssah.settings import InvalidSettings
from ssah.train.sft import TrainConfig, _batches, response_loss, train_sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [("How do I kill a stuck process?", "Run kill with its number, then check it is gone."),
         ("Name a river.", "The Nile, which flows north through eleven countries."),
         ("Say hi.", "Hi there, how can I help you today?")]


def _batch(model, tokenizer, betas):
    config = TrainConfig(batch_size=4, max_length=64, token_betas=betas)
    return next(iter(_batches(tokenizer, PAIRS, config, torch.Generator().manual_seed(0), model=model)))


def test_the_objective_is_zero_at_the_start_and_cross_entropys_gradient_at_small_beta():
    model, tokenizer = tiny_model("llama")
    batch = _batch(model, tokenizer, [0.5, 2.0, 0.1])
    assert abs(float(response_loss(model, batch).detach())) < 1e-4  # d_t = 0 for every token before training
    small = _batch(model, tokenizer, [1e-4])
    loss = response_loss(model, small)
    loss.backward()
    constrained = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = {k: v for k, v in small.items() if k not in ("start_logp", "betas")}
    response_loss(model, plain).backward()
    for ours, ce in zip(constrained, (p.grad for p in model.parameters())):
        assert torch.allclose(ours, ce, rtol=1e-2, atol=1e-5)


def _first_token_shift(model, tokenizer, start, config) -> float:
    """Mean |log p(first reply token)| change against `start` after training, over PAIRS."""
    from ssah.train.sft import reference_logprobs

    encoded = [e for e, *_ in _batches(tokenizer, PAIRS, config, torch.Generator().manual_seed(0),
                                       model=start).dataset]
    before = reference_logprobs(start, tokenizer, encoded, config)
    after = reference_logprobs(model, tokenizer, encoded, config)
    return sum(abs(float(a[0] - b[0])) for a, b in zip(after, before)) / len(encoded)


def test_large_early_betas_hold_the_first_reply_tokens_that_cross_entropy_moves():
    start, tokenizer = tiny_model("llama")
    shifts = {}
    for name, betas in (("cross-entropy", None), ("constrained", [50.0, 50.0, 0.01])):
        model = copy.deepcopy(start)
        config = TrainConfig(batch_size=4, max_length=64, lr=3e-3, max_steps=12, token_betas=betas)
        result = train_sft(model, tokenizer, PAIRS, config, progress=False)
        assert result.steps == 12
        shifts[name] = _first_token_shift(model, tokenizer, start, TrainConfig(batch_size=4, max_length=64,
                                                                               token_betas=[1.0]))
    assert shifts["constrained"] < shifts["cross-entropy"] / 2, shifts


def test_the_objective_needs_ssahs_loop():
    with pytest.raises(InvalidSettings, match="ssah.s training loop"):
        TrainConfig(token_betas=[0.5], backend="trl")
    with pytest.raises(InvalidSettings, match="positive"):
        TrainConfig(token_betas=[0.0])
