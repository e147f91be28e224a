"""`load_dataset(spec)`: one entry point for built-in sets, standard files and hub ids.

Spec forms:
- `NAME` or `NAME:SPLIT` for built-ins: harmful, benign, sensitive_safe, refusals, compliance_openings,
  text (e.g. `harmful:test`, `benign:calibration`; `NAME` alone = all splits).
- `FORMAT:PATH` for files: advbench, harmbench, strongreject, hexphi (a folder), xstest, xstest-safe,
  xstest-unsafe, alpaca, dolly, jsonl, csv.
- Column mapping (jsonl and csv only): `jsonl:PATH?prompt=question&response=answer`. Keys are Record
  fields (id, prompt, response, category, source, answer, normalizer); values are column names. An
  unmapped field is read from the column of the same name when there is one; `prompt` is required.
- `hf:ORG/NAME[:SPLIT][?FIELD=COLUMN&...]` for a Hugging Face hub dataset: needs the `datasets`
  package and network, and is refused while HF_HUB_OFFLINE is set.
- Any of these followed by `[take=N]` or `[sample=N,seed=S]` (repeatable): the subset that
  `Dataset.take` / `Dataset.sample` name this way, so a dataset name recorded in a manifest loads back.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl

from ssah.data.catalog import BUILTIN_NAMES, load_builtin
from ssah.data.formats import FILE_FORMATS, MAPPING_FORMATS, load_hub
from ssah.data.records import RECORD_FIELDS, Dataset, Record
from ssah.errors import SsahError

SPEC_HELP = ("built-in NAME[:SPLIT] (" + ", ".join(BUILTIN_NAMES) + "); FORMAT:PATH ("
             + ", ".join(FILE_FORMATS) + "); jsonl/csv take a column mapping FIELD=COLUMN for the fields "
             + ", ".join(RECORD_FIELDS) + ", e.g. jsonl:PATH?prompt=question&response=answer; "
             "or hf:ORG/NAME[:SPLIT] (online only)")


def _split_mapping(spec: str, rest: str) -> tuple[str, dict[str, str]]:
    """Split `PATH?field=column&...` into the path and the mapping."""
    if "?" not in rest:
        return rest, {}
    path, _, query = rest.rpartition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise SsahError(f"{spec}: bad column mapping {query!r}; write it as ?prompt=COLUMN&response=COLUMN") from None
    mapping: dict[str, str] = {}
    for key, column in pairs:
        if key not in RECORD_FIELDS:
            raise SsahError(f"{spec}: unknown field {key!r} in the column mapping; fields: {', '.join(RECORD_FIELDS)}")
        if not column:
            raise SsahError(f"{spec}: field {key!r} is mapped to an empty column name")
        mapping[key] = column
    return path, mapping


MAX_RECORD_CHARS = 1_000_000  # far beyond any prompt a model's context takes


def _check(spec: str, records: list[Record]) -> None:
    if not records:
        raise SsahError(f"dataset {spec!r} has no records; check the file (and the split or label filter)")
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise SsahError(f"dataset {spec!r}: duplicate record id {record.id!r}; ids must be unique")
        seen.add(record.id)
        longest = max(len(record.prompt), len(record.response or ""))
        if longest > MAX_RECORD_CHARS:
            raise SsahError(f"dataset {spec!r}: record {record.id!r} holds {longest:,} characters, more than any "
                            f"model context takes ({MAX_RECORD_CHARS:,}); is the file one record per line?")


_SUBSET = re.compile(r"^(.*)\[(?:take=(\d+)|sample=(\d+),seed=(\d+))\]$", re.S)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a spec (forms in the module docstring); the Dataset is named `spec`.

    Raises SsahError (one line) for an unknown name or format, a missing or malformed file, an unknown
    split, or a dataset with no records.
    """
    spec = spec.strip() if isinstance(spec, str) else ""
    if not spec:
        raise SsahError("empty dataset spec; give one like harmful:train, benign:calibration or jsonl:PATH")
    subset = _SUBSET.match(spec)
    if subset:  # NAME[take=N] / NAME[sample=N,seed=S], as Dataset.take / Dataset.sample name them
        base, take, sample, seed = subset.groups()
        dataset = load_dataset(base)
        return dataset.take(int(take)) if take is not None else dataset.sample(int(sample), int(seed))
    head, sep, rest = spec.partition(":")
    if head in BUILTIN_NAMES:
        records = load_builtin(head, rest if sep else None)
    elif head in FILE_FORMATS:
        if not rest:
            raise SsahError(f"{spec!r}: {head} needs a path, e.g. {head}:PATH")
        options: dict[str, str] = {}
        if head in MAPPING_FORMATS:
            rest, options = _split_mapping(spec, rest)
        loader, _ = FILE_FORMATS[head]
        records = loader(Path(rest).expanduser(), options)
    elif head == "hf":
        name, options = _split_mapping(spec, rest)
        name, _, split = name.partition(":")
        if not name:
            raise SsahError(f"{spec!r}: name the hub dataset, e.g. hf:walledai/AdvBench")
        records = load_hub(name, split or None, options)
    else:
        raise SsahError(f"unknown dataset {spec!r}; known: {SPEC_HELP}")
    _check(spec, records)
    return Dataset(spec, records)
