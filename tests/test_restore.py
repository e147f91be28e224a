"""Restoring aligned weights into an attacked model: exact, reversible, a partition of every parameter
entry, and the share of the ASR rise each part takes back (library and `ssah restore`)."""

from __future__ import annotations

import json

import pytest
import torch

from ssah.errors import SsahError
from ssah.interventions.masks import layout_mask
from ssah.interventions.restore import NON_UNIT_PARTS, part_selection, restored, selection_entries
from ssah.models.fingerprint import model_fingerprint
from ssah.models.tiny import tiny_model
from ssah.units.groups import FORMAT as GROUPS_FORMAT
from ssah.units.groups import Groups
from ssah.units.layout import UnitLayout
from tests.helpers import CliResult, assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUP_NAMES = ("SCU", "UCU", "CU", "RU")
EVERY_PART = "+".join((*GROUP_NAMES, *NON_UNIT_PARTS))


def _random_groups(layout: UnitLayout, fingerprint: str, seed: int = 0) -> Groups:
    """Groups with every unit labelled at random (seeded): a stand-in for scored groups."""
    generator = torch.Generator().manual_seed(seed)
    labels = {k: torch.randint(0, 4, (layout.num_layers, layout.units_per_layer[k]), generator=generator,
                               dtype=torch.int8) for k in layout.kinds}
    scores = {k: torch.rand(v.shape, generator=generator, dtype=torch.float64) for k, v in labels.items()}
    meta = {"format": GROUPS_FORMAT, "model_fingerprint": fingerprint, "units_per_layer": layout.units_per_layer}
    groups = Groups(labels, scores, {k: v.clone() for k, v in scores.items()}, meta)
    meta["counts"] = groups.counts()
    return groups


def _pair(family: str):
    """(aligned, attacked, layout, groups): two versions of one tiny model, every entry differing."""
    aligned, tokenizer = tiny_model(family)
    attacked, _ = tiny_model(family)
    with torch.no_grad():
        for param in attacked.parameters():
            param.add_(torch.randn_like(param) * 0.05 + 0.01)
    layout = UnitLayout.from_model(attacked)
    return aligned, attacked, tokenizer, layout, _random_groups(layout, model_fingerprint(aligned))


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["restore the aligned weights", "and check"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def test_restoring_every_part_gives_the_aligned_model_and_exits_bit_identical(family):
    aligned, attacked, tokenizer, layout, groups = _pair(family)
    before = {k: v.clone() for k, v in attacked.state_dict().items()}
    attacked_logits = _logits(attacked, tokenizer)
    with restored(attacked, layout, aligned, EVERY_PART, groups):
        torch.testing.assert_close(_logits(attacked, tokenizer), _logits(aligned, tokenizer), atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in attacked.state_dict().items())
    torch.testing.assert_close(_logits(attacked, tokenizer), attacked_logits, atol=0, rtol=0)
    with restored(attacked, layout, aligned, layout_mask(layout, False, "none")):
        torch.testing.assert_close(_logits(attacked, tokenizer), attacked_logits, atol=0, rtol=0)


def test_the_parts_and_the_unit_groups_partition_every_entry(family):
    aligned, attacked, _, layout, groups = _pair(family)
    total = sum(p.numel() for p in attacked.parameters())
    covered = {name: torch.zeros_like(p, dtype=torch.int32) for name, p in attacked.named_parameters()}
    for part in (*GROUP_NAMES, *NON_UNIT_PARTS):
        for name, picked in part_selection(attacked, layout, part, groups).items():
            if picked is None:
                covered[name] += 1
            else:
                dim, positions = picked
                covered[name].index_add_(dim, positions, torch.ones_like(covered[name].index_select(dim, positions)))
    assert all(bool((c == 1).all()) for c in covered.values()), "an entry restored twice or missed"
    assert selection_entries(part_selection(attacked, layout, EVERY_PART, groups), layout) == total


@pytest.mark.parametrize("part", ["SCU", "CU+RU", "embeddings", "norms", "qk", "SCU+embeddings", "UCU+qk+norms"])
def test_a_part_restores_exactly_its_own_entries(part):
    aligned, attacked, tokenizer, layout, groups = _pair("qwen2")
    selection = part_selection(attacked, layout, part, groups)
    assert selection_entries(selection, layout) > 0
    mine = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in attacked.named_parameters()}
    for name, picked in selection.items():
        if picked is None:
            mine[name][...] = True
        else:
            mine[name].index_fill_(picked[0], picked[1], True)
    attacked_params = {n: p.detach().clone() for n, p in attacked.named_parameters()}
    aligned_params = dict(aligned.named_parameters())
    with restored(attacked, layout, aligned, part, groups):
        for name, now in attacked.named_parameters():
            assert torch.equal(now[mine[name]], aligned_params[name][mine[name]]), name
            assert torch.equal(now[~mine[name]], attacked_params[name][~mine[name]]), name
    assert all(torch.equal(attacked_params[n], p) for n, p in attacked.named_parameters())


