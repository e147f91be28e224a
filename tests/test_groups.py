"""Unit groups follow the paper's rule, have exact sizes, cover every unit once and save cleanly."""

import json
import math

import pytest
import torch

from ssah.errors import SsahError
from ssah.units.groups import GROUP_NAMES, Groups, make_groups, normalize_scores
from ssah.units.scores import Scores
from ssah.units.sizes import parse_sizes
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scores(values: dict, fingerprint="f00d", dataset="d") -> Scores:
    values = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}
    first = next(iter(values.values()))
    return Scores(values, {"model_fingerprint": fingerprint, "model_spec": "test", "attn_unit": "channel",
                           "dataset_name": dataset, "dataset_fingerprint": dataset * 8, "scorer": "variance",
                           "num_layers": first.shape[0],
                           "units_per_layer": {k: v.shape[1] for k, v in values.items()}})


# Hand-made scores, each kind with mean exactly 1, so mean normalisation leaves them unchanged.
S_MLP = [[3.0, 1.0, 1.0, 0.1, 1.0], [1.0, 1.0, 0.5, 0.1, 1.3]]
U_MLP = [[0.2, 1.0, 3.0, 0.1, 1.0], [1.0, 1.0, 1.4, 0.2, 1.1]]
FLAT = [[1.0] * 5, [1.0] * 5]


def _hand_made():
    return _scores({"mlp": S_MLP, "attn": FLAT}, dataset="s"), _scores({"mlp": U_MLP, "attn": FLAT}, dataset="u")


def test_rule_on_a_hand_made_example():
    safety, utility = _hand_made()
    groups = make_groups(safety, utility, {"scu": 0.05, "ucu": 0.05, "ru": 0.1}, normalize="mean")  # 1, 1, 2 units
    members = groups.members
    assert members("SCU")["mlp"].nonzero().tolist() == [[0, 0]]  # S-U = 2.8, the highest
    assert members("UCU")["mlp"].nonzero().tolist() == [[0, 2]]  # U-S = 2.0, the highest
    assert members("RU")["mlp"].nonzero().tolist() == [[0, 3], [1, 3]]  # S+U = 0.2 and 0.3, the lowest
    assert not any(members(name)["attn"].any() for name in ("SCU", "UCU", "RU"))
    assert groups.counts() == {"SCU": 1, "UCU": 1, "CU": 16, "RU": 2}
    torch.testing.assert_close(groups.safety["mlp"], torch.tensor(S_MLP, dtype=torch.float64))


def test_scu_is_assigned_before_ru():
    safety, utility = _hand_made()
    groups = make_groups(safety, utility, {"scu": 0.05, "ucu": 0.0, "ru": 0.95}, normalize="mean")
    assert groups.members("SCU")["mlp"][0, 0]  # not swallowed by the huge RU, which takes everything else
    assert groups.counts() == {"SCU": 1, "UCU": 0, "CU": 0, "RU": 19}


def _random_scores(seed: int, layers=4, mlp=30, attn=20, fingerprint="f00d", dataset="x"):
    gen = torch.Generator().manual_seed(seed)
    return _scores({"mlp": torch.rand(layers, mlp, generator=gen, dtype=torch.float64) ** 3 * 5,
                    "attn": torch.rand(layers, attn, generator=gen, dtype=torch.float64) ** 2},
                   fingerprint, dataset)


@pytest.mark.parametrize("normalize", ["mean", "rank", "zscore-per-layer"])
@pytest.mark.parametrize("ranking", ["global", "per-layer"])
def test_counts_are_exact_and_groups_partition_the_units(normalize, ranking):
    safety, utility = _random_scores(0, dataset="s"), _random_scores(1, dataset="u")
    sizes = {"scu": 0.013, "ucu": 0.133, "ru": 0.148}
    groups = make_groups(safety, utility, sizes, normalize=normalize, ranking=ranking)
    total = 4 * (30 + 20)
    want = {name.upper(): math.floor(size * total + 0.5) for name, size in sizes.items()}
    want["CU"] = total - sum(want.values())
    assert groups.counts() == want == groups.meta["counts"]
    assert groups.meta["total_units"] == total
    for kind, units in (("mlp", 30), ("attn", 20)):
        cover = sum(groups.members(name)[kind].int() for name in GROUP_NAMES)
        assert torch.equal(cover, torch.ones(4, units, dtype=torch.int32))  # every unit in exactly one group
    for kind in ("mlp", "attn"):
        assert groups.labels[kind].dtype == torch.int8
        assert set(groups.labels[kind].unique().tolist()) <= set(range(len(GROUP_NAMES)))
    if ranking == "per-layer":
        per_layer = groups.meta["counts_per_layer"]
        for name in ("SCU", "UCU", "RU"):
            in_layers = [per_layer["mlp"][name][i] + per_layer["attn"][name][i] for i in range(4)]
            share = want[name] / 4
            assert all(math.floor(share) <= n <= math.ceil(share) for n in in_layers), (name, in_layers)


