"""The one record schema shared by every dataset, and the `Dataset` container.

Fingerprint rule (stored by later artifacts, so it must never drift): each record becomes one JSON
object holding all seven `Record` fields (sorted keys, `None` as null, every string NFC-normalised,
non-ASCII kept as UTF-8, separators "," and ":"); the objects are joined with "\\n" in record order
and hashed with sha256. Record order matters: runs take the first n records of a dataset, so a
reordered dataset is a different dataset. The dataset's name is not part of the fingerprint: the same
records loaded from two places have the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ssah.errors import SsahError


def clean_text(text: str) -> str:
    """NFC-normalise, turn CRLF/CR line ends into LF and strip surrounding whitespace."""
    text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@dataclass(frozen=True)
class Record:
    """One example. `answer` and `normalizer` are set only for checkable tasks (see `check_answer`).

    For reply-like built-in sets (`refusals`, `compliance_openings`) and the `text` corpus the text
    itself is in `prompt`.
    """

    id: str
    prompt: str
    response: str | None = None
    category: str = ""
    source: str = ""
    answer: str | None = None
    normalizer: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Record))


def _canonical_json(record: Record) -> str:
    values = {key: unicodedata.normalize("NFC", value) if isinstance(value, str) else value
              for key, value in asdict(record).items()}
    return json.dumps(values, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def fingerprint_records(records: list[Record]) -> str:
    """Hex sha256 of the records under the documented normalisation (see module docstring)."""
    payload = "\n".join(_canonical_json(record) for record in records)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class Dataset:
    """A named, ordered list of records. `name` is the spec it was loaded from (or derived from it)."""

    name: str
    records: list[Record] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Hex sha256 of the content; order-sensitive, name-independent (see module docstring)."""
        return fingerprint_records(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int | slice) -> Record | Dataset:
        """An int gives a Record; a slice gives a Dataset named e.g. `harmful:test[2:5]`."""
        if isinstance(index, slice):
            start, stop, step = index.start, index.stop, index.step
            bounds = f"{'' if start is None else start}:{'' if stop is None else stop}"
            bounds += f":{step}" if step is not None else ""
            return Dataset(f"{self.name}[{bounds}]", self.records[index])
        return self.records[index]

    def prompts(self) -> list[str]:
        """The prompts in record order."""
        return [record.prompt for record in self.records]

    def categories(self) -> dict[str, int]:
        """Record count per category, in order of first appearance."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.category] = counts.get(record.category, 0) + 1
        return counts

    def take(self, n: int) -> Dataset:
        """The first `min(n, len)` records, named `NAME[take=n]`."""
        if n < 0:
            raise SsahError(f"take({n}) on dataset {self.name!r}: n must be 0 or more")
        return Dataset(f"{self.name}[take={n}]", self.records[:n])

    def sample(self, n: int, seed: int = 0) -> Dataset:
        """`n` records drawn without replacement with `random.Random(seed)`, kept in dataset order.

        Named `NAME[sample=n,seed=s]`. Asking for more records than the dataset holds is an error
        (a silently smaller sample would change every statistic computed on it).
        """
        if not 0 <= n <= len(self.records):
            raise SsahError(f"sample({n}) on dataset {self.name!r}: n must be between 0 and its "
                            f"{len(self.records)} records")
        chosen = sorted(random.Random(seed).sample(range(len(self.records)), n))
        return Dataset(f"{self.name}[sample={n},seed={seed}]", [self.records[i] for i in chosen])

    def to_jsonl(self, path: str | Path) -> Path:
        """Write one JSON object per record (all fields); `load_dataset('jsonl:PATH')` reads it back
        with the same fingerprint."""
        from ssah.io import write_jsonl_atomic

        path = Path(path)
        write_jsonl_atomic(path, [record.to_dict() for record in self.records])  # a crash leaves no half file
        return path
