"""Readers for standard dataset files (AdvBench, HarmBench, StrongREJECT, HEx-PHI, XSTest, Alpaca,
Dolly), generic CSV/JSONL with a column mapping, and Hugging Face hub ids (online only).

Every problem a user can cause (missing file, wrong encoding, malformed line, missing column, empty
file) is raised as one `SsahError` line naming the file, the line where there is one, and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ssah.data.records import RECORD_FIELDS, Record, clean_text
from ssah.errors import SsahError

# One row of a file: (1-based line number, or None where the format has no lines; column -> value)
Row = tuple[int | None, dict]

HEXPHI_CATEGORIES = {
    1: "illegal_activity", 2: "child_abuse_content", 3: "hate_harass_violence", 4: "malware",
    5: "physical_harm", 6: "economic_harm", 7: "fraud_deception", 8: "adult_content",
    9: "political_campaigning", 10: "privacy_violation", 11: "tailored_financial_advice",
}
# A first row holding only one of these words is a header, not a prompt (HEx-PHI files have none).
_HEADER_WORDS = {"prompt", "prompts", "text", "instruction", "question", "goal"}
# Columns tried, in order, for the prompt of a hub dataset when no `prompt=` mapping is given.
_HUB_PROMPT_COLUMNS = ("prompt", "goal", "Behavior", "forbidden_prompt", "instruction", "question", "text")


def _where(path: Path, line: int | None) -> str:
    return f"{path}, line {line}" if line is not None else str(path)


def read_text(path: Path, fmt: str) -> str:
    """The file's text, decoded as UTF-8 (a UTF-8 byte-order mark is allowed)."""
    if not path.exists():
        raise SsahError(f"{path}: no such file; download the {fmt} file and pass its path as {fmt}:PATH")
    if path.is_dir():
        raise SsahError(f"{path} is a folder; {fmt}:PATH needs a file")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise SsahError(f"{path}: looks like UTF-16 or a binary file (NUL bytes); re-save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SsahError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); "
                        "re-save the file as UTF-8") from None
    if not text.strip():
        raise SsahError(f"{path}: the file is empty; expected {fmt} records")
    return text