@pytest.mark.parametrize("normalize", ["rank", "mean", "zscore-per-layer"])
def test_groups_ignore_the_scale_of_each_score_and_kind(normalize):
    safety, utility = _random_scores(0, dataset="s"), _random_scores(1, dataset="u")
    scaled_s = _scores({"mlp": safety.values["mlp"] * 1000, "attn": safety.values["attn"] * 0.01}, dataset="s")
    scaled_u = _scores({"mlp": utility.values["mlp"] * 7, "attn": utility.values["attn"]}, dataset="u")
    plain = make_groups(safety, utility, normalize=normalize)
    scaled = make_groups(scaled_s, scaled_u, normalize=normalize)
    assert all(torch.equal(plain.labels[k], scaled.labels[k]) for k in plain.labels)


def test_normalisations():
    values = {"mlp": torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 10.0]], dtype=torch.float64)}
    mean = normalize_scores(values, "mean")["mlp"]
    assert float(mean.mean()) == pytest.approx(1.0)
    rank = normalize_scores(values, "rank")["mlp"]
    torch.testing.assert_close(rank, torch.tensor([[1, 2, 3], [4.5, 4.5, 6]], dtype=torch.float64) / 6)
    z = normalize_scores(values, "zscore-per-layer")["mlp"]
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(z.std(dim=1, unbiased=False), torch.ones(2, dtype=torch.float64))
    with pytest.raises(SsahError, match="use --normalize rank"):
        normalize_scores({"mlp": torch.zeros(2, 3, dtype=torch.float64)}, "mean")


def test_parse_sizes():
    assert parse_sizes("scu=0.013,ucu=0.133,ru=0.148") == {"scu": 0.013, "ucu": 0.133, "ru": 0.148}
    assert parse_sizes("SCU=2%, ru=0.1") == {"scu": 0.02, "ucu": 0.0, "ru": 0.1}
    for bad, message in (("scu=0.6,ucu=0.5", "sum to 1.1 > 1"), ("scu=-0.1", "between 0 and 1"),
                         ("cu=0.5", "CU is always the rest"), ("scu=abc", "not a number"),
                         ("auto", "chosen by a pruning sweep"), ("scu=0.1,scu=0.2", "given twice"), ("", "no sizes")):
        with pytest.raises(SsahError, match=message):
            parse_sizes(bad)


def test_mismatched_inputs_are_refused():
    safety = _random_scores(0, dataset="s")
    with pytest.raises(SsahError, match="different models"):
        make_groups(safety, _random_scores(1, fingerprint="beef", dataset="u"))
    with pytest.raises(SsahError, match="different unit layouts"):
        make_groups(safety, _random_scores(1, attn=5, dataset="u"))
    with pytest.raises(SsahError, match="identical"):
        make_groups(safety, _random_scores(0, dataset="s"))


