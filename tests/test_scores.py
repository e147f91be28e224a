"""Unit scores equal brute-force computations, do not depend on batching, and save/load cleanly."""

import json

import numpy as np
import pytest
import torch

from ssah.data.records import Dataset, Record
from ssah.errors import SsahError
from ssah.models.loading import load_model
from ssah.models.tiny import tiny_model
from ssah.units.layout import UnitLayout
from ssah.units.scorers import SCORERS, register_scorer
from ssah.units.scores import Scores, compute_scores, make_batches, scope_mask, score_batches, score_dataset
from tests.helpers import assert_one_line_error, run_cli

PAIRS = [
    ("How do units carry safety?", "Through a few neurons that pick the refusal."),
    ("Name a colour.", "Blue."),
    ("Write one long sentence about attention heads and the channels they feed.",
     "Heads mix tokens; channels carry it."),
    ("Hi", "Hello! How can I help you today?"),
    ("What is two plus three?", "Five."),
]
ACTIVATION_SCORERS = ("variance", "wanda", "activation")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _activations(model, layout, batches, scope):
    """Every B input activation of the tokens in scope, per (kind, layer), as float64 NumPy [N, C].

    Where a post norm (Gemma 2 and 3) follows B, each token's activations are divided by the rms of
    B's output that token, as the norm divides the unit's output before the residual add."""
    store = {(kind, block.layer): [] for kind in layout.kinds for block in layout.blocks[kind]}
    handles, current = [], {}
    for kind in layout.kinds:
        for block in layout.blocks[kind]:
            def hook(module, args, output, key=(kind, block.layer), post_norm=block.post_norm):
                x = args[0].double()
                if post_norm is not None:
                    eps = model.get_submodule(post_norm.module).eps
                    x = x / (output.double().square().mean(-1, keepdim=True) + eps).sqrt()
                store[key].append(x.reshape(-1, x.shape[-1])[current["mask"]].numpy())
            handles.append(model.get_submodule(block.b_module).register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            current["mask"] = scope_mask(batch, scope).reshape(-1)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return {key: np.concatenate(parts) for key, parts in store.items()}


def _brute_force(model, layout, acts, scorer):
    """Scores from stored activations: NumPy statistics times squared column norms, summed per unit."""
    out = {}
    for kind in layout.kinds:
        rows = []
        for block in layout.blocks[kind]:
            x = acts[(kind, block.layer)]
            weight = model.get_submodule(block.b_module).weight.detach().double().numpy()
            if block.post_norm is not None:  # Gemma's RMSNorm multiplies output channel i by 1 + w_i
                gain = 1 + model.get_submodule(block.post_norm.module).weight.detach().double().numpy()
                weight = weight * gain[:, None]
            col_sq = (weight ** 2).sum(axis=1 - block.b_in_dim)
            per_channel = {
                "variance": np.var(x, axis=0, ddof=1) * col_sq,
                "wanda": np.linalg.norm(x, axis=0) * np.sqrt(col_sq),
                "activation": np.abs(x).mean(axis=0),
            }[scorer]
            rows.append(per_channel[block.b_channels.numpy()].sum(axis=-1))
        out[kind] = torch.from_numpy(np.stack(rows))
    return out


def _assert_rel(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for kind in want:
        assert got[kind].dtype == torch.float64
        scale = float(want[kind].abs().max())
        torch.testing.assert_close(got[kind], want[kind].to(torch.float64), rtol=rel, atol=rel * scale)


def test_activation_scorers_match_brute_force(tiny):
    model, tokenizer = tiny
    layout = UnitLayout.from_model(model)
    batches = make_batches(tokenizer, PAIRS, batch_size=2)
    for scope in ("all", "prompt", "response"):
        acts = _activations(model, layout, batches, scope)
        for scorer in ACTIVATION_SCORERS:
            got, tokens = score_batches(model, layout, batches, scorer, scope, progress=False)
            _assert_rel(got, _brute_force(model, layout, acts, scorer), 1e-6)
            assert tokens == sum(int(scope_mask(b, scope).sum()) for b in batches)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_units_sum_their_channels(family):
    model, tokenizer = tiny_model(family)
    batches = make_batches(tokenizer, PAIRS, batch_size=3)
    channel, _ = score_batches(model, UnitLayout.from_model(model), batches, progress=False)
    head_layout = UnitLayout.from_model(model, attn_unit="head")
    head, _ = score_batches(model, head_layout, batches, progress=False)
    heads = head_layout.units_per_layer["attn"]
    torch.testing.assert_close(head["attn"], channel["attn"].reshape(channel["attn"].shape[0], heads, -1).sum(-1))
    torch.testing.assert_close(head["mlp"], channel["mlp"])


def _snip_brute_force(model, layout, batches, scope):
    """Per-weight |W * dL/dW| with every gradient kept, summed by hand over each unit's owned slices."""
    params = dict(model.named_parameters())
    out = {kind: torch.zeros(layout.num_layers, layout.units_per_layer[kind], dtype=torch.float64)
           for kind in layout.kinds}
    tokens = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        target = scope_mask(batch, scope)[:, 1:]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = -torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        nll[target].sum().backward()
        tokens += int(target.sum())
        for kind in layout.kinds:
            for block in layout.blocks[kind]:
                for unit in range(block.num_units):
                    for owned in block.owned:
                        weight = params[owned.param].detach().double()
                        grad = params[owned.param].grad.double()
                        idx = owned.index[unit]
                        out[kind][block.layer, unit] += (weight.index_select(owned.dim, idx)
                                                         * grad.index_select(owned.dim, idx)).abs().sum()
    model.zero_grad(set_to_none=True)
    return {kind: value / tokens for kind, value in out.items()}


@pytest.mark.parametrize("attn_unit", ["channel", "head"])
def test_snip_matches_per_weight_autograd(family, attn_unit):
    model, tokenizer = tiny_model(family)
    layout = UnitLayout.from_model(model, attn_unit=attn_unit)
    batches = make_batches(tokenizer, PAIRS, batch_size=3)
    got, _ = score_batches(model, layout, batches, "snip", "response", progress=False)
    _assert_rel(got, _snip_brute_force(model, layout, batches, "response"), 1e-5)
    # Gradients were freed and requires_grad restored.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def _pad_extra(batch, pad_id, extra=5):
    """The same batch with `extra` more padding columns on the right."""
    out = {}
    for key, value in batch.items():
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.cat([value, torch.full((value.shape[0], extra), fill, dtype=value.dtype)], dim=1)
    return out


def test_batch_size_and_padding_do_not_change_scores(family):
    # float64 weights: float32 matmuls differ in their last bits between batch shapes (BLAS blocking),
    # which would hide what is tested here: the statistics merge exactly whatever the batching.
    model, tokenizer = tiny_model(family)
    model = model.double()
    layout = UnitLayout.from_model(model)
    pairs = PAIRS * 2
    reference, _ = score_batches(model, layout, make_batches(tokenizer, pairs, batch_size=8), progress=False)
    for batch_size in (1, 3):
        got, _ = score_batches(model, layout, make_batches(tokenizer, pairs, batch_size=batch_size), progress=False)
        _assert_rel(got, reference, 1e-9)
    padded = [_pad_extra(b, tokenizer.pad_token_id) for b in make_batches(tokenizer, pairs, batch_size=3)]
    got, _ = score_batches(model, layout, padded, progress=False)
    _assert_rel(got, reference, 1e-9)


def test_float32_batching_agrees_and_rerun_is_bitwise():
    model, tokenizer = tiny_model("qwen2")
    layout = UnitLayout.from_model(model)
    first = compute_scores(model, tokenizer, layout, PAIRS, batch_size=2, progress=False)
    again = compute_scores(model, tokenizer, layout, PAIRS, batch_size=2, progress=False)
    assert all(torch.equal(first[k], again[k]) for k in first)
    _assert_rel(compute_scores(model, tokenizer, layout, PAIRS, batch_size=5, progress=False), first, 1e-4)
    snip_a = compute_scores(model, tokenizer, layout, PAIRS, scorer="snip", batch_size=2, progress=False)
    snip_b = compute_scores(model, tokenizer, layout, PAIRS, scorer="snip", batch_size=2, progress=False)
    assert all(torch.equal(snip_a[k], snip_b[k]) for k in snip_a)


def test_token_scopes_differ():
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    by_scope = {scope: compute_scores(model, tokenizer, layout, PAIRS, token_scope=scope, progress=False)
                for scope in ("all", "prompt", "response")}
    for a, b in (("all", "prompt"), ("all", "response"), ("prompt", "response")):
        assert not torch.allclose(by_scope[a]["mlp"], by_scope[b]["mlp"])
    assert all(torch.equal(compute_scores(model, tokenizer, layout, PAIRS, progress=False)[k], by_scope["all"][k])
               for k in by_scope["all"])
    # snip's default scope is the response: its loss is the reply's NLL.
    snip_default = compute_scores(model, tokenizer, layout, PAIRS, scorer="snip", progress=False)
    snip_response = compute_scores(model, tokenizer, layout, PAIRS, scorer="snip", token_scope="response",
                                   progress=False)
    assert all(torch.equal(snip_default[k], snip_response[k]) for k in snip_default)


def test_bf16_model_scores_are_finite_float64_and_close_to_fp32():
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    fp32 = compute_scores(model, tokenizer, layout, PAIRS, progress=False)
    half = compute_scores(model.to(torch.bfloat16), tokenizer, layout, PAIRS, progress=False)
    half_snip = compute_scores(model, tokenizer, layout, PAIRS, scorer="snip", progress=False)
    for kind in fp32:
        assert half[kind].dtype == torch.float64 and torch.isfinite(half[kind]).all()
        assert torch.isfinite(half_snip[kind]).all()
        corr = torch.corrcoef(torch.stack([fp32[kind].flatten(), half[kind].flatten()]))[0, 1]
        assert corr > 0.98, (kind, corr)


def test_non_finite_scores_name_layer_and_kind():
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[0, 0] = float("inf")
    with pytest.raises(SsahError, match="mlp units of layer 1 are not finite"):
        compute_scores(model, tokenizer, layout, PAIRS, progress=False)


def test_empty_data_and_empty_scope_are_clear_errors():
    model, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(model)
    with pytest.raises(SsahError, match="calibration set is empty"):
        compute_scores(model, tokenizer, layout, [], progress=False)
    with pytest.raises(SsahError, match="no tokens in token scope 'response'"):
        compute_scores(model, tokenizer, layout, [p for p, _ in PAIRS], token_scope="response", progress=False)
    with pytest.raises(SsahError, match="unknown scorer 'nope'; known scorers: activation, snip, variance, wanda"):
        compute_scores(model, tokenizer, layout, PAIRS, scorer="nope", progress=False)


def test_a_registered_scorer_is_usable_in_a_few_lines():
    @register_scorer("rms_test", description="root mean square of X_j")
    def rms(stats, col_sq_norms):
        return (stats.sq_sum() / stats.count).sqrt()

    try:
        model, tokenizer = tiny_model("llama")
        layout = UnitLayout.from_model(model)
        got = compute_scores(model, tokenizer, layout, PAIRS, scorer="rms_test", progress=False)
        batches = make_batches(tokenizer, PAIRS)
        acts = _activations(model, layout, batches, "all")
        want = np.sqrt((acts[("mlp", 0)] ** 2).mean(axis=0))
        np.testing.assert_allclose(got["mlp"][0].numpy(), want, rtol=1e-6)
    finally:
        del SCORERS["rms_test"]


# -- score_dataset, the artifact and the CLI --------------------------------------------------------

def _dataset(name="toy", pairs=PAIRS):
    return Dataset(name, [Record(id=f"{name}/{i}", prompt=p, response=r) for i, (p, r) in enumerate(pairs)])


def test_save_load_roundtrip_and_reuse(tmp_path):
    loaded = load_model("tiny:llama", device="cpu")
    scores = score_dataset(loaded, _dataset(), out=tmp_path / "S", progress=False)
    manifest = json.loads((tmp_path / "S" / "manifest.json").read_text())
    for key in ("scorer", "token_scope", "responses", "dataset_name", "dataset_fingerprint", "tokens_seen",
                "model_fingerprint", "ssah_version", "seed", "attn_unit"):
        assert key in manifest, key
    loaded_back = Scores.load(tmp_path / "S")
    assert loaded_back.model_fingerprint == loaded.fingerprint
    assert list(loaded_back.values) == ["mlp", "attn"]
    assert all(torch.equal(loaded_back.values[k], scores.values[k]) for k in scores.values)
    again = score_dataset(loaded, _dataset(), out=tmp_path / "S", batch_size=3, progress=False)
    assert again.reused  # batch size does not change activation scores, so the run is the same
    with pytest.raises(SsahError, match="already holds scores made differently .*scorer"):
        score_dataset(loaded, _dataset(), scorer="wanda", out=tmp_path / "S", progress=False)
    assert not score_dataset(loaded, _dataset(), scorer="wanda", out=tmp_path / "S", force=True,
                             progress=False).reused


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(SsahError, match="no scores folder"):
        Scores.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SsahError, match="manifest.json is missing"):
        Scores.load(tmp_path / "empty")
    loaded = load_model("tiny:gpt2", device="cpu")
    score_dataset(loaded, _dataset(), out=tmp_path / "S", progress=False)
    (tmp_path / "S" / "scores.safetensors").write_bytes(b"garbage")
    with pytest.raises(SsahError, match="scores.safetensors is damaged"):
        Scores.load(tmp_path / "S")
    (tmp_path / "S" / "manifest.json").write_text("{not json")
    with pytest.raises(SsahError, match="is damaged"):
        Scores.load(tmp_path / "S")


def test_self_replies_are_generated_once_and_cached(tmp_path, monkeypatch):
    import ssah.evaluate.generation as generation

    loaded = load_model("tiny:llama", device="cpu")
    calls = []
    real = generation.continuous_generate

    def counting(model, encoded, **kwargs):
        calls.append(len(encoded))
        return real(model, encoded, **kwargs)

    monkeypatch.setattr(generation, "continuous_generate", counting)
    data = _dataset(pairs=[(p, None) for p, _ in PAIRS[:3]])
    first = score_dataset(loaded, data, responses="self", max_new_tokens=4, out=tmp_path / "S", progress=False)
    assert calls == [3] and first.manifest["responses"] == "self"
    rows = [json.loads(line) for line in (tmp_path / "S" / "replies.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["tokens"]) <= 4 for r in rows)
    score_dataset(loaded, data, responses="self", max_new_tokens=4, out=tmp_path / "S", force=True, progress=False)
    assert calls == [3]  # replies came from the cache


def test_dataset_without_responses_needs_a_source():
    loaded = load_model("tiny:llama", device="cpu")
    data = _dataset(pairs=[(p, None) for p, _ in PAIRS])
    with pytest.raises(SsahError, match="without a response; use --responses refusals or self"):
        score_dataset(loaded, data, progress=False)
    assert score_dataset(loaded, data, token_scope="prompt", progress=False).manifest["tokens_seen"] > 0


def _write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "response": r}) + "\n"
                            for i, (p, r) in enumerate(pairs)))
    return path