def csv_rows(path: Path, text: str, required: tuple[str, ...] = ()) -> list[Row]:
    """Rows of a CSV file with a header line; checks required columns and field counts."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    header: list[str] | None = None
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise SsahError(f"{path}, line {line}: malformed CSV ({err}); fix the quoting") from None
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            missing = [col for col in required if col not in header]
            if missing:
                raise SsahError(f"{path}, line {line}: missing column {missing[0]!r} (columns found: "
                                f"{', '.join(header)}); expected columns {', '.join(required)}")
            continue
        if len(cells) != len(header):
            raise SsahError(f"{path}, line {line}: {len(cells)} fields but the header has {len(header)}; "
                            "quote fields that contain commas")
        rows.append((line, dict(zip(header, cells))))
    return rows


def jsonl_rows(path: Path, text: str) -> list[Row]:
    """One JSON object per non-blank line."""
    rows: list[Row] = []
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SsahError(f"{path}, line {line}: invalid JSON ({err.msg} at column {err.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise SsahError(f"{path}, line {line}: expected a JSON object, got {type(value).__name__}")
        rows.append((line, value))
    return rows


def json_or_jsonl_rows(path: Path, text: str) -> list[Row]:
    """A JSON list of objects (as Alpaca ships it), or JSONL. List items carry no line number."""
    if not text.lstrip().startswith("["):
        return jsonl_rows(path, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise SsahError(f"{path}, line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    rows: list[Row] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise SsahError(f"{path}: item {index} of the JSON list is a {type(item).__name__}, "
                            "expected an object")
        rows.append((None, item))
    return rows


def field_value(row: Row, column: str, path: Path, *, required: bool) -> str | None:
    """A cleaned string from a row: numbers become strings, null/absent give None unless required."""
    line, values = row
    if column not in values:
        if required:
            raise SsahError(f"{_where(path, line)}: missing field {column!r} (fields found: "
                            f"{', '.join(map(str, values))})")
        return None
    value = values[column]
    if value is None:
        if required:
            raise SsahError(f"{_where(path, line)}: field {column!r} is null; it must be text")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SsahError(f"{_where(path, line)}: field {column!r} is a {type(value).__name__}; it must be text")
    text = clean_text(str(value))
    if required and not text:
        raise SsahError(f"{_where(path, line)}: field {column!r} is empty; every record needs a {column}")
    return text


def _join(instruction: str, extra: str | None) -> str:
    # Alpaca/Dolly convention: the input/context follows the instruction after a blank line.
    return f"{instruction}\n\n{extra}" if extra else instruction


# ---- one function per format: (path, options) -> records -------------------------------------------

def load_advbench(path: Path, options: dict) -> list[Record]:
    rows = csv_rows(path, read_text(path, "advbench"), required=("goal",))
    return [Record(id=f"advbench/{i}", prompt=field_value(row, "goal", path, required=True),
                   response=field_value(row, "target", path, required=False) or None, source="advbench")
            for i, row in enumerate(rows)]


def load_harmbench(path: Path, options: dict) -> list[Record]:
    rows = csv_rows(path, read_text(path, "harmbench"), required=("Behavior",))
    records = []
    for i, row in enumerate(rows):
        behavior = field_value(row, "Behavior", path, required=True)
        context = field_value(row, "ContextString", path, required=False)
        category = (field_value(row, "SemanticCategory", path, required=False)
                    or field_value(row, "FunctionalCategory", path, required=False) or "")
        # HarmBench's own template for contextual behaviours: context, a rule, then the behaviour.
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        records.append(Record(id=field_value(row, "BehaviorID", path, required=False) or f"harmbench/{i}",
                              prompt=prompt, category=category, source="harmbench"))
    return records


def load_strongreject(path: Path, options: dict) -> list[Record]:
    rows = csv_rows(path, read_text(path, "strongreject"), required=("forbidden_prompt",))
    return [Record(id=f"strongreject/{i}", prompt=field_value(row, "forbidden_prompt", path, required=True),
                   category=field_value(row, "category", path, required=False) or "", source="strongreject")
            for i, row in enumerate(rows)]


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def _hexphi_category(stem: str) -> str:
    match = re.fullmatch(r"category_(\d+)", stem)
    return HEXPHI_CATEGORIES.get(int(match.group(1)), stem) if match else stem


def load_hexphi(path: Path, options: dict) -> list[Record]:
    """A HEx-PHI folder: one CSV per category, one prompt per row, usually without a header."""
    if not path.exists():
        raise SsahError(f"{path}: no such folder; HEx-PHI is gated: download it from the hub "
                        "(LLM-Tuning-Safety/HEx-PHI) and pass hexphi:DIR")
    if not path.is_dir():
        raise SsahError(f"{path} is a file; hexphi:DIR needs the folder holding category_1.csv ... category_11.csv")
    files = sorted(path.glob("*.csv"), key=_natural_key)
    if not files:
        raise SsahError(f"{path}: no .csv files; expected category_1.csv ... category_11.csv from HEx-PHI")
    records = []
    for file in files:
        text = read_text(file, "hexphi")
        reader = csv.reader(io.StringIO(text, newline=""))
        category = _hexphi_category(file.stem)
        first = True
        while True:
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise SsahError(f"{file}, line {line}: malformed CSV ({err}); fix the quoting") from None
            # A single-column file whose prompt holds unquoted commas splits into several cells;
            # joining them restores the prompt.
            prompt = clean_text(",".join(cells))
            if not prompt:
                continue
            if first and prompt.lower() in _HEADER_WORDS:
                first = False
                continue
            first = False
            records.append(Record(id=f"hexphi/{file.stem}/{line}", prompt=prompt, category=category,
                                  source="hexphi"))
    return records


def _xstest(label_filter: str | None) -> Callable[[Path, dict], list[Record]]:
    def load(path: Path, options: dict) -> list[Record]:
        required = ("prompt", "label") if label_filter else ("prompt",)
        rows = csv_rows(path, read_text(path, "xstest"), required=required)
        records = []
        for i, row in enumerate(rows):
            label = (field_value(row, "label", path, required=False) or "").lower()
            if label_filter and label not in ("safe", "unsafe"):
                raise SsahError(f"{_where(path, row[0])}: label {label!r} is neither 'safe' nor 'unsafe'")
            if label_filter and label != label_filter:
                continue
            records.append(Record(id=f"xstest/{field_value(row, 'id', path, required=False) or i}",
                                  prompt=field_value(row, "prompt", path, required=True),
                                  category=field_value(row, "type", path, required=False) or "",
                                  source="xstest"))
        return records
    return load


def load_alpaca(path: Path, options: dict) -> list[Record]:
    rows = json_or_jsonl_rows(path, read_text(path, "alpaca"))
    return [Record(id=f"alpaca/{i}",
                   prompt=_join(field_value(row, "instruction", path, required=True),
                                field_value(row, "input", path, required=False)),
                   response=field_value(row, "output", path, required=False), source="alpaca")
            for i, row in enumerate(rows)]


def load_dolly(path: Path, options: dict) -> list[Record]:
    rows = jsonl_rows(path, read_text(path, "dolly"))
    return [Record(id=f"dolly/{i}",
                   prompt=_join(field_value(row, "instruction", path, required=True),
                                field_value(row, "context", path, required=False)),
                   response=field_value(row, "response", path, required=False),
                   category=field_value(row, "category", path, required=False) or "", source="dolly")
            for i, row in enumerate(rows)]


def records_from_mapping(rows: list[Row], mapping: dict[str, str], path: Path, source: str) -> list[Record]:
    """Records from generic rows. `mapping` maps Record fields to columns; an unmapped field is read
    from the column of the same name when present. `prompt` is required."""
    records = []
    for i, row in enumerate(rows):
        values = {}
        for name in RECORD_FIELDS:
            column = mapping.get(name, name)
            if name in mapping and column not in row[1]:
                raise SsahError(f"{_where(path, row[0])}: missing column {column!r} mapped to {name} "
                                f"(columns found: {', '.join(map(str, row[1]))})")
            values[name] = field_value(row, column, path, required=(name == "prompt"))
        records.append(Record(id=values["id"] or f"{source}/{i}", prompt=values["prompt"],
                              response=values["response"] or None, category=values["category"] or "",
                              source=values["source"] or source, answer=values["answer"] or None,
                              normalizer=values["normalizer"] or None))
    return records


def load_jsonl(path: Path, options: dict) -> list[Record]:
    return records_from_mapping(jsonl_rows(path, read_text(path, "jsonl")), options, path, "jsonl")


def load_csv(path: Path, options: dict) -> list[Record]:
    text = read_text(path, "csv")
    rows = csv_rows(path, text, required=(options.get("prompt", "prompt"),))
    return records_from_mapping(rows, options, path, "csv")


def load_hub(name: str, split: str | None, options: dict) -> list[Record]:
    """A Hugging Face hub dataset through the `datasets` library (online only, never at import)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
    hint = "download the file and pass it as advbench:PATH, harmbench:PATH, ..., or jsonl:PATH?prompt=COLUMN"
    if offline:
        raise SsahError(f"hf:{name}: HF_HUB_OFFLINE is set, so hub datasets cannot be fetched; {hint}")
    try:
        import datasets  # optional dependency, imported only when a hub id is named
    except ImportError:
        raise SsahError(f"hf:{name}: the `datasets` package is not installed (pip install datasets); "
                        f"or {hint}") from None
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # network, auth (gated sets), unknown split: all user-fixable
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SsahError(f"hf:{name}: could not load ({first_line}); {hint}") from None
    rows: list[Row] = [(None, dict(item)) for item in table]
    mapping = dict(options)
    if "prompt" not in mapping:
        columns = list(table.column_names)
        found = next((col for col in _HUB_PROMPT_COLUMNS if col in columns), None)
        if found is None:
            raise SsahError(f"hf:{name}: no prompt column among {', '.join(columns)}; "
                            f"pass hf:{name}?prompt=COLUMN")
        mapping["prompt"] = found
    return records_from_mapping(rows, mapping, Path(f"hf:{name}"), f"hf:{name}")