def test_the_key_names_what_is_restored_and_errors_are_one_sentence():
    aligned, attacked, _, layout, groups = _pair("llama")
    scu = restored(attacked, layout, aligned, "SCU", groups)
    assert scu.key == restored(attacked, layout, aligned, "scu", groups).key
    assert scu.key != restored(attacked, layout, aligned, "CU", groups).key
    assert restored(attacked, layout, aligned, "SCU+CU", groups).key == \
        restored(attacked, layout, aligned, "CU+SCU", groups).key
    state = {k: v.clone() for k, v in aligned.state_dict().items()}
    assert restored(attacked, layout, state, "norms").key != restored(attacked, layout, aligned, "norms").key
    with pytest.raises(SsahError, match="unknown part"):
        restored(attacked, layout, aligned, "SCU+heads", groups)
    with pytest.raises(SsahError, match="give the groups"):
        restored(attacked, layout, aligned, "SCU")
    other, _ = tiny_model("gemma")
    with pytest.raises(SsahError, match="differ at"):
        restored(attacked, layout, other, "norms")
    stranger = _random_groups(layout, "0123456789abcdef")
    with pytest.raises(SsahError, match="groups were made for model"):
        restored(attacked, layout, aligned, "SCU", stranger)


def test_a_partly_restored_rise_gives_its_share_with_an_interval():
    from ssah.evaluate.stats import paired_share_bootstrap

    aligned = [0.0] * 40
    attacked = [1.0] * 30 + [0.0] * 10
    half = [1.0] * 15 + [0.0] * 25
    found = paired_share_bootstrap(aligned, attacked, half, resamples=500)
    assert found["share"] == pytest.approx(0.5) and found["ci"][0] < 0.5 < found["ci"][1]
    assert paired_share_bootstrap(aligned, attacked, aligned)["share"] == 1.0
    flat = paired_share_bootstrap(aligned, aligned, aligned)
    assert flat["share"] is None and flat["ci"] is None and "no rise" in flat["reason"]


