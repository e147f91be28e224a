"""Built-in datasets: sizes, splits, categories, uniqueness and no near-duplicates across splits."""

from __future__ import annotations

import itertools
import re
import unicodedata

import pytest

from ssah.data import builtin_names, load_dataset
from ssah.data.catalog import REFUSAL_ROLES
from ssah.data.text import text_corpus
from ssah.errors import SsahError

SPLITS = ("calibration", "train", "test")
NEAR_DUPLICATE_JACCARD = 0.5  # word-trigram Jaccard at or above this = near-duplicate (DATASHEET.md)
REFUSAL_OPENING = re.compile(r"^(I'm sorry|I am sorry|Sorry|I can't|I cannot|I won't|I will not|"
                             r"I'm not able to|I am not able to)\b")


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold().replace("'", ""))
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)} or {tuple(words)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def splits_of(name: str) -> dict:
    names = builtin_names()[name].splits
    return {split: load_dataset(f"{name}:{split}") for split in SPLITS if split in names}


@pytest.mark.parametrize("name, minimum", [("harmful", 400), ("benign", 800), ("sensitive_safe", 470),
                                           ("refusals", 20), ("compliance_openings", 20), ("text", 50)])
def test_minimum_sizes_and_unique_ids_and_prompts(name, minimum):
    data = load_dataset(name)
    assert len(data) >= minimum
    assert len({r.id for r in data}) == len(data)
    assert len({" ".join(p.casefold().split()) for p in data.prompts()}) == len(data)
    assert all(r.prompt.strip() == r.prompt and r.prompt for r in data)
    assert all(r.category for r in data)


def test_harmful_splits_and_categories():
    parts = splits_of("harmful")
    assert [len(parts[s]) for s in SPLITS] == [128, 144, 163]
    categories = set(load_dataset("harmful").categories())
    assert len(categories) >= 12
    for split, data in parts.items():
        assert set(data.categories()) == categories, split
    assert all(r.response is None for r in load_dataset("harmful"))


def test_benign_splits_categories_and_sizes():
    parts = splits_of("benign")
    categories = set(load_dataset("benign").categories())
    for split, data in parts.items():
        assert set(data.categories()) == categories, split
    everything = load_dataset("benign")
    checkable = [r for r in everything if r.answer is not None]
    free_form = [r for r in everything if r.answer is None]
    assert len(checkable) + len(free_form) >= 800 and len(free_form) >= 200
    assert all(r.normalizer in ("number", "text", "exact", "list") for r in checkable)
    assert all(r.response for r in free_form)


def test_split_union_is_the_whole_set():
    for name in ("harmful", "benign", "sensitive_safe"):
        parts = splits_of(name)
        assert [r for s in SPLITS if s in parts for r in parts[s]] == load_dataset(name).records


@pytest.mark.parametrize("name", ["harmful", "benign", "sensitive_safe"])
def test_no_near_duplicates_across_splits(name):
    parts = splits_of(name)
    # Generated benign tasks are templated by design; they are checked by task identity below.
    grams = {split: [trigrams(r.prompt) for r in data if r.answer is None] for split, data in parts.items()}
    worst = 0.0
    for a, b in itertools.combinations(parts, 2):
        for x in grams[a]:
            for y in grams[b]:
                worst = max(worst, jaccard(x, y))
    assert worst < NEAR_DUPLICATE_JACCARD


def test_no_task_in_two_benign_splits():
    def identity(record):  # the question without its answer-format instruction; list items in any order
        question = record.prompt.split(" Answer with")[0]
        if record.category in ("sort_numbers", "sort_words", "count_items", "largest_number"):
            return record.category, tuple(sorted(re.findall(r"\w+", question)))
        return record.category, question

    seen: dict = {}
    for split, data in splits_of("benign").items():
        for record in data:
            if record.answer is not None:
                key = identity(record)
                assert seen.setdefault(key, split) == split, (record, seen[key])


def test_refusals_are_refusals_short_and_long_in_every_role():
    from ssah.evaluate.rules import is_refusal

    for role in REFUSAL_ROLES:
        refusals = load_dataset(f"refusals:{role}")
        assert len(refusals) >= 30, role
        assert [r for r in refusals.prompts() if not is_refusal(r, "prefix")] == [], role
        lengths = [len(r.split()) for r in refusals.prompts()]
        assert min(lengths) <= 6 and max(lengths) >= 20, role
        assert set(refusals.categories()) == {"short", "long"}, role
        assert all(r.id.startswith(f"refusals/{role}/") for r in refusals), role


def _text(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold().replace("'", "")))