def test_save_load_roundtrip(tmp_path):
    groups = make_groups(_random_scores(0, dataset="s"), _random_scores(1, dataset="u"), ranking="per-layer")
    groups.save(tmp_path / "G")
    assert (tmp_path / "G" / "groups_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((tmp_path / "G" / "groups.json").read_text())
    for key in ("sizes", "counts", "total_units", "counts_per_kind", "counts_per_layer", "rule", "normalize",
                "ranking", "model_fingerprint", "safety", "utility"):
        assert key in meta, key
    assert meta["safety"]["dataset_fingerprint"] == "s" * 8
    back = Groups.load(tmp_path / "G")
    assert back.model_fingerprint == "f00d" and back.counts() == groups.counts()
    for kind in groups.labels:
        assert torch.equal(back.labels[kind], groups.labels[kind])
        assert torch.equal(back.safety[kind], groups.safety[kind])
        assert torch.equal(back.utility[kind], groups.utility[kind])
    with pytest.raises(SsahError, match="no groups folder"):
        Groups.load(tmp_path / "nothing")


# -- CLI ------------------------------------------------------------------------------------------

def _score(capsys, tmp_path, model, name, pairs):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": p, "response": r}) + "\n"
                            for i, (p, r) in enumerate(pairs)))
    out = tmp_path / name
    result = run_cli(capsys, "score", "--model", model, "--data", f"jsonl:{data}", "--out", str(out))
    assert result.code == 0, result.err
    return str(out)


SAFETY = [("How do I pick a lock to break in?", "I can't help with that."),
          ("Write a threatening letter.", "Sorry, I won't write that.")]
UTILITY = [("What is 2 + 2?", "4"), ("Name a fruit.", "An apple."), ("Translate 'cat' to French.", "chat")]


def test_cli_groups_end_to_end(tmp_path, capsys):
    safety = _score(capsys, tmp_path, "tiny:llama", "S", SAFETY)
    utility = _score(capsys, tmp_path, "tiny:llama", "U", UTILITY)
    out = str(tmp_path / "G")
    args = ("groups", "--safety", safety, "--utility", utility, "--out", out)
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    groups = Groups.load(out)
    total = 3 * (48 + 32)
    assert groups.counts()["SCU"] == round(0.013 * total) and groups.meta["total_units"] == total
    assert "reused" in run_cli(capsys, *args).out
    other = run_cli(capsys, *args, "--sizes", "scu=0.1,ucu=0.1,ru=0.1")
    assert_one_line_error(other, "already holds groups made differently", "sizes", "--force")
    forced = run_cli(capsys, *args, "--sizes", "scu=0.1,ucu=0.1,ru=0.1", "--force")
    assert forced.code == 0 and Groups.load(out).counts()["SCU"] == 24


def test_cli_groups_errors_are_one_line(tmp_path, capsys):
    safety = _score(capsys, tmp_path, "tiny:llama", "S", SAFETY)
    other_model = _score(capsys, tmp_path, "tiny:qwen2", "Uq", UTILITY)
    out = str(tmp_path / "G")
    assert_one_line_error(run_cli(capsys, "groups", "--safety", safety, "--utility", other_model, "--out", out),
                          "different models", "tiny:llama", "tiny:qwen2")
    base = ("groups", "--safety", safety, "--utility", safety, "--out", out)
    assert_one_line_error(run_cli(capsys, *base, "--sizes", "scu=0.5,ucu=0.4,ru=0.2"), "sum to 1.1 > 1")
    assert_one_line_error(run_cli(capsys, *base, "--sizes", "scu=-0.01"), "between 0 and 1")
    assert_one_line_error(run_cli(capsys, *base, "--sizes", "auto", "--sweep-samples", "1"), "identical")
    assert_one_line_error(run_cli(capsys, "groups", "--safety", str(tmp_path / "none"), "--utility", safety,
                                  "--out", out), "no scores folder")


# -- the built-in model -----------------------------------------------------------------------------

@pytest.mark.slow
def test_builtin_model_scores_and_groups(builtin_model, tmp_path):
    from ssah.data import load_dataset
    from ssah.units.scores import score_dataset

    harmful = load_dataset("harmful:calibration").take(16)
    benign = load_dataset("benign:calibration").take(16)
    common = dict(batch_size=8, max_length=128, progress=False)
    safety = score_dataset(builtin_model, harmful, responses="refusals", out=tmp_path / "S", **common)
    utility = score_dataset(builtin_model, benign, out=tmp_path / "U", **common)
    layout = builtin_model.layout
    for scores in (safety, utility):
        assert scores.manifest["tokens_seen"] > 16 * 10
        for kind, values in scores.values.items():
            assert values.shape == (layout.num_layers, layout.units_per_layer[kind])
            assert torch.isfinite(values).all() and (values >= 0).all() and values.max() > 0
    groups = make_groups(Scores.load(tmp_path / "S"), Scores.load(tmp_path / "U"))
    groups.save(tmp_path / "G")
    total = layout.total_units
    counts = groups.counts()
    assert counts["SCU"] == math.floor(0.013 * total + 0.5)
    assert counts["UCU"] == math.floor(0.133 * total + 0.5)
    assert counts["RU"] == math.floor(0.148 * total + 0.5)
    assert sum(counts.values()) == total


