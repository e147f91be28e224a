"""The built-in datasets written for this project (see builtin/DATASHEET.md).

`NAME` loads every split in the order calibration, train, test; `NAME:SPLIT` loads one split.
Stored sets are JSONL files under `builtin/` whose `split` field assigns each record; `benign` joins
the seeded checkable-task generator with hand-written free-form pairs; `text` is `builtin/text.txt`
cut into paragraphs. `refusals` is split by role instead (`REFUSAL_ROLES`): no refusal text serves two
roles, so no text both trains a behaviour and measures it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ssah.data.formats import field_value, jsonl_rows
from ssah.data.records import Record, clean_text
from ssah.data.tasks import iter_tasks
from ssah.data.text import text_corpus
from ssah.errors import SsahError

SPLITS = ("calibration", "train", "test")

# The roles of the built-in refusal texts, each a split of `refusals` with texts of its own:
# alignment targets; the responses of the unit safety scores; the refusal openings the probe and the
# refusal score measure (their first two words differ from every alignment target's); the safety
# data of the attack grid's defenses (RSN-Tune, safety mixing).
REFUSAL_ROLES = ("align", "scoring", "openings", "grid")
REFUSAL_SPECS = {role: f"refusals:{role}" for role in REFUSAL_ROLES}

# The checkable part of `benign`: one task stream from this seed, cut into consecutive blocks, so no
# task appears in two splits. Changing the seed or the sizes changes the benign fingerprints.
BENIGN_TASK_SEED = 1410
BENIGN_TASKS_PER_SPLIT = {"calibration": 128, "train": 384, "test": 256}


@dataclass(frozen=True)
class BuiltinInfo:
    """One built-in set: what it is for, and its record count per split (`{"all": n}` if unsplit)."""

    name: str
    description: str
    splits: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.splits.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "splits": dict(self.splits),
                "total": self.total}


DESCRIPTIONS = {
    "harmful": "explicit harmful requests (text only) in 14 harm categories; safety scoring, alignment, ASR",
    "benign": "helpful instructions with reference answers: seeded checkable tasks plus hand-written pairs",
    "sensitive_safe": "safe prompts that sound unsafe (XSTest style), for measuring over-refusal",
    "refusals": "refusal replies (the 'reserved options'), split by role: align, scoring, openings, grid; "
                "text in `prompt`",
    "compliance_openings": "openings that start to fulfil a request, for probes and prefill attacks; text in `prompt`",
    "text": "hand-written encyclopedic prose, one record per paragraph, for perplexity",
}
BUILTIN_NAMES = tuple(DESCRIPTIONS)


def _resource(filename: str):
    return files("ssah.data").joinpath("builtin", filename)


@functools.cache
def _stored(filename: str) -> tuple[tuple[str, Record], ...]:
    """(split, record) pairs of a stored JSONL set; split is "" for unsplit sets."""
    resource = _resource(filename)
    path = Path(str(resource))
    source = "ssah:" + filename.removesuffix(".jsonl").removesuffix("_freeform")
    out = []
    for row in jsonl_rows(path, resource.read_text(encoding="utf-8")):
        out.append((field_value(row, "split", path, required=False) or "",
                    Record(id=field_value(row, "id", path, required=True),
                           prompt=field_value(row, "prompt", path, required=True),
                           response=field_value(row, "response", path, required=False),
                           category=field_value(row, "category", path, required=True),
                           source=source)))
    return tuple(out)


@functools.cache
def _benign_tasks() -> tuple[tuple[str, Record], ...]:
    stream = iter_tasks(BENIGN_TASK_SEED)
    out = []
    index = 0
    for split in SPLITS:
        for _ in range(BENIGN_TASKS_PER_SPLIT[split]):
            task = next(stream)
            out.append((split, Record(id=f"benign/task/{index:04d}", prompt=task.prompt, response=task.answer,
                                      category=task.kind, source="ssah:benign-tasks", answer=task.answer,
                                      normalizer=task.normalizer)))
            index += 1
    return tuple(out)


@functools.cache
def _text_paragraphs() -> tuple[tuple[str, Record], ...]:
    paragraphs = [clean_text(part) for part in text_corpus().split("\n\n")]
    return tuple(("", Record(id=f"text/{i:04d}", prompt=paragraph, category="prose", source="ssah:text"))
                 for i, paragraph in enumerate(p for p in paragraphs if p))


def _entries(name: str) -> tuple[tuple[str, Record], ...]:
    if name == "benign":
        return _benign_tasks() + _stored("benign_freeform.jsonl")
    if name == "text":
        return _text_paragraphs()
    return _stored(f"{name}.jsonl")


def _split_names(entries: tuple[tuple[str, Record], ...]) -> tuple[str, ...]:
    present = {split for split, _ in entries}
    return tuple(split for split in SPLITS + REFUSAL_ROLES if split in present)


def load_builtin(name: str, split: str | None) -> list[Record]:
    """Records of built-in set `name`, one split or (split None) all splits in the standard order."""
    entries = _entries(name)
    splits = _split_names(entries)
    if split is None or split == "":
        if not splits:
            return [record for _, record in entries]
        return [record for wanted in splits for got, record in entries if got == wanted]
    if split not in splits:
        available = f"its splits are {', '.join(splits)}" if splits else "it has no splits; use it whole"
        raise SsahError(f"built-in dataset {name!r} has no split {split!r}; {available} (e.g. {name}"
                        f"{':' + splits[-1] if splits else ''})")
    return [record for got, record in entries if got == split]


def builtin_names() -> dict[str, BuiltinInfo]:
    """Every built-in set with its description and record count per split."""
    infos = {}
    for name in BUILTIN_NAMES:
        entries = _entries(name)
        splits = _split_names(entries)
        counts = ({split: sum(1 for got, _ in entries if got == split) for split in splits}
                  if splits else {"all": len(entries)})
        infos[name] = BuiltinInfo(name, DESCRIPTIONS[name], counts)
    return infos