def test_no_refusal_text_serves_two_roles():
    texts = {role: {_text(t) for t in load_dataset(f"refusals:{role}").prompts()} for role in REFUSAL_ROLES}
    assert sum(len(t) for t in texts.values()) == len(load_dataset("refusals"))  # no repeats inside a role
    for first, second in itertools.combinations(REFUSAL_ROLES, 2):
        assert texts[first].isdisjoint(texts[second]), (first, second, texts[first] & texts[second])
    # what the probe and the refusal score measure does not even open like what alignment trains on
    def openings(role: str) -> set[str]:
        return {" ".join(_text(t).split()[:2]) for t in load_dataset(f"refusals:{role}").prompts()}

    assert openings("openings").isdisjoint(openings("align")), openings("openings") & openings("align")


def test_each_consumer_reads_its_own_refusal_role(tmp_path):
    from types import SimpleNamespace

    from ssah.attacks.grid import safety_pairs
    from ssah.config import RunConfig
    from ssah.data import Dataset, Record
    from ssah.evaluate.runner import load_eval_data
    from ssah.pipeline.context import RunContext
    from ssah.pipeline.stages.align import inputs as align_inputs
    from ssah.probe.study import probe_data
    from ssah.units.scores import calibration_pairs

    role = {name: set(load_dataset(f"refusals:{name}").prompts()) for name in REFUSAL_ROLES}
    config = RunConfig()
    # alignment targets
    assert set(align_inputs(SimpleNamespace(config=config)).refusals.prompts()) == role["align"]
    # the unit safety scores' responses (built-in default and the pipeline's setting)
    harmful = Dataset("h", [Record(id=f"h{i}", prompt=f"harmful request {i}") for i in range(40)])
    for given in (None, config.data.scoring_refusals):
        replies = {reply for _, reply in calibration_pairs(None, harmful, responses="refusals", refusals=given)}
        assert replies <= role["scoring"] and len(replies) > 10
    # the probe's and the refusal score's openings
    assert set(probe_data("harmful:calibration", "benign:calibration", limit=2).refusals.prompts()) == role["openings"]
    assert set(load_eval_data(["refusal_score"])["refusals"].prompts()) == role["openings"]
    assert set(RunContext(config, tmp_path).eval_data["refusals"].prompts()) == role["openings"]
    # the attack grid's safety data
    assert {reply for _, reply in safety_pairs(0, config.data.grid_refusals)} <= role["grid"]


def test_compliance_openings_do_not_refuse():
    for record in load_dataset("compliance_openings"):
        assert not REFUSAL_OPENING.match(record.prompt)
        assert not re.search(r"\b(sorry|can't|cannot|won't)\b", record.prompt, re.IGNORECASE)


def test_sensitive_safe_categories():
    data = load_dataset("sensitive_safe")
    assert len(data.categories()) >= 6
    assert {"homonyms", "figurative_language", "safe_targets", "historical_events", "safety_information",
            "fiction"} <= set(data.categories())


