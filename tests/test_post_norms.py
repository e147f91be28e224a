"""Gemma 2 and 3 normalise each sublayer's output before the residual add (post norms).

What that does to units, checked on tiny models and on the real Gemma 3 270M:
- pruning one unit removes its term from the sublayer's output y = B X exactly, but the change in the
  residual stream is not that term: the post norm rescales every other unit of the sublayer;
- pruning a group keeps the sublayer's output at the same rms per token; only pruning all its units
  removes it;
- activation scores (Eq. 1) equal the variance of the change in the residual stream when the unit
  alone is pruned, up to that rescaling, in every layer, so they rank units on one scale.
"""

from pathlib import Path

import pytest
import torch

from ssah.models.tiny import TINY_FAMILIES, tiny_model
from ssah.units.layout import UnitLayout
from ssah.units.scoring import make_batches, score_batches

POST_NORM_FAMILIES = ("gemma2", "gemma3")
GEMMA3 = Path("~/.cache/ssah-models/gemma-3-270m.gguf").expanduser()
PAIRS = [
    ("How do units carry safety?", "Through a few neurons that pick the refusal."),
    ("Name a colour.", "Blue."),
    ("Write one long sentence about attention heads and the channels they feed.",
     "Heads mix tokens; channels carry it."),
    ("What is two plus three?", "Five."),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gemma_with_uneven_gains(family: str):
    """A tiny model whose post norms have real gains: a fresh one's are all 1 (weight 0), which
    would hide a score that forgets them. Gains are log-normal, so none is near zero."""
    model, tokenizer = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".post_" in name and name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=gen).exp() - 1)
    return model, tokenizer


def _capture(model, layout, batch, keys):
    """Per (kind, layer): B's input x and output y, and the sublayer's output as added to the residual
    stream r (the post norm's output, or y itself without one), each [tokens, channels] float64."""
    store, handles = {key: {} for key in keys}, []
    for key in keys:
        block = layout.block(*key)

        def on_b(module, args, output, parts=store[key], plain=block.post_norm is None):
            parts.update(x=args[0], y=output, **({"r": output} if plain else {}))

        def on_norm(module, args, output, parts=store[key]):
            parts["r"] = output

        handles.append(model.get_submodule(block.b_module).register_forward_hook(on_b))
        if block.post_norm is not None:
            handles.append(model.get_submodule(block.post_norm.module).register_forward_hook(on_norm))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for handle in handles:
        handle.remove()
    keep = batch["attention_mask"].bool()
    return {key: {name: value[keep].double() for name, value in parts.items()} for key, parts in store.items()}


def _gemma_norm(norm, y):
    """Gemma's RMSNorm written out: y / sqrt(mean(y^2) + eps) * (1 + w)."""
    return y * torch.rsqrt(y.square().mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.detach().double())


def _single_unit_prune_variance(model, block, x, y, chunk: int = 64):
    """Per unit j: sum over residual channels of Var_tokens(r - r without j), where r without j is the
    post norm applied to y - x_j W_B[:, j] (what pruning j alone gives, by the test above)."""
    norm = model.get_submodule(block.post_norm.module)
    weight = model.get_submodule(block.b_module).weight.detach().double()  # [hidden, units]
    r = _gemma_norm(norm, y)
    out = torch.empty(weight.shape[1], dtype=torch.float64)
    for start in range(0, weight.shape[1], chunk):
        cols = torch.arange(start, min(start + chunk, weight.shape[1]))
        without = y[:, None, :] - x[:, cols, None] * weight[:, cols].T[None]  # [tokens, units, hidden]
        out[cols] = (r[:, None, :] - _gemma_norm(norm, without)).var(dim=0).sum(-1)
    return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_post_norms_are_found_exactly_where_the_family_has_them(family):
    model, _ = tiny_model(family)
    layout = UnitLayout.from_model(model)
    summary = layout.summary()["post_norms"]
    if family in POST_NORM_FAMILIES:
        assert summary == {"mlp": "post_feedforward_layernorm", "attn": "post_attention_layernorm"}
        for kind in layout.kinds:
            for block in layout.blocks[kind]:
                assert block.post_norm.module == f"model.layers.{block.layer}.{summary[kind]}"
    else:
        # Gemma (1)'s post_attention_layernorm is the norm before the MLP: not a post norm.
        assert summary == {"mlp": None, "attn": None}
        assert all(block.post_norm is None for kind in layout.kinds for block in layout.blocks[kind])


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_post_norm_gain_and_scale_are_the_modules_own(family):
    model, _ = _gemma_with_uneven_gains(family)
    layout = UnitLayout.from_model(model)
    y = torch.randn(5, 7, model.config.hidden_size) * torch.tensor([0.01, 1.0, 30.0, 1.0, 3.0])[:, None, None]
    for kind in layout.kinds:
        post_norm = layout.block(kind, 1).post_norm
        with torch.no_grad():
            expected = model.get_submodule(post_norm.module)(y).double()
        torch.testing.assert_close(post_norm.gain(model) * y.double() * post_norm.scale(model, y), expected,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ("llama", *POST_NORM_FAMILIES))