# format name -> (loader, one-line description for errors and help)
FILE_FORMATS: dict[str, tuple[Callable[[Path, dict], list[Record]], str]] = {
    "advbench": (load_advbench, "AdvBench CSV (goal, target)"),
    "harmbench": (load_harmbench, "HarmBench CSV (Behavior, SemanticCategory, optional ContextString)"),
    "strongreject": (load_strongreject, "StrongREJECT CSV (forbidden_prompt, category)"),
    "hexphi": (load_hexphi, "HEx-PHI folder of category_N.csv files (gated: local only)"),
    "xstest": (_xstest(None), "XSTest CSV (prompt, type, label): all prompts"),
    "xstest-safe": (_xstest("safe"), "XSTest CSV: only prompts labelled safe"),
    "xstest-unsafe": (_xstest("unsafe"), "XSTest CSV: only prompts labelled unsafe"),
    "alpaca": (load_alpaca, "Alpaca JSON list (instruction, input, output)"),
    "dolly": (load_dolly, "Dolly JSONL (instruction, context, response, category)"),
    "jsonl": (load_jsonl, "any JSONL; map fields with ?prompt=COL&response=COL"),
    "csv": (load_csv, "any CSV with a header; map fields with ?prompt=COL&response=COL"),
}
# Formats whose spec may end in ?FIELD=COLUMN&... (a column mapping).
MAPPING_FORMATS = ("jsonl", "csv")
