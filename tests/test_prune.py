"""Structured pruning: reversible == permanent == saved and reloaded; the model comes back intact."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ssah.errors import SsahError
from ssah.interventions.masks import UnitMask
from ssah.interventions.prune import prune_, pruned
from ssah.models.fingerprint import model_fingerprint
from ssah.models.tiny import tiny_model
from ssah.units.layout import UnitLayout


def _mask(layout, share, fingerprint=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    units = {k: torch.rand(layout.num_layers, layout.units_per_layer[k], generator=gen) < share for k in layout.kinds}
    return UnitMask(units, "random", fingerprint)


def test_reversible_equals_permanent_equals_reloaded(family, tmp_path):
    model, tokenizer = tiny_model(family)
    layout = UnitLayout.from_model(model)
    mask = _mask(layout, 0.2, model_fingerprint(model))
    ids = tokenizer(["pruning keeps the rest", "and restores it"], return_tensors="pt", padding=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = model(**ids).logits
        with pruned(model, layout, mask):
            reversible = model(**ids).logits
        restored = model(**ids).logits
    assert not torch.allclose(original, reversible, atol=1e-4)
    torch.testing.assert_close(restored, original, atol=0, rtol=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    prune_(model, layout, mask)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reversible, atol=0, rtol=0)
        torch.testing.assert_close(reloaded(**ids).logits, reversible, atol=1e-6, rtol=0)


def test_restored_even_after_an_error():
    model, _ = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with pruned(model, layout, _mask(layout, 0.5, model_fingerprint(model))):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mask_of_another_model_is_refused():
    model, _ = tiny_model("llama")
    other, _ = tiny_model("llama", seed=1)
    layout = UnitLayout.from_model(model)
    mask = _mask(layout, 0.1, model_fingerprint(other))
    with pytest.raises(SsahError, match="was made for model"):
        prune_(model, layout, mask)
    wrong_shape = _mask(UnitLayout.from_model(tiny_model("gemma")[0]), 0.1)
    with pytest.raises(SsahError, match="units but the model has"):
        prune_(model, layout, wrong_shape)
