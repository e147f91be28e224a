"""check_answer with hand-written replies for each normaliser."""

from __future__ import annotations

import pytest

from ssah.data import Record, check_answer
from ssah.errors import SsahError


def rec(answer: str, normalizer: str | None) -> Record:
    return Record(id="t", prompt="q", answer=answer, normalizer=normalizer)


@pytest.mark.parametrize("reply, ok", [
    ("42", True), ("42.", True), ("42.0", True), ("The answer is 42.", True), ("Answer: 42", True),
    ("It's 42, of course.", True), ("**42**", True), ("42 apples", True), ("\n 42 \n", True),
    ("43", False), ("4.2", False), ("420", False), ("forty-two", False), ("", False),
    ("I think 41, no wait 42", False),  # the first number counts (documented)
])
def test_number(reply, ok):
    assert check_answer(rec("42", "number"), reply) is ok


def test_number_signs_thousands_and_decimals():
    assert check_answer(rec("-7", "number"), "-7")
    assert not check_answer(rec("-7", "number"), "7")
    assert check_answer(rec("1234", "number"), "1,234")
    assert check_answer(rec("2.5", "number"), "2.50 litres")
    assert not check_answer(rec("19", "number"), "COVID-19")  # digits glued to a word are not a number


@pytest.mark.parametrize("reply, ok", [
    ("Paris", True), ("paris", True), ("PARIS.", True), ("  Paris!  ", True), ("Paris is the capital.", True),
    ("Answer: Paris", True), ("Paris\nIt is in France.", True), ("The capital is Paris.", False),
    ("Lyon", False), ("Parisian", False),
])
def test_text(reply, ok):
    assert check_answer(rec("Paris", "text"), reply) is ok


def test_text_multiword_and_accents():
    assert check_answer(rec("Buenos Aires", "text"), "buenos aires, of course")
    assert check_answer(rec("Bogotá", "text"), "Bogota")
    assert check_answer(rec("Mexico City", "text"), "Mexico City.")
    assert not check_answer(rec("Mexico City", "text"), "Mexico")


def test_exact_is_case_sensitive():
    assert check_answer(rec("BANANA", "exact"), "BANANA")
    assert check_answer(rec("BANANA", "exact"), "'BANANA'.")
    assert not check_answer(rec("BANANA", "exact"), "banana")
    assert not check_answer(rec("BANANA", "exact"), "Banana")


@pytest.mark.parametrize("reply, ok", [
    ("3, 5, 9", True), ("[3, 5, 9]", True), ("3, 5, 9.", True), ("3 5 9", True), ("Sorted: 3, 5, 9", True),
    ("3.0, 5, 9", True), ("3, 9, 5", False), ("3, 5", False), ("3, 5, 9, 10", False),
])
def test_list_of_numbers(reply, ok):
    assert check_answer(rec("3, 5, 9", "list"), reply) is ok


def test_list_of_words():
    record = rec("apple, mango, pear", "list")
    assert check_answer(record, "Apple, Mango, Pear")
    assert check_answer(record, "apple, mango, pear\n(sorted alphabetically)")
    assert not check_answer(record, "pear, mango, apple")


def test_default_normaliser_is_text_and_errors():
    assert check_answer(rec("Paris", None), "paris")
    with pytest.raises(SsahError, match="no answer"):
        check_answer(Record(id="x", prompt="q"), "42")
    with pytest.raises(SsahError, match="unknown normalizer 'fuzzy'"):
        check_answer(rec("a", "fuzzy"), "a")
