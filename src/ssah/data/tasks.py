"""Seeded generator of short checkable tasks (arithmetic, conversions, strings, sorting, dates,
counting, lookups) with exact answers and a named normaliser (see `ssah.data.answers`).

Every prompt asks for the bare answer ("... Answer with the number only.") so that even a 135M model
has a real chance. Tasks are drawn round-robin over the kinds in `TASK_KINDS`, so any prefix of
19 or more tasks covers every kind; a task is never repeated within one generation (each has a key,
e.g. the operands, and a drawn key already used is redrawn).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ssah.data.records import Record
from ssah.errors import SsahError

NUMBER_ONLY = "Answer with the number only."
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

# (country, capital, continent). Countries with a contested capital or spanning two continents are left out.
COUNTRIES = (
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("the Netherlands", "Amsterdam", "Europe"),
    ("Belgium", "Brussels", "Europe"), ("Austria", "Vienna", "Europe"), ("Switzerland", "Bern", "Europe"),
    ("Poland", "Warsaw", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Norway", "Oslo", "Europe"),
    ("Finland", "Helsinki", "Europe"), ("Denmark", "Copenhagen", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("Greece", "Athens", "Europe"), ("Hungary", "Budapest", "Europe"), ("the Czech Republic", "Prague", "Europe"),
    ("Romania", "Bucharest", "Europe"), ("Ukraine", "Kyiv", "Europe"), ("Iceland", "Reykjavik", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("Indonesia", "Jakarta", "Asia"), ("the Philippines", "Manila", "Asia"), ("Pakistan", "Islamabad", "Asia"),
    ("Iran", "Tehran", "Asia"), ("Iraq", "Baghdad", "Asia"), ("Saudi Arabia", "Riyadh", "Asia"),
    ("Nepal", "Kathmandu", "Asia"), ("Mongolia", "Ulaanbaatar", "Asia"), ("Lebanon", "Beirut", "Asia"),
    ("Jordan", "Amman", "Asia"), ("Afghanistan", "Kabul", "Asia"), ("Bangladesh", "Dhaka", "Asia"),
    ("Malaysia", "Kuala Lumpur", "Asia"), ("Cambodia", "Phnom Penh", "Asia"), ("Qatar", "Doha", "Asia"),
    ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"), ("Ghana", "Accra", "Africa"), ("Morocco", "Rabat", "Africa"),
    ("Senegal", "Dakar", "Africa"), ("Uganda", "Kampala", "Africa"), ("Zimbabwe", "Harare", "Africa"),
    ("Algeria", "Algiers", "Africa"), ("Tunisia", "Tunis", "Africa"), ("Angola", "Luanda", "Africa"),
    ("Zambia", "Lusaka", "Africa"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"), ("Brazil", "Brasília", "South America"),
    ("Argentina", "Buenos Aires", "South America"), ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"), ("Colombia", "Bogotá", "South America"),
    ("Venezuela", "Caracas", "South America"), ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"), ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"), ("Fiji", "Suva", "Oceania"),
)

# (element, symbol)
ELEMENTS = (
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("beryllium", "Be"), ("boron", "B"),
    ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"),
    ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"),
    ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"),
    ("titanium", "Ti"), ("vanadium", "V"), ("chromium", "Cr"), ("manganese", "Mn"), ("iron", "Fe"),
    ("cobalt", "Co"), ("nickel", "Ni"), ("copper", "Cu"), ("zinc", "Zn"), ("gallium", "Ga"),
    ("germanium", "Ge"), ("arsenic", "As"), ("selenium", "Se"), ("bromine", "Br"), ("krypton", "Kr"),
    ("rubidium", "Rb"), ("strontium", "Sr"), ("zirconium", "Zr"), ("molybdenum", "Mo"), ("palladium", "Pd"),
    ("silver", "Ag"), ("cadmium", "Cd"), ("tin", "Sn"), ("antimony", "Sb"), ("iodine", "I"),
    ("xenon", "Xe"), ("barium", "Ba"), ("tungsten", "W"), ("platinum", "Pt"), ("gold", "Au"),
    ("mercury", "Hg"), ("lead", "Pb"), ("bismuth", "Bi"), ("radon", "Rn"), ("uranium", "U"),
    ("plutonium", "Pu"),
)

# Plain lowercase words (letters only) for the string and sorting tasks.
WORDS = (
    "apple", "banana", "cherry", "garden", "window", "pencil", "rabbit", "turtle", "orange", "yellow",
    "silver", "planet", "rocket", "forest", "river", "mountain", "island", "bridge", "castle", "dragon",
    "jacket", "kitchen", "ladder", "marble", "needle", "pepper", "puzzle", "saddle", "tunnel", "violin",
    "wallet", "basket", "candle", "doctor", "engine", "finger", "guitar", "hammer", "insect", "jungle",
    "kettle", "lemon", "mirror", "number", "oyster", "parrot", "quartz", "ribbon", "spider", "tomato",
    "umbrella", "valley", "walrus", "zipper", "anchor", "button", "carpet", "desert", "falcon", "goblet",
    "harbor", "iceberg", "jigsaw", "lantern", "meadow", "napkin", "orchard", "pillow", "rainbow", "shadow",
    "thunder", "village", "whistle", "blanket", "cabbage", "dolphin", "feather", "giraffe", "horizon", "kingdom",
    "library", "monkey", "octopus", "penguin", "pumpkin", "sandwich", "teacher", "volcano", "weather", "balloon",
    "biscuit", "chimney", "compass", "diamond", "elephant", "festival", "glacier", "hospital", "journey", "mustard",
    "notebook", "pyramid", "squirrel", "treasure", "unicorn", "vanilla", "waffle", "yogurt", "zebra", "coffee",
)

UNIT_CONVERSIONS = (  # (from unit, to unit, factor): answers stay whole numbers
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("years", "months", 12), ("metres", "centimetres", 100), ("kilometres", "metres", 1000),
    ("kilograms", "grams", 1000), ("litres", "millilitres", 1000), ("feet", "inches", 12),
    ("yards", "feet", 3), ("centimetres", "millimetres", 10),
)


@dataclass(frozen=True)
class Task:
    """One checkable task; `key` identifies the question (two draws with equal keys are one task)."""

    kind: str
    key: tuple
    prompt: str
    answer: str
    normalizer: str


def _date_text(day: dt.date) -> str:
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def _distinct_ints(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    return rng.sample(range(low, high + 1), count)


def _addition(rng: random.Random) -> Task:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return Task("addition", (a, b), f"What is {a} + {b}? {NUMBER_ONLY}", str(a + b), "number")


def _subtraction(rng: random.Random) -> Task:
    a = rng.randint(20, 99)
    b = rng.randint(1, a - 1)
    return Task("subtraction", (a, b), f"What is {a} - {b}? {NUMBER_ONLY}", str(a - b), "number")


def _multiplication(rng: random.Random) -> Task:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return Task("multiplication", (a, b), f"What is {a} times {b}? {NUMBER_ONLY}", str(a * b), "number")


def _division(rng: random.Random) -> Task:
    quotient, divisor = rng.randint(2, 12), rng.randint(2, 12)
    return Task("division", (quotient * divisor, divisor),
                f"What is {quotient * divisor} divided by {divisor}? {NUMBER_ONLY}", str(quotient), "number")


def _unit_conversion(rng: random.Random) -> Task:
    source, target, factor = rng.choice(UNIT_CONVERSIONS)
    value = rng.randint(2, 15)
    return Task("unit_conversion", (source, target, value),
                f"How many {target} are in {value} {source}? {NUMBER_ONLY}", str(value * factor), "number")


def _reverse_word(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    return Task("reverse_word", (word,), f"Write the word '{word}' backwards. Answer with the reversed word only.",
                word[::-1], "text")


def _uppercase(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    return Task("uppercase", (word,), f"Write the word '{word}' in capital letters. Answer with that word only.",
                word.upper(), "exact")


def _letter_count(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    return Task("letter_count", (word, letter),
                f"How many times does the letter '{letter}' appear in the word '{word}'? {NUMBER_ONLY}",
                str(word.count(letter)), "number")


def _word_length(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    return Task("word_length", (word,), f"How many letters are in the word '{word}'? {NUMBER_ONLY}",
                str(len(word)), "number")


def _sort_numbers(rng: random.Random) -> Task:
    numbers = _distinct_ints(rng, rng.randint(3, 6), 1, 99)
    shown = ", ".join(map(str, numbers))
    return Task("sort_numbers", tuple(sorted(numbers)),
                f"Sort these numbers from smallest to largest: {shown}. "
                "Answer with the sorted numbers only, separated by commas.",
                ", ".join(map(str, sorted(numbers))), "list")


def _sort_words(rng: random.Random) -> Task:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Task("sort_words", tuple(sorted(words)),
                f"Sort these words alphabetically: {', '.join(words)}. "
                "Answer with the sorted words only, separated by commas.",
                ", ".join(sorted(words)), "list")


def _day_of_week(rng: random.Random) -> Task:
    day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(81 * 365))
    return Task("day_of_week", (day,), f"What day of the week is {_date_text(day)}? Answer with the day name only.",
                day.strftime("%A"), "text")


def _days_between(rng: random.Random) -> Task:
    start = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(30 * 365))
    end = start + dt.timedelta(days=rng.randint(2, 90))
    return Task("days_between", (start, end),
                f"How many days after {_date_text(start)} is {_date_text(end)}? {NUMBER_ONLY}",
                str((end - start).days), "number")


def _count_items(rng: random.Random) -> Task:
    items = rng.sample(WORDS, rng.randint(3, 9))
    return Task("count_items", tuple(sorted(items)),
                f"How many words are in this list: {', '.join(items)}? {NUMBER_ONLY}", str(len(items)), "number")


def _largest_number(rng: random.Random) -> Task:
    numbers = _distinct_ints(rng, rng.randint(3, 6), 1, 999)
    return Task("largest_number", tuple(sorted(numbers)),
                f"What is the largest number in this list: {', '.join(map(str, numbers))}? {NUMBER_ONLY}",
                str(max(numbers)), "number")


def _next_in_sequence(rng: random.Random) -> Task:
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    shown = ", ".join(str(start + step * i) for i in range(4))
    return Task("next_in_sequence", (start, step), f"What number comes next in the sequence {shown}? {NUMBER_ONLY}",
                str(start + step * 4), "number")


def _capital(rng: random.Random) -> Task:
    country, capital, _ = rng.choice(COUNTRIES)
    return Task("capital", (country,), f"What is the capital of {country}? Answer with the city name only.",
                capital, "text")


def _continent(rng: random.Random) -> Task:
    # Oceania is left out: "Australia" would be an equally right answer for it.
    country, _, continent = rng.choice([row for row in COUNTRIES if row[2] != "Oceania"])
    return Task("continent", (country,), f"On which continent is {country}? Answer with the continent name only.",
                continent, "text")


def _chemical_symbol(rng: random.Random) -> Task:
    element, symbol = rng.choice(ELEMENTS)
    return Task("chemical_symbol", (element,),
                f"What is the chemical symbol for {element}? Answer with the symbol only.", symbol, "text")


TASK_KINDS: dict[str, Callable[[random.Random], Task]] = {
    "addition": _addition, "subtraction": _subtraction, "multiplication": _multiplication,
    "division": _division, "unit_conversion": _unit_conversion, "reverse_word": _reverse_word,
    "uppercase": _uppercase, "letter_count": _letter_count, "word_length": _word_length,
    "sort_numbers": _sort_numbers, "sort_words": _sort_words, "day_of_week": _day_of_week,
    "days_between": _days_between, "count_items": _count_items, "largest_number": _largest_number,
    "next_in_sequence": _next_in_sequence, "capital": _capital, "continent": _continent,
    "chemical_symbol": _chemical_symbol,
}

_MAX_REDRAWS = 200  # a kind that yields no unseen key in this many draws is used up


def iter_tasks(seed: int, kinds: tuple[str, ...] | None = None) -> Iterator[Task]:
    """Distinct tasks, round-robin over `kinds` (default all), deterministic for `seed`.

    Stops when every kind is used up (the lookup kinds have finitely many questions)."""
    kinds = tuple(kinds or TASK_KINDS)
    unknown = [kind for kind in kinds if kind not in TASK_KINDS]
    if unknown:
        raise SsahError(f"unknown task kind {unknown[0]!r}; known: {', '.join(TASK_KINDS)}")
    rng = random.Random(seed)
    seen: set[tuple] = set()
    active = list(kinds)
    while active:
        for kind in list(active):
            for _ in range(_MAX_REDRAWS):
                task = TASK_KINDS[kind](rng)
                if (kind, task.key) not in seen:
                    seen.add((kind, task.key))
                    yield task
                    break
            else:
                active.remove(kind)


def generate_tasks(count: int, seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[Record]:
    """`count` distinct checkable task records for `seed` (same seed, same records).

    Each record: category = task kind, answer = the exact answer, response = the answer (a reference
    reply for fine-tuning), normalizer = how `check_answer` compares replies.
    """
    records = []
    for index, task in enumerate(iter_tasks(seed, kinds)):
        if index == count:
            break
        records.append(Record(id=f"tasks-seed{seed}/{index}", prompt=task.prompt, response=task.answer,
                              category=task.kind, source="ssah-tasks", answer=task.answer,
                              normalizer=task.normalizer))
    if len(records) < count:
        raise SsahError(f"only {len(records)} distinct tasks exist for these kinds; asked for {count}")
    return records