def test_pruning_one_unit_changes_the_residual_by_its_term_only_without_a_post_norm(family):
    model, tokenizer = _gemma_with_uneven_gains(family) if family != "llama" else tiny_model(family)
    layout = UnitLayout.from_model(model)
    batch = make_batches(tokenizer, PAIRS, batch_size=len(PAIRS))[0]
    keys = [(kind, 1) for kind in layout.kinds]
    before = _capture(model, layout, batch, keys)
    for kind, layer in keys:
        block = layout.block(kind, layer)
        unit = 3
        state = {k: v.clone() for k, v in model.state_dict().items()}
        layout.zero_units_(model, kind, layer, [unit])
        after = _capture(model, layout, batch, [(kind, layer)])[(kind, layer)]
        model.load_state_dict(state)
        x, y, r = before[(kind, layer)]["x"], before[(kind, layer)]["y"], before[(kind, layer)]["r"]
        term = x[:, unit, None] * model.get_submodule(block.b_module).weight.detach().double()[:, unit]
        # At the output of B, pruning removes exactly the unit's term, with or without a post norm.
        torch.testing.assert_close(after["y"], y - term, rtol=1e-5, atol=1e-5)
        change = r - after["r"]
        if block.post_norm is None:
            torch.testing.assert_close(change, term, rtol=1e-5, atol=1e-5)
            continue
        # With one: the residual gets the norm of the new y, so the other units are rescaled too ...
        norm = model.get_submodule(block.post_norm.module)
        torch.testing.assert_close(after["r"], _gemma_norm(norm, y - term), rtol=1e-4, atol=1e-5)
        # ... and the change is not the unit's term as it enters the residual stream (gain and 1/rms).
        own = term * block.post_norm.gain(model) * block.post_norm.scale(model, y)
        assert (change - own).norm() > 0.01 * own.norm(), f"{family} {kind}: the post norm rescaled nothing"
        assert (change - own).norm() < 0.5 * own.norm(), f"{family} {kind}: the unit's own term is not the bulk"


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_pruning_a_group_keeps_the_sublayer_rms_and_pruning_all_removes_it(family):
    model, tokenizer = _gemma_with_uneven_gains(family)
    layout = UnitLayout.from_model(model)
    batch = make_batches(tokenizer, PAIRS, batch_size=len(PAIRS))[0]
    for kind in layout.kinds:
        key, block = (kind, 1), layout.block(kind, 1)
        gain = block.post_norm.gain(model)
        before = _capture(model, layout, batch, [key])[key]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        layout.zero_units_(model, kind, 1, list(range(0, block.num_units, 2)))
        half = _capture(model, layout, batch, [key])[key]
        layout.zero_units_(model, kind, 1, list(range(block.num_units)))
        none = _capture(model, layout, batch, [key])[key]
        model.load_state_dict(state)

        def rms(v):
            return v.square().mean(-1).sqrt()

        assert rms(half["y"]).mean() < 0.9 * rms(before["y"]).mean(), f"{kind}: pruning half did not shrink y"
        # y / rms(y) has rms 1 whatever remains of y: the sublayer adds as much to the residual as before.
        torch.testing.assert_close(rms(half["r"] / gain), rms(before["r"] / gain), rtol=1e-4, atol=0)
        torch.testing.assert_close(rms(before["r"] / gain), torch.ones_like(rms(before["r"])), rtol=1e-4, atol=0)
        assert not torch.allclose(half["r"], before["r"], atol=1e-3)
        assert none["r"].abs().max() == 0


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_scores_measure_each_unit_where_it_enters_the_residual_stream(family):
    model, tokenizer = _gemma_with_uneven_gains(family)
    layout = UnitLayout.from_model(model)
    batch = make_batches(tokenizer, PAIRS, batch_size=len(PAIRS))[0]
    scores, _ = score_batches(model, layout, [batch], "variance", "all", progress=False)
    keys = [(kind, layer) for kind in layout.kinds for layer in range(layout.num_layers)]
    captured = _capture(model, layout, batch, keys)
    for kind in layout.kinds:
        pruned = torch.stack([_single_unit_prune_variance(model, layout.block(kind, layer),
                                                          captured[(kind, layer)]["x"], captured[(kind, layer)]["y"])
                              for layer in range(layout.num_layers)])
        ratio = scores[kind] / pruned
        for layer in range(layout.num_layers):
            assert _spearman(scores[kind][layer], pruned[layer]) > 0.9, (kind, layer)
            # One scale in every layer: without the post norm's gain and 1/rms this ratio is 0.07-0.3 here.
            assert 0.9 < float(ratio[layer].median()) < 1.1, (kind, layer, float(ratio[layer].median()))
        assert _spearman(scores[kind].reshape(-1), pruned.reshape(-1)) > 0.95, kind


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA3.is_file(), reason=f"{GEMMA3} is absent (bash ../shared/models/gemma-3-270m.sh "
                    "assembles it)")
