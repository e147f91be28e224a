"""Record/Dataset behaviour and the content fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from ssah.data import Dataset, Record, load_dataset
from ssah.errors import SsahError

TINY = [Record(id="a", prompt="Hello"), Record(id="b", prompt="Caf\u00e9", response="ok", category="c", source="s")]


def documented_fingerprint(records: list[Record]) -> str:
    """The rule in ssah/data/records.py, written out independently."""
    lines = []
    for r in records:
        obj = {"id": r.id, "prompt": r.prompt, "response": r.response, "category": r.category,
               "source": r.source, "answer": r.answer, "normalizer": r.normalizer}
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def test_record_is_frozen_with_the_agreed_fields():
    assert [f.name for f in dataclasses.fields(Record)] == [
        "id", "prompt", "response", "category", "source", "answer", "normalizer"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY[0].prompt = "x"


def test_fingerprint_follows_the_documented_rule():
    data = Dataset("tiny", list(TINY))
    assert data.fingerprint == documented_fingerprint(TINY)
    assert len(data.fingerprint) == 64


def test_fingerprint_stable_across_loads_and_name_independent(tmp_path):
    first, second = load_dataset("harmful:test"), load_dataset("harmful:test")
    assert first.fingerprint == second.fingerprint
    copy = tmp_path / "copy.jsonl"
    first.to_jsonl(copy)
    reloaded = load_dataset(f"jsonl:{copy}")
    assert reloaded.records == first.records and reloaded.fingerprint == first.fingerprint


def test_fingerprint_changes_with_one_character_and_with_order():
    base = Dataset("tiny", list(TINY)).fingerprint
    changed = [TINY[0], dataclasses.replace(TINY[1], prompt="Cafe")]
    assert Dataset("tiny", changed).fingerprint != base
    assert Dataset("tiny", [dataclasses.replace(TINY[0], category="x"), TINY[1]]).fingerprint != base
    assert Dataset("tiny", TINY[::-1]).fingerprint != base  # order matters (documented)


def test_fingerprint_is_unicode_normalisation_insensitive():
    decomposed = [TINY[0], dataclasses.replace(TINY[1], prompt="Cafe\u0301")]
    assert Dataset("x", decomposed).fingerprint == Dataset("y", list(TINY)).fingerprint


def test_dataset_container_api():
    data = Dataset("tiny", list(TINY))
    assert len(data) == 2 and list(data) == TINY and data[1] is TINY[1]
    assert data.prompts() == ["Hello", "Caf\u00e9"]
    assert data[:1].name == "tiny[:1]" and data[:1].records == TINY[:1]
    head = data.take(1)
    assert head.name == "tiny[take=1]" and head.records == TINY[:1]
    assert len(data.take(10)) == 2
    with pytest.raises(SsahError):
        data.take(-1)


def test_sample_is_seeded_ordered_and_strict():
    data = load_dataset("benign")
    a, b, c = data.sample(50, seed=3), data.sample(50, seed=3), data.sample(50, seed=4)
    assert a.name == "benign[sample=50,seed=3]"
    assert a.records == b.records and a.records != c.records
    positions = [data.records.index(r) for r in a]
    assert positions == sorted(positions) and len(set(positions)) == 50
    with pytest.raises(SsahError, match="between 0 and"):
        data.sample(len(data) + 1, seed=0)


def test_to_jsonl_writes_all_fields(tmp_path):
    path = Dataset("tiny", list(TINY)).to_jsonl(tmp_path / "sub" / "out.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[1] == {"id": "b", "prompt": "Caf\u00e9", "response": "ok", "category": "c", "source": "s",
                       "answer": None, "normalizer": None}
    assert not list(path.parent.glob("*.tmp"))


def test_subset_names_load_back_as_the_same_subset():
    """A name recorded by take/sample (e.g. in a scores manifest) loads the very same records."""
    full = load_dataset("benign:calibration")
    for subset in (full.take(5), full.sample(7, seed=3), full.sample(7, seed=3).take(2)):
        again = load_dataset(subset.name)
        assert again.name == subset.name and again.fingerprint == subset.fingerprint
    with pytest.raises(SsahError, match="sample"):
        load_dataset(f"benign:calibration[sample={len(full) + 1},seed=0]")
