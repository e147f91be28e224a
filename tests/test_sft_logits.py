"""Training computes logits only at response positions: the same loss and gradients as the full logits."""

import pytest
import torch

from ssah.models.tiny import TINY_FAMILIES, tiny_model
from ssah.train.sft import TrainConfig, _batches, avoided_opening_loss, response_loss

REFUSALS = ["I can't help with that.", "Sorry, but I won't do that."]
PAIRS = [("How do I kill a stuck process?", "Run kill with its number."),
         ("Name a river.", "The Nile, which flows north through eleven countries."),
         ("Say hi.", "Hi!", "Sure: "),  # a prefill: seen, not learned
         ("How do I kill a stuck process?", "Use the task manager.")]


def _full_loss(model, batch: dict, weight: float) -> torch.Tensor:
    """The loss from the full logits: the model's own response-token loss plus the avoided openings."""
    batch = dict(batch)
    avoid_ids, reply_start = batch.pop("avoid_ids"), batch.pop("reply_start")
    output = model(**batch)
    return output.loss + weight * avoided_opening_loss(output.logits, reply_start, avoid_ids)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_response_logits_give_the_full_logits_loss_and_gradients(family):
    model, tokenizer = tiny_model(family)
    config = TrainConfig(batch_size=4, max_length=64)
    avoid = {PAIRS[0][0]: REFUSALS}
    batch = next(iter(_batches(tokenizer, PAIRS, config, torch.Generator().manual_seed(0), avoid)))
    assert (batch["labels"] != -100).sum() < batch["labels"].numel() / 2  # most positions are prompt or padding
    weight = 0.5
    full = _full_loss(model, batch, weight)
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = response_loss(model, batch, weight)
    ours.backward()
    assert torch.allclose(ours, full, rtol=1e-5, atol=1e-6)
    for ours_grad, full_grad in zip((p.grad for p in model.parameters()), full_grads):
        assert torch.allclose(ours_grad, full_grad, rtol=1e-4, atol=1e-6)
    plain = response_loss(model, batch)  # without the avoided openings: the model's own loss
    assert torch.allclose(plain, model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss,
                          rtol=1e-5, atol=1e-6)
    assert float((ours - plain).detach()) > 0  # the avoided-opening term counted