def test_real_gemma3_scores_match_single_unit_pruning_in_every_layer():
    """Gemma 3 270M's post-norm gains reach the hundreds in late layers and vary per channel: Eq. 1 at the
    input of B would be off by up to ten orders of magnitude between layers; measured at the residual
    stream it matches the effect of pruning each unit alone."""
    from ssah.models.loading import load_model

    loaded = load_model(str(GEMMA3), device="cpu")
    model, layout = loaded.model, loaded.layout
    assert model.config.model_type == "gemma3_text" and layout.num_layers == 18
    assert model.config.vocab_size > 260_000
    batch = make_batches(loaded.tokenizer, PAIRS, batch_size=len(PAIRS))[0]
    scores, _ = score_batches(model, layout, [batch], "variance", "all", progress=False)
    layers = (0, 8, 17)
    keys = [(kind, layer) for kind in layout.kinds for layer in layers]
    captured = _capture(model, layout, batch, keys)
    gains = {key: layout.block(*key).post_norm.gain(model) for key in keys}
    assert max(float(g.mean()) for g in gains.values()) > 100 * min(float(g.mean()) for g in gains.values())
    for kind, layer in keys:
        block = layout.block(kind, layer)
        pruned = _single_unit_prune_variance(model, block, captured[(kind, layer)]["x"], captured[(kind, layer)]["y"])
        got = scores[kind][layer]
        assert _spearman(got, pruned) > 0.9, (kind, layer)
        assert 0.85 < float((got / pruned).median()) < 1.15, (kind, layer, float((got / pruned).median()))


@pytest.mark.parametrize("family", ("llama", "gemma3"))
def test_units_command_names_the_post_norms(capsys, family):
    from tests.helpers import run_cli

    result = run_cli(capsys, "units", "--model", f"tiny:{family}")
    assert result.code == 0, result
    lines = [line for line in result.out.splitlines() if line.startswith("post norms")]
    if family == "llama":
        assert lines == []
    else:
        assert len(lines) == 1
        assert "mlp: post_feedforward_layernorm" in lines[0] and "attn: post_attention_layernorm" in lines[0]


@pytest.mark.parametrize("family, post_norms", [("gemma3", True), ("llama", False)])
def test_scores_saved_before_post_norm_scoring_are_not_reused(tmp_path, family, post_norms):
    """A Gemma score folder written before scores were read after the post norm (its manifest has no
    `post_norms`) is redone inside a run; other families' identities are unchanged."""
    import json

    from ssah.data import Dataset, Record
    from ssah.models.loading import load_model
    from ssah.units.scores import score_dataset

    loaded = load_model(f"tiny:{family}")
    data = Dataset("d", [Record(id=f"r{i}", prompt=f"Tell me about rivers {i}.", response="Rivers flow.")
                         for i in range(3)])
    first = score_dataset(loaded, data, out=tmp_path, progress=False)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert ("post_norms" in manifest) is post_norms and ("post_norms" in manifest["identity"]) is post_norms
    assert score_dataset(loaded, data, out=tmp_path, progress=False).reused
    manifest.pop("post_norms", None)
    manifest["identity"].pop("post_norms", None)
    manifest_path.write_text(json.dumps(manifest))
    again = score_dataset(loaded, data, out=tmp_path, progress=False, replace=True)
    assert again.reused is not post_norms
    assert torch.equal(again.values["mlp"], first.values["mlp"])  # the same scores, recomputed or read
