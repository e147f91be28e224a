"""The unit layout is right: zeroing a unit's owned slices equals zeroing its activation at B."""

import pytest
import torch

from ssah.errors import SsahError
from ssah.models.tiny import tiny_model
from ssah.units.layout import UnitLayout


def _ids(tokenizer):
    text = ["Tell me how units carry safety.", "A second, longer prompt about neurons and heads."]
    return tokenizer(text, return_tensors="pt", padding=True)


def _zero_input_hook(channels):
    def hook(module, args):
        x = args[0].clone()
        x[..., channels] = 0
        return (x,) + args[1:]

    return hook


@pytest.mark.parametrize("attn_unit", ["channel", "head"])
def test_zeroing_owned_slices_equals_zeroing_activation(tiny, attn_unit):
    model, tokenizer = tiny
    layout = UnitLayout.from_model(model, attn_unit=attn_unit)
    batch = _ids(tokenizer)
    gen = torch.Generator().manual_seed(0)
    for kind in layout.kinds:
        for layer in (0, layout.num_layers - 1):
            block = layout.block(kind, layer)
            units = torch.randperm(block.num_units, generator=gen)[: max(1, block.num_units // 4)]
            channels = block.b_channels[units].reshape(-1)

            handle = model.get_submodule(block.b_module).register_forward_pre_hook(_zero_input_hook(channels))
            with torch.no_grad():
                hooked = model(**batch).logits
            handle.remove()

            state = {k: v.clone() for k, v in model.state_dict().items()}
            layout.zero_units_(model, kind, layer, units)
            with torch.no_grad():
                zeroed = model(**batch).logits
            model.load_state_dict(state)

            with torch.no_grad():
                original = model(**batch).logits
            assert not torch.allclose(original, zeroed, atol=1e-4), f"{kind} L{layer}: zeroing changed nothing"
            torch.testing.assert_close(zeroed, hooked, atol=1e-5, rtol=0)


def test_unit_counts(tiny):
    model, _ = tiny
    cfg = model.config
    layout = UnitLayout.from_model(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter = getattr(cfg, "intermediate_size", None) or cfg.n_inner
    assert layout.num_units("mlp") == cfg.num_hidden_layers * inter
    assert layout.num_units("attn") == cfg.num_hidden_layers * heads * head_dim
    assert layout.total_units == layout.num_units("mlp") + layout.num_units("attn")
    head_layout = UnitLayout.from_model(model, attn_unit="head")
    assert head_layout.num_units("attn") == cfg.num_hidden_layers * heads


def test_owned_slices_are_disjoint_across_units(tiny):
    """No parameter entry belongs to two units: prune/freeze of one unit never touches another."""
    model, _ = tiny
    for attn_unit in ("channel", "head"):
        layout = UnitLayout.from_model(model, attn_unit=attn_unit)
        for kind in layout.kinds:
            for block in layout.blocks[kind]:
                seen: dict[tuple[str, int], set] = {}
                for owned in block.owned:
                    positions = owned.index.reshape(-1).tolist()
                    key = (owned.param, owned.dim)
                    assert not (seen.setdefault(key, set()) & set(positions))
                    assert len(set(positions)) == len(positions)
                    seen[key] |= set(positions)


def test_value_rows_owned_only_without_gqa():
    for family, expect_v in (("llama", False), ("gpt_neox", True), ("gpt2", True)):
        model, _ = tiny_model(family)
        block = UnitLayout.from_model(model).block("attn", 0)
        assert (len(block.owned) > 1) == expect_v, family


def test_unsupported_model_type_lists_supported():
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                               num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(SsahError, match="unsupported model type 'opt'.*llama.*add one"):
        UnitLayout.from_model(model)