def test_cli_score_writes_reuses_and_refuses(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = str(tmp_path / "S")
    args = ("score", "--model", "tiny:llama", "--data", f"jsonl:{data}", "--out", out)
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    assert "scored 5 records" in first.out
    second = run_cli(capsys, *args)
    assert second.code == 0 and "reused" in second.out
    other = run_cli(capsys, *args[:-4], "--data", f"jsonl:{data}", "--limit", "2", "--out", out)
    assert_one_line_error(other, "already holds scores made differently", "--force")
    forced = run_cli(capsys, *args[:-4], "--data", f"jsonl:{data}", "--limit", "2", "--out", out, "--force")
    assert forced.code == 0 and "scored 2 records" in forced.out
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    foreign = run_cli(capsys, *args[:-2], "--out", str(tmp_path / "notes"))
    assert_one_line_error(foreign, "holds files ssah did not write", "todo.txt")


def test_cli_score_errors_are_one_line(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", PAIRS)
    (tmp_path / "empty.jsonl").write_text("")
    base = ("score", "--model", "tiny:llama", "--out", str(tmp_path / "S"))
    assert_one_line_error(run_cli(capsys, *base, "--data", f"jsonl:{data}", "--scorer", "bogus"),
                          "unknown scorer 'bogus'", "variance", "snip", "wanda", "activation")
    empty = run_cli(capsys, *base, "--data", f"jsonl:{tmp_path / 'empty.jsonl'}")
    assert_one_line_error(empty, "empty")


def test_refusal_pairing_is_deterministic_by_seed():
    from ssah.data import load_dataset
    from ssah.units.scores import calibration_pairs

    data = _dataset(pairs=[(f"harmful request {i}", None) for i in range(12)])
    refusals = set(load_dataset("refusals").prompts())
    first = calibration_pairs(None, data, responses="refusals", seed=0)
    assert first == calibration_pairs(None, data, responses="refusals", seed=0)
    assert first != calibration_pairs(None, data, responses="refusals", seed=1)
    assert [p for p, _ in first] == data.prompts() and all(r in refusals for _, r in first)