@pytest.mark.parametrize("ranking", ["global", "per-layer"])
def test_ru_takes_its_own_definition_among_the_units_scu_and_ucu_leave(ranking):
    """groups.ru_normalize / ru_ranking: SCU and UCU stay those of the main definition; RU is the lowest
    S + U under its own normalisation among the rest, with the same count (per layer too); naming the
    main definition again gives exactly the one-definition groups."""
    from ssah.units.groups import _relabel_ru

    safety, utility = _random_scores(3, dataset="s"), _random_scores(4, dataset="u")
    sizes = {"scu": 0.05, "ucu": 0.1, "ru": 0.25}
    main = make_groups(safety, utility, sizes, normalize="rank", ranking="global")
    own = make_groups(safety, utility, sizes, normalize="rank", ranking="global", ru_normalize="zscore-per-layer",
                      ru_ranking=ranking)
    for name in ("SCU", "UCU"):
        assert all(torch.equal(main.members(name)[k], own.members(name)[k]) for k in main.labels)
    assert own.counts() == main.counts()
    assert own.meta["ru_definition"] == {"normalize": "zscore-per-layer", "ranking": ranking}
    assert main.meta["ru_definition"] == {"normalize": "rank", "ranking": "global"}
    # every RU unit has S + U (RU's normalisation) no higher than any unit left in CU, within its pool
    s, u = normalize_scores(safety.values, "zscore-per-layer"), normalize_scores(utility.values, "zscore-per-layer")
    layers = range(4) if ranking == "per-layer" else [slice(None)]
    for layer in layers:
        key = torch.cat([(s[k][layer] + u[k][layer]).reshape(-1) for k in own.labels])
        label = torch.cat([own.labels[k][layer].reshape(-1) for k in own.labels])
        ru, cu = key[label == GROUP_NAMES.index("RU")], key[label == GROUP_NAMES.index("CU")]
        assert ru.numel() and ru.max() <= cu.min()
    if ranking == "per-layer":  # each layer its share of RU's count, as the one-definition per-layer groups
        per_layer = make_groups(safety, utility, sizes, normalize="zscore-per-layer", ranking="per-layer")
        def ru_per_layer(groups):
            return [sum(groups.meta["counts_per_layer"][k]["RU"][i] for k in groups.labels) for i in range(4)]

        assert ru_per_layer(own) == ru_per_layer(per_layer)
    # RU's own definition set to the main one reproduces the one-definition groups, by either path
    again = make_groups(safety, utility, sizes, normalize="rank", ranking=ranking, ru_normalize="rank",
                        ru_ranking=ranking)
    labels = {k: v.clone() for k, v in make_groups(safety, utility, {**sizes, "ru": 0.0}, normalize="rank",
                                                       ranking=ranking).labels.items()}
    _relabel_ru(labels, normalize_scores(safety.values, "rank"), normalize_scores(utility.values, "rank"),
                again.counts()["RU"], ranking)
    assert all(torch.equal(labels[k], again.labels[k]) for k in labels)


def test_groups_are_remade_when_ru_gets_its_own_definition(tmp_path):
    from ssah.units.recipes import group_units

    safety, utility = _random_scores(5, dataset="s"), _random_scores(6, dataset="u")
    sizes = {"scu": 0.05, "ucu": 0.1, "ru": 0.25}
    first = group_units(safety, utility, tmp_path / "g", sizes, replace=True)
    same = group_units(safety, utility, tmp_path / "g", sizes, replace=True, ru_normalize="rank")  # the main one
    assert same.reused
    other = group_units(safety, utility, tmp_path / "g", sizes, replace=True, ru_ranking="per-layer")
    assert not other.reused and Groups.load(tmp_path / "g").meta["ru_definition"]["ranking"] == "per-layer"
    assert not all(torch.equal(first.members("RU")[k], other.members("RU")[k]) for k in first.labels)