def _scored_groups(loaded) -> Groups:
    """Groups of a model from real scores (harmful prompts + refusals vs benign answers)."""
    from ssah.data import load_dataset
    from ssah.units.groups import make_groups
    from ssah.units.scores import score_dataset

    safety = score_dataset(loaded, load_dataset("harmful:calibration").take(6), responses="refusals",
                           batch_size=3, max_length=256, progress=False)
    utility = score_dataset(loaded, load_dataset("benign:calibration").take(6), batch_size=3, max_length=256,
                            progress=False)
    return make_groups(safety, utility, {"scu": 0.05, "ucu": 0.1, "ru": 0.2})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An aligned tiny model that refuses every harmful prompt, and an attacked copy that differs from
    it in the owned entries of one group (CU) only and complies: the attack lives in CU alone."""
    from ssah.data import load_dataset
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import mask_from_expression
    from ssah.models.loading import LoadedModel
    from tests.helpers import teach_answer

    prompts = load_dataset("harmful:test").take(6)
    aligned, tokenizer = tiny_model("llama")
    layout = UnitLayout.from_model(aligned)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                              add_generation_prompt=True) for r in prompts.records]
    teach_answer(aligned, tokenizer, rendered, "I can't.", steps=40)
    groups = _scored_groups(LoadedModel(aligned, tokenizer, "tiny:llama"))
    attacked, _ = tiny_model("llama")
    attacked.load_state_dict(aligned.state_dict())
    cu = mask_from_expression(groups, "CU")
    with UnitFreezer(attacked, layout, cu, train_only=True):  # gradients reach CU's entries only
        teach_answer(attacked, tokenizer, rendered, "Sure, here is how.", steps=80)
    with torch.no_grad():  # the optimizer's weight decay moved the rest a little: put it back
        outside = {n: p.detach().clone() for n, p in aligned.named_parameters()}
        with restored(attacked, layout, aligned, "CU", groups):
            kept = {n: p.detach().clone() for n, p in attacked.named_parameters()}
        for name, param in attacked.named_parameters():
            param.copy_(outside[name] + param - kept[name])
    folder = tmp_path_factory.mktemp("planted")
    groups.save(folder / "groups")
    attacked.save_pretrained(folder / "attacked")
    tokenizer.save_pretrained(folder / "attacked")
    aligned.save_pretrained(folder / "aligned")
    tokenizer.save_pretrained(folder / "aligned")
    return (LoadedModel(aligned, tokenizer, "planted-aligned"), LoadedModel(attacked, tokenizer, "planted-attacked"),
            groups, prompts, folder)


def test_the_group_that_holds_the_attack_restores_all_of_the_rise(planted, tmp_path):
    from ssah.analysis.restore import restore_table
    from ssah.evaluate.settings import EvalSettings

    aligned, attacked, groups, prompts, _ = planted
    settings = EvalSettings(suites=["safety"], rules=["prefix"], max_new_tokens=12, system_prompt="none")
    table = restore_table(aligned, attacked, groups, ["CU", "SCU", "embeddings", "SCU+CU"], tmp_path, settings,
                          {"harmful": prompts}, resamples=200)
    assert table["aligned"]["asr"] == 0.0 and table["attacked"]["asr"] == 1.0 and table["n"] == 6
    rows = {row["part"]: row for row in table["parts"]}
    assert rows["CU"]["share"] == 1.0 and rows["CU"]["asr"] == 0.0 and rows["CU"]["share_ci"] == [1.0, 1.0]
    assert rows["SCU+CU"]["share"] == 1.0
    assert rows["SCU"]["share"] == 0.0 and rows["embeddings"]["share"] == 0.0
    assert json.loads((tmp_path / "restore.json").read_text())["parts"][0]["part"] == "CU"
    flat = restore_table(aligned, aligned, groups, ["CU"], tmp_path / "flat", settings, {"harmful": prompts},
                         resamples=50)
    assert flat["parts"][0]["share"] is None and "no rise" in flat["parts"][0]["share_reason"]


def test_restore_command_end_to_end_and_its_errors(planted, tmp_path, capsys):
    _, _, _, prompts, folder = planted
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in prompts.records))
    common = ["--aligned", str(folder / "aligned"), "--attacked", str(folder / "attacked"),
              "--groups", str(folder / "groups"), "--harmful", f"jsonl:{harmful}", "--max-new-tokens", "12",
              "--resamples", "100", "--device", "cpu"]
    result = run_cli(capsys, "restore", *common, "--parts", "CU,norms", "--out", str(tmp_path / "out"))
    assert result.code == 0, result.err
    table = json.loads((tmp_path / "out" / "restore.json").read_text())
    assert [row["part"] for row in table["parts"]] == ["CU", "norms"]
    assert table["parts"][0]["share"] == 1.0 and table["parts"][1]["share"] == 0.0
    assert "CU" in result.out and "+100%" in result.out

    result = run_cli(capsys, "restore", *common, "--parts", "CU,heads", "--out", str(tmp_path / "bad"))
    assert_one_line_error(result, "unknown part")
    assert result.code == 2 and not (tmp_path / "bad").exists()
    gemma, tokenizer = tiny_model("gemma")
    gemma.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    mismatch = [*common[:2], "--attacked", str(tmp_path / "gemma"), *common[4:]]
    result = run_cli(capsys, "restore", *mismatch, "--parts", "norms", "--out", str(tmp_path / "other"))
    # both models load before their layouts can be compared: Hugging Face's loading bars come first
    loading = [line for line in result.err.splitlines() if "Loading weights" in line]
    assert_one_line_error(CliResult(result.code, result.out, "\n".join(
        line for line in result.err.splitlines() if line not in loading)), "differ at")
    assert result.code == 2 and not (tmp_path / "other").exists()
