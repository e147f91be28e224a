"""Structured pruning: reversible == permanent == saved and reloaded; the model comes back intact."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ssah.errors import SsahError
from ssah.interventions.masks import random_mask
from ssah.interventions.prune import prune_, pruned
from ssah.models.fingerprint import model_fingerprint
from ssah.models.tiny import tiny_model
from ssah.units.layout import UnitLayout


def test_reversible_equals_permanent_equals_reloaded(family, tmp_path):
    model, tokenizer = tiny_model(family)
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.2, fingerprint=model_fingerprint(model))
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
        with pruned(model, layout, random_mask(layout, 0.5, fingerprint=model_fingerprint(model))):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mask_of_another_model_is_refused():
    model, _ = tiny_model("llama")
    other, _ = tiny_model("llama", seed=1)
    layout = UnitLayout.from_model(model)
    mask = random_mask(layout, 0.1, fingerprint=model_fingerprint(other))
    with pytest.raises(SsahError, match="was made for model"):
        prune_(model, layout, mask)
    wrong_shape = random_mask(UnitLayout.from_model(tiny_model("gemma")[0]), 0.1)
    with pytest.raises(SsahError, match="units but the model has"):
        prune_(model, layout, wrong_shape)


@pytest.fixture
def tiny_groups(tmp_path):
    """Groups of tiny:llama from real scores (harmful prompts + refusals vs benign answers)."""
    from ssah.data import load_dataset
    from ssah.models.loading import load_model
    from ssah.units.groups import make_groups
    from ssah.units.scores import score_dataset

    loaded = load_model("tiny:llama", device="cpu")
    safety = score_dataset(loaded, load_dataset("harmful:calibration").take(6), responses="refusals",
                           batch_size=3, max_length=256, progress=False)
    utility = score_dataset(loaded, load_dataset("benign:calibration").take(6), batch_size=3, max_length=256,
                            progress=False)
    make_groups(safety, utility, {"scu": 0.05, "ucu": 0.1, "ru": 0.2}).save(tmp_path / "groups")
    return tmp_path / "groups"


def test_prune_cli_saves_a_model_equal_to_the_reversible_prune(capsys, tmp_path, tiny_groups):
    from ssah.interventions.masks import load_mask
    from ssah.models.loading import load_model
    from tests.helpers import assert_one_line_error, run_cli

    result = run_cli(capsys, "prune", "--model", "tiny:llama", "--groups", str(tiny_groups), "--mask", "SCU+UCU",
                     "--out", str(tmp_path / "pruned"))
    assert result.code == 0, result.err
    loaded = load_model("tiny:llama", device="cpu")
    mask = load_mask(str(tiny_groups), "SCU+UCU")
    ids = loaded.tokenizer(["check the saved model"], return_tensors="pt")
    with torch.no_grad(), pruned(loaded.model, loaded.layout, mask):
        expected = loaded.model(**ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, expected, atol=1e-6, rtol=0)
    # Bad input: an unknown group, a malformed option value, a mask of another model, an out folder
    # holding another model.
    assert_one_line_error(run_cli(capsys, "prune", "--model", "tiny:llama", "--groups", str(tiny_groups),
                                  "--mask", "XYZ", "--out", str(tmp_path / "p2")), "unknown mask term")
    for bad, message in (("random:like=SCU,seed=x", "must be an integer"), ("SCU:top=lots", "must be a number"),
                         ("random:frac=half", "must be a number")):
        assert_one_line_error(run_cli(capsys, "prune", "--model", "tiny:llama", "--groups", str(tiny_groups),
                                      "--mask", bad, "--out", str(tmp_path / "p2")), message)
    assert_one_line_error(run_cli(capsys, "prune", "--model", "tiny:qwen2", "--groups", str(tiny_groups),
                                  "--mask", "SCU", "--out", str(tmp_path / "p3")), "was made for model")
    assert_one_line_error(run_cli(capsys, "prune", "--model", "tiny:llama", "--groups", str(tiny_groups),
                                  "--mask", "RU", "--out", str(tmp_path / "pruned")),
                          "already holds a pruned model made differently")


def test_eval_with_prune_records_the_mask(capsys, tmp_path, tiny_groups):
    import json

    from tests.helpers import run_cli

    common = ["--model", "tiny:llama", "--suite", "safety,refusal_score", "--limit", "3", "--max-new-tokens", "3",
              "--system-prompt", "none", "--rules", "prefix"]
    assert run_cli(capsys, "eval", *common, "--out", str(tmp_path / "plain")).code == 0
    result = run_cli(capsys, "eval", *common, "--prune", f"{tiny_groups}:SCU+UCU", "--out", str(tmp_path / "p"))
    assert result.code == 0, result.err
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())
    pruned_report = json.loads((tmp_path / "p" / "eval.json").read_text())
    assert pruned_report["pruned"]["mask"] == "SCU+UCU" and pruned_report["pruned"]["units"] > 0
    assert pruned_report["model"]["key"] != plain["model"]["key"]
    assert pruned_report["refusal_score"] != plain["refusal_score"]


def test_align_and_finetune_cli(capsys, tmp_path, tiny_groups):
    import json

    from tests.helpers import assert_one_line_error, run_cli

    common = ["--model", "tiny:llama", "--max-steps", "2", "--batch-size", "4", "--limit", "8", "--lr", "1e-3"]
    result = run_cli(capsys, "align", *common, "--budget", f"{tiny_groups}:RU", "--out", str(tmp_path / "a"))
    assert result.code == 0, result.err
    record = json.loads((tmp_path / "a" / "train.json").read_text())
    assert record["result"]["check"]["max_abs_change_frozen"] == 0.0 and record["result"]["steps"] == 2
    result = run_cli(capsys, "finetune", *common, "--data", "benign:train",
                     "--freeze", f"{tiny_groups}:SCU+CU:top=0.06", "--out", str(tmp_path / "f"))
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "f" / "train.json").read_text())["result"]["steps"] == 4  # frozen runs: x2
    assert (tmp_path / "f" / "loss.png").is_file()
    share = json.loads((tmp_path / "f" / "train.json").read_text())["trainable_share"]
    assert 0 < share < 1 and f"{100 * share:.1f}% of entries trainable" in result.out
    result = run_cli(capsys, "finetune", *common, "--data", "benign:train", "--lora", "--out", str(tmp_path / "l"))
    assert result.code == 0, result.err
    assert_one_line_error(run_cli(capsys, "align", *common, "--budget", f"{tiny_groups}:random:frac=0",
                                  "--out", str(tmp_path / "e")), "nothing to train")
    assert_one_line_error(run_cli(capsys, "finetune", *common, "--data", "benign:train", "--freeze",
                                  f"{tiny_groups}:NOPE", "--out", str(tmp_path / "g")), "unknown mask term")


def test_recovery_examples_cut_compliant_replies_and_train(capsys, tmp_path, tiny_groups):
    import json

    from ssah.data import load_dataset
    from ssah.models.tiny import tiny_tokenizer
    from ssah.train.data import recovery_examples
    from tests.helpers import assert_one_line_error, run_cli

    tok = tiny_tokenizer()
    refusals = load_dataset("refusals")
    replies = ["Sure, here is how you do it step by step", "I'm sorry, I can't help with that.", "Ok"]
    examples = recovery_examples(tok, ["p0", "p1", "p2"], replies, refusals, lengths=(4, 6, 3))
    # p1 opens with a refusal and p2 is shorter than its k: only p0 remains, cut to its first 4 tokens
    assert [(p, prefill) for p, _, prefill in examples] == [("p0", tok.decode(tok(replies[0])["input_ids"][:4]))]
    assert examples[0][1] in {r.prompt for r in refusals}

    common = ["--model", "tiny:llama", "--max-steps", "2", "--batch-size", "4", "--limit", "8", "--lr", "1e-3"]
    result = run_cli(capsys, "align", *common, "--budget", f"{tiny_groups}:RU", "--recovery", "2,4",
                     "--out", str(tmp_path / "r"))
    assert result.code == 0, result.err
    assert "recovery examples" in result.out
    record = json.loads((tmp_path / "r" / "train.json").read_text())
    assert record["identity"]["recovery"] == [2, 4] and record["result"]["check"]["max_abs_change_frozen"] == 0.0
    assert_one_line_error(run_cli(capsys, "align", *common, "--budget", f"{tiny_groups}:RU", "--recovery", "0,x",
                                  "--out", str(tmp_path / "r2")), "--recovery takes")


def test_align_cli_trains_on_borderline_answers_with_refusal_openings_avoided(capsys, tmp_path, tiny_groups):
    import json

    from tests.helpers import assert_one_line_error, run_cli

    common = ["--model", "tiny:llama", "--max-steps", "2", "--batch-size", "4", "--limit", "8", "--lr", "1e-3",
              "--budget", f"{tiny_groups}:RU"]
    result = run_cli(capsys, "align", *common, "--borderline", "sensitive_safe:train", "--borderline-tokens", "4",
                     "--avoid-refusals", "1", "--out", str(tmp_path / "b"))
    assert result.code == 0, result.err
    assert "8 borderline prompts answered by the model itself" in result.out
    record = json.loads((tmp_path / "b" / "train.json").read_text())
    assert record["identity"]["borderline"] and record["identity"]["config"]["avoid_weight"] == 1.0
    assert record["result"]["check"]["max_abs_change_frozen"] == 0.0
    assert_one_line_error(run_cli(capsys, "align", *common, "--avoid-refusals", "1", "--out", str(tmp_path / "c")),
                          "--avoid-refusals needs --borderline")
    assert_one_line_error(run_cli(capsys, "align", *common, "--borderline", "sensitive_safe:train",
                                  "--avoid-refusals", "-2", "--out", str(tmp_path / "d")), "must be >= 0")