def test_sensitive_safe_splits_per_category():
    # train: the first 5 per category plus 10 added (ids 17-26) and 15 more (ids 33-47); test: ids 06-16,
    # unchanged and in order; calibration (for choosing a recipe or threshold without touching test): 27-32.
    parts = splits_of("sensitive_safe")
    sizes = {"calibration": 60, "train": 300, "test": 110}
    assert {s: len(d) for s, d in parts.items()} == sizes
    assert builtin_names()["sensitive_safe"].splits == sizes
    categories = set(load_dataset("sensitive_safe").categories())
    assert len(categories) == 10
    for split, per_category in (("calibration", 6), ("train", 30), ("test", 11)):
        counts = {c: sum(r.category == c for r in parts[split]) for c in categories}
        assert set(counts.values()) == {per_category}, (split, counts)
    test_numbers = [int(r.id.rsplit("/", 1)[1]) for r in parts["test"]]
    assert test_numbers == [n for n in range(6, 17) for _ in range(10)]
    expected = set(range(1, 6)) | set(range(17, 27)) | set(range(33, 48))
    assert {int(r.id.rsplit("/", 1)[1]) for r in parts["train"]} == expected
    assert {int(r.id.rsplit("/", 1)[1]) for r in parts["calibration"]} == set(range(27, 33))


def test_text_corpus_size_and_no_repeated_paragraphs():
    corpus = text_corpus()
    words = corpus.split()
    assert len(words) >= 16_000
    # GPT-2-style BPE averages ~1.2 tokens per English word on this prose (21.8k SmolLM2 tokens measured).
    assert len(words) * 1.2 >= 20_000
    paragraphs = [p.strip() for p in corpus.split("\n\n") if p.strip()]
    assert len(set(paragraphs)) == len(paragraphs) == len(load_dataset("text"))
    assert load_dataset("text").prompts() == paragraphs
    grams = [trigrams(p) for p in paragraphs]
    assert max(jaccard(a, b) for a, b in itertools.combinations(grams, 2)) < 0.2


def test_builtin_names_reports_counts():
    infos = builtin_names()
    assert set(infos) == {"harmful", "benign", "sensitive_safe", "refusals", "compliance_openings", "text"}
    assert infos["harmful"].splits == {"calibration": 128, "train": 144, "test": 163}
    assert infos["refusals"].splits == {role: len(load_dataset(f"refusals:{role}")) for role in REFUSAL_ROLES}
    assert list(infos["refusals"].splits) == list(REFUSAL_ROLES)
    for name, info in infos.items():
        assert info.total == len(load_dataset(name)) and info.description


def test_split_errors():
    with pytest.raises(SsahError, match="its splits are calibration, train, test"):
        load_dataset("harmful:dev")
    with pytest.raises(SsahError, match="its splits are align, scoring, openings, grid"):
        load_dataset("refusals:test")
    with pytest.raises(SsahError, match="has no splits"):
        load_dataset("compliance_openings:test")


@pytest.mark.usefixtures("one_torch_thread")
def test_own_refusals_score_only_the_replies_the_model_refuses_with():
    from ssah.evaluate.rules import is_refusal
    from ssah.models.loading import LoadedModel
    from ssah.models.tiny import tiny_model
    from ssah.units.scores import calibration_pairs
    from tests.helpers import teach_answer

    harmful = load_dataset("harmful:calibration").take(4)
    model, tokenizer = tiny_model("llama", seed=5)
    refusal = "I can't."  # the tiny tokenizer reads bytes: short enough for 12 new tokens
    teach_answer(model, tokenizer, [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                                  add_generation_prompt=True)
                                    for p in load_dataset("harmful:train").take(24).prompts()], refusal)
    refuser = LoadedModel(model, tokenizer, "tiny refuser")
    pairs = calibration_pairs(refuser, harmful, responses="own-refusals", max_new_tokens=12)
    assert [p for p, _ in pairs] == harmful.prompts() and {r for _, r in pairs} == {refusal}
    everything = calibration_pairs(refuser, harmful, responses="self", max_new_tokens=12)
    assert all(is_refusal(r) for _, r in everything)
    model, tokenizer = tiny_model("llama", seed=5)  # untrained: it refuses nothing
    with pytest.raises(SsahError, match="refused none of the 4 prompts"):
        calibration_pairs(LoadedModel(model, tokenizer, "tiny"), harmful, responses="own-refusals", max_new_tokens=12)
