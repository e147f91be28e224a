"""Answer normalisers: decide whether a model's reply gives a checkable record's `answer`.

Every normaliser first drops a lead-in from the reply: "Answer:", "The answer is", "Final answer:",
"It is", or any short label ending in a colon ("Sorted list: ..."). Then:

- `number`: the first number in the reply (digits with optional sign, thousands commas and decimals;
  "42", "-3.5", "1,234") is compared with the answer numerically (relative tolerance 1e-6, absolute 1e-6).
  Number words ("forty-two") are not read. "The answer is 42." and "42.0" both give 42.
- `text`: case-, accent-, whitespace- and punctuation-insensitive. The reply matches when, after
  normalising (NFKC, casefold, accents dropped, punctuation to spaces, whitespace collapsed), the
  whole reply, its first line, or its first k words (k = the answer's word count) equal the answer.
  "Paris.", "paris", "Paris is the capital." all match "Paris"; "The capital is Paris." does not.
- `exact`: as `text` but case- and accent-sensitive (for tasks about case, e.g. "write it in uppercase").
- `list`: the first line of the reply, split at commas (or at whitespace when it has no comma), brackets
  and quotes removed; items are compared in order after `text` normalisation, numbers numerically.
  "[3, 5, 9]", "3, 5, 9." and "3 5 9" all match "3, 5, 9".

A record with an answer but no normaliser is checked with `text`.
"""

from __future__ import annotations

import math
import re
import unicodedata

from ssah.data.records import Record
from ssah.errors import SsahError

NORMALIZERS = ("number", "text", "exact", "list")

_LEAD_IN = re.compile(r"^\s*(?:(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\s*:?|:)|it\s+is\b|it's\b)\s*",
                      re.IGNORECASE)
_LABEL = re.compile(r"^\s*[A-Za-z][A-Za-z ]{0,30}:\s+(?=\S)")
# A number must not be glued to a word ("COVID-19", "abc123"); a minus sign counts only when free-standing.
_NUMBER = re.compile(r"(?:(?<![\w.-])-|(?<![\w.-]))(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_WHOLE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _strip_lead_in(reply: str) -> str:
    reply = reply.strip()
    stripped = _LEAD_IN.sub("", reply, count=1)
    stripped = _LABEL.sub("", stripped, count=1)
    return stripped.strip() or reply


def _words(text: str, casefold: bool = True) -> list[str]:
    text = unicodedata.normalize("NFKC", text)
    if casefold:
        # Case-insensitive matching also ignores accents: "Bogota" matches "Bogotá".
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text.casefold())
                       if not unicodedata.combining(ch))
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return text.split()


def first_number(text: str) -> float | None:
    """The first number written with digits in `text`, or None."""
    match = _NUMBER.search(text)
    return float(match.group(0).replace(",", "")) if match else None


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def _text_match(reply: str, answer: str, casefold: bool) -> bool:
    target = _words(answer, casefold)
    if not target:
        return False
    first_line = next((line for line in reply.splitlines() if line.strip()), "")
    reply_words = _words(reply, casefold)
    return (reply_words == target or _words(first_line, casefold) == target
            or reply_words[:len(target)] == target)


def _items(text: str) -> list[str | float]:
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    first_line = re.sub(r"[\[\]()\"'`]", " ", first_line)
    parts = re.split(r"[,;]", first_line) if re.search(r"[,;]", first_line) else first_line.split()
    items: list[str | float] = []
    for part in parts:
        bare = part.strip().strip(".!?*_")
        if _WHOLE_NUMBER.fullmatch(bare):
            items.append(float(bare))
            continue
        words = _words(part)
        if words:
            items.append(" ".join(words))
    return items


def _same_items(a: list[str | float], b: list[str | float]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, float) and isinstance(y, float):
            if not _same_number(x, y):
                return False
        elif x != y:
            return False
    return True


def check_answer(record: Record, reply: str) -> bool:
    """True when `reply` gives `record.answer` under the record's normaliser (rules in the module doc)."""
    if record.answer is None:
        raise SsahError(f"record {record.id!r} has no answer; check_answer needs a checkable task record")
    normalizer = record.normalizer or "text"
    body = _strip_lead_in(reply)
    if normalizer == "number":
        expected = first_number(record.answer)
        if expected is None:
            raise SsahError(f"record {record.id!r}: answer {record.answer!r} is not a number "
                            "but its normalizer is 'number'")
        got = first_number(body)
        return got is not None and _same_number(got, expected)
    if normalizer in ("text", "exact"):
        return _text_match(body, record.answer, casefold=(normalizer == "text"))
    if normalizer == "list":
        return _same_items(_items(body), _items(record.answer))
    raise SsahError(f"record {record.id!r}: unknown normalizer {normalizer!r}; known: {', '.join(NORMALIZERS)}")
