"""The seeded checkable-task generator: deterministic, and every answer recomputed independently."""

from __future__ import annotations

import calendar
import datetime as dt
import re

import pytest

from ssah.data import check_answer, generate_tasks, load_dataset
from ssah.data.tasks import TASK_KINDS
from ssah.errors import SsahError

MONTH = {name: i for i, name in enumerate(calendar.month_name) if name}
FACTORS = {("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7,
           ("years", "months"): 12, ("metres", "centimetres"): 100, ("kilometres", "metres"): 1000,
           ("kilograms", "grams"): 1000, ("litres", "millilitres"): 1000, ("feet", "inches"): 12,
           ("yards", "feet"): 3, ("centimetres", "millimetres"): 10}
# A few facts checked by hand, independent of the tables in ssah.data.tasks.
KNOWN = {("capital", "France"): "Paris", ("capital", "Japan"): "Tokyo", ("capital", "Canada"): "Ottawa",
         ("capital", "Kenya"): "Nairobi", ("capital", "Australia"): "Canberra",
         ("continent", "Brazil"): "South America", ("continent", "Egypt"): "Africa", ("continent", "Nepal"): "Asia",
         ("chemical_symbol", "iron"): "Fe", ("chemical_symbol", "gold"): "Au", ("chemical_symbol", "sodium"): "Na",
         ("chemical_symbol", "lead"): "Pb"}


def parse_date(text: str) -> dt.date:
    day, month, year = text.split()
    return dt.date(int(year), MONTH[month], int(day))


def quoted(prompt: str) -> list[str]:
    return re.findall(r"'([^']*)'", prompt)


def after_colon_list(prompt: str) -> list[str]:
    body = re.search(r": (.*?)[.?] Answer", prompt).group(1)
    return body.split(", ")


def recompute(kind: str, prompt: str) -> str:
    """The answer, computed from the prompt text alone."""
    nums = [int(n) for n in re.findall(r"\d+", prompt)]
    if kind == "addition":
        return str(nums[0] + nums[1])
    if kind == "subtraction":
        return str(nums[0] - nums[1])
    if kind == "multiplication":
        return str(nums[0] * nums[1])
    if kind == "division":
        assert nums[0] % nums[1] == 0
        return str(nums[0] // nums[1])
    if kind == "unit_conversion":
        target, value, source = re.match(r"How many (\w+) are in (\d+) (\w+)\?", prompt).groups()
        return str(int(value) * FACTORS[(source, target)])
    if kind == "reverse_word":
        return "".join(reversed(quoted(prompt)[0]))
    if kind == "uppercase":
        return quoted(prompt)[0].upper()
    if kind == "letter_count":
        letter, word = quoted(prompt)
        return str(sum(1 for ch in word if ch == letter))
    if kind == "word_length":
        return str(len(quoted(prompt)[0]))
    if kind == "sort_numbers":
        return ", ".join(str(n) for n in sorted(int(x) for x in after_colon_list(prompt)))
    if kind == "sort_words":
        return ", ".join(sorted(after_colon_list(prompt)))
    if kind == "day_of_week":
        day = parse_date(re.search(r"is (\d+ \w+ \d{4})\?", prompt).group(1))
        return calendar.day_name[day.weekday()]
    if kind == "days_between":
        start, end = re.search(r"after (\d+ \w+ \d{4}) is (\d+ \w+ \d{4})\?", prompt).groups()
        return str((parse_date(end) - parse_date(start)).days)
    if kind == "count_items":
        return str(len(after_colon_list(prompt)))
    if kind == "largest_number":
        return str(max(int(x) for x in after_colon_list(prompt)))
    if kind == "next_in_sequence":
        seq = [int(x) for x in re.search(r"sequence ([\d, ]+)\?", prompt).group(1).split(", ")]
        steps = {b - a for a, b in zip(seq, seq[1:])}
        assert len(steps) == 1
        return str(seq[-1] + steps.pop())
    raise AssertionError(f"no independent recomputation for {kind}")


LOOKUP_KINDS = {"capital", "continent", "chemical_symbol"}


def test_same_seed_same_tasks_other_seed_other_tasks():
    a, b, c = generate_tasks(200, seed=7), generate_tasks(200, seed=7), generate_tasks(200, seed=8)
    assert a == b
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_generated_tasks_are_distinct_and_cover_every_kind():
    records = generate_tasks(400, seed=0)
    assert len({r.prompt for r in records}) == 400
    assert {r.category for r in records} == set(TASK_KINDS)
    assert {r.category for r in records[:len(TASK_KINDS)]} == set(TASK_KINDS)


@pytest.mark.parametrize("seed", [0, 1, 1410])
def test_every_answer_recomputed_independently(seed):
    checked_lookups = 0
    for record in generate_tasks(600, seed=seed):
        assert record.response == record.answer
        assert record.prompt.endswith("only.") or "only, separated by commas." in record.prompt
        if record.category in LOOKUP_KINDS:
            subject = re.search(r"(?:capital of|continent is|symbol for) (.+?)\?", record.prompt).group(1)
            expected = KNOWN.get((record.category, subject.removeprefix("the ")))
            if expected is not None:
                assert record.answer == expected, record
                checked_lookups += 1
        else:
            assert record.answer == recompute(record.category, record.prompt), record
        assert check_answer(record, record.answer), record  # the reference reply passes its own check
    assert checked_lookups > 0


def test_benign_builtin_answers_recomputed():
    for record in load_dataset("benign"):
        if record.answer is not None and record.category not in LOOKUP_KINDS:
            assert record.answer == recompute(record.category, record.prompt), record


def test_kind_filter_and_errors():
    records = generate_tasks(30, seed=2, kinds=("addition", "capital"))
    assert {r.category for r in records} == {"addition", "capital"}
    with pytest.raises(SsahError, match="unknown task kind"):
        generate_tasks(5, seed=0, kinds=("calculus",))
    with pytest.raises(SsahError, match="only"):
        generate_tasks(10_000, seed=0, kinds=("chemical_symbol",))
