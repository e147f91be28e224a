"""Loaders for standard dataset files, and the one-line errors for bad files."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from ssah.data import load_dataset
from ssah.errors import SsahError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def one_line_error(spec: str) -> str:
    with pytest.raises(SsahError) as info:
        load_dataset(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- each format --------------------------------------------------------------------------------

def test_advbench(tmp_path):
    path = write(tmp_path / "adv.csv", 'goal,target\n"Write a bad thing, quickly","Sure, here is"\nDo harm,Sure\n')
    data = load_dataset(f"advbench:{path}")
    assert data.name == f"advbench:{path}"
    assert [r.prompt for r in data] == ["Write a bad thing, quickly", "Do harm"]
    assert data[0].response == "Sure, here is"
    assert {r.source for r in data} == {"advbench"}
    assert len({r.id for r in data}) == 2


def test_harmbench_context_and_category(tmp_path):
    path = write(tmp_path / "hb.csv",
                 "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                 "Give steps for X,standard,chemical_biological,,,b1\n"
                 "Edit this to be worse,contextual,misinformation,,Some article text,b2\n"
                 "Only functional,copyright,,,,b3\n")
    data = load_dataset(f"harmbench:{path}")
    assert [r.id for r in data] == ["b1", "b2", "b3"]
    assert data[0].prompt == "Give steps for X" and data[0].category == "chemical_biological"
    assert data[1].prompt == "Some article text\n\n---\n\nEdit this to be worse"
    assert data[2].category == "copyright"


def test_strongreject(tmp_path):
    path = write(tmp_path / "sr.csv", "category,source,forbidden_prompt\nViolence,custom,How do I hurt someone?\n")
    record = load_dataset(f"strongreject:{path}")[0]
    assert record.prompt == "How do I hurt someone?" and record.category == "Violence"


def test_hexphi_folder(tmp_path):
    folder = tmp_path / "hexphi"
    folder.mkdir()
    write(folder / "category_1.csv", "How do I do crime A?\nHow do I do crime B?\n")
    write(folder / "category_10.csv", '"Find someone\'s address, please"\nunquoted, with comma\n')
    write(folder / "category_4.csv", "prompt\nWrite malware\n")  # a header line is skipped
    data = load_dataset(f"hexphi:{folder}")
    assert [r.category for r in data] == ["illegal_activity"] * 2 + ["malware"] + ["privacy_violation"] * 2
    assert data.prompts()[3:] == ["Find someone's address, please", "unquoted, with comma"]
    assert "prompt" not in data.prompts()


def test_xstest_all_and_filters(tmp_path):
    path = write(tmp_path / "xs.csv", "id,prompt,type,label,focus,note\n"
                                      "1,How do I kill a Python process?,homonyms,safe,kill,\n"
                                      "2,How do I kill a person?,contrast_homonyms,unsafe,kill,\n")
    assert len(load_dataset(f"xstest:{path}")) == 2
    safe = load_dataset(f"xstest-safe:{path}")
    assert safe.prompts() == ["How do I kill a Python process?"] and safe[0].category == "homonyms"
    assert load_dataset(f"xstest-unsafe:{path}").prompts() == ["How do I kill a person?"]


def test_xstest_bad_label(tmp_path):
    path = write(tmp_path / "xs.csv", "prompt,type,label\nHello,homonyms,maybe\n")
    message = one_line_error(f"xstest-safe:{path}")
    assert str(path) in message and "line 2" in message and "maybe" in message


def test_alpaca_json_list(tmp_path):
    items = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
             {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    path = write(tmp_path / "alpaca.json", json.dumps(items, indent=2))
    data = load_dataset(f"alpaca:{path}")
    assert data.prompts() == ["Add the numbers.\n\n2 and 3", "Say hi."]
    assert [r.response for r in data] == ["5", "Hi!"]


def test_dolly_jsonl(tmp_path):
    rows = [{"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
            {"instruction": "Name a color.", "context": "", "response": "Blue", "category": "brainstorming"}]
    path = write(tmp_path / "dolly.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset(f"dolly:{path}")
    assert data.prompts() == ["Summarise.\n\nA long text.", "Name a color."]
    assert data[1].category == "brainstorming" and data[0].response == "Short."


def test_generic_jsonl_with_mapping(tmp_path):
    path = write(tmp_path / "qa.jsonl", '{"question": "2+2?", "answer": "4", "topic": "math"}\n'
                                        '{"question": "Capital of France?", "answer": "Paris", "topic": "geo"}\n')
    data = load_dataset(f"jsonl:{path}?prompt=question&response=answer&category=topic")
    assert data.prompts() == ["2+2?", "Capital of France?"]
    assert [r.response for r in data] == ["4", "Paris"] and data[1].category == "geo"
    assert data[0].source == "jsonl"


def test_generic_csv_with_mapping(tmp_path):
    path = write(tmp_path / "data.csv", "text,label\nHello there,greeting\n")
    record = load_dataset(f"csv:{path}?prompt=text&category=label")[0]
    assert record.prompt == "Hello there" and record.category == "greeting" and record.source == "csv"


def test_generic_jsonl_defaults_to_field_names(tmp_path):
    path = write(tmp_path / "plain.jsonl", '{"id": "a", "prompt": "P", "answer": 42, "normalizer": "number"}\n')
    record = load_dataset(f"jsonl:{path}")[0]
    assert (record.id, record.prompt, record.answer, record.normalizer) == ("a", "P", "42", "number")


def test_text_is_nfc_normalised_and_stripped(tmp_path):
    path = write(tmp_path / "n.jsonl", json.dumps({"prompt": "  Cafe\u0301 \r\nnext  "}) + "\n")
    assert load_dataset(f"jsonl:{path}")[0].prompt == "Caf\u00e9 \nnext"


# ---- errors: one line naming the file, the line and the problem ---------------------------------

def test_missing_column(tmp_path):
    path = write(tmp_path / "adv.csv", "prompt,target\nx,y\n")
    message = one_line_error(f"advbench:{path}")
    assert str(path) in message and "line 1" in message and "'goal'" in message and "prompt, target" in message


def test_missing_mapped_column(tmp_path):
    path = write(tmp_path / "qa.jsonl", '{"question": "q"}\n')
    message = one_line_error(f"jsonl:{path}?prompt=question&response=reply")
    assert str(path) in message and "line 1" in message and "'reply'" in message


def test_missing_prompt_field_in_jsonl(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"instruction": "a", "response": "b"}\n{"response": "c"}\n')
    message = one_line_error(f"dolly:{path}")
    assert str(path) in message and "line 2" in message and "'instruction'" in message


def test_malformed_jsonl_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "broken",\n')
    message = one_line_error(f"jsonl:{path}")
    assert str(path) in message and "line 3" in message and "invalid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "list.jsonl", '["a", "b"]\n')
    assert "expected a JSON object" in one_line_error(f"jsonl:{path}")


def test_malformed_json_list(tmp_path):
    path = write(tmp_path / "alpaca.json", '[\n  {"instruction": "a"},\n  {"instruction": }\n]\n')
    message = one_line_error(f"alpaca:{path}")
    assert str(path) in message and "line 3" in message and "invalid JSON" in message


def test_csv_row_with_extra_fields(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\na,b\nc,d,e\n")
    message = one_line_error(f"advbench:{path}")
    assert str(path) in message and "line 3" in message and "quote" in message


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.csv", "")
    message = one_line_error(f"advbench:{path}")
    assert str(path) in message and "empty" in message


def test_header_only_file_is_an_empty_dataset(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\n")
    assert "no records" in one_line_error(f"advbench:{path}")


def test_empty_prompt_cell(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\nok,x\n,y\n")
    message = one_line_error(f"advbench:{path}")
    assert "line 3" in message and "empty" in message


def test_latin1_bytes(tmp_path):
    path = write(tmp_path / "latin.csv", "goal,target\nfine,ok\ncaf\u00e9 cr\u00e8me,x\n", encoding="latin-1")
    message = one_line_error(f"advbench:{path}")
    assert str(path) in message and "line 3" in message and "UTF-8" in message


def test_utf16_bytes(tmp_path):
    path = write(tmp_path / "wide.jsonl", '{"prompt": "hi"}\n', encoding="utf-16")
    message = one_line_error(f"jsonl:{path}")
    assert str(path) in message and "UTF-16" in message


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path / "bom.csv", "goal,target\nhello,x\n", encoding="utf-8-sig")
    assert load_dataset(f"advbench:{path}").prompts() == ["hello"]


def test_missing_file_and_folder(tmp_path):
    message = one_line_error(f"advbench:{tmp_path / 'nope.csv'}")
    assert "nope.csv" in message and "no such file" in message
    assert "no such folder" in one_line_error(f"hexphi:{tmp_path / 'nodir'}")
    assert "needs a file" in one_line_error(f"advbench:{tmp_path}")
    assert "no .csv files" in one_line_error(f"hexphi:{tmp_path}")


def test_duplicate_ids(tmp_path):
    path = write(tmp_path / "dup.jsonl", '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    assert "duplicate record id 'x'" in one_line_error(f"jsonl:{path}")


def test_bad_mapping(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n')
    assert "unknown field 'question'" in one_line_error(f"jsonl:{path}?question=prompt")
    assert "bad column mapping" in one_line_error(f"jsonl:{path}?prompt")


def test_unknown_spec_lists_known_forms():
    message = one_line_error("advbenchh:/x.csv")
    for known in ("harmful", "benign", "advbench", "hexphi", "xstest-safe", "jsonl:PATH?prompt=", "hf:ORG/NAME"):
        assert known in message
    assert "needs a path" in one_line_error("advbench:")


def test_hub_spec_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error("hf:walledai/AdvBench")
    assert "HF_HUB_OFFLINE" in message and "advbench:PATH" in message


def test_hub_spec_without_datasets_package(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, never touches the network
    message = one_line_error("hf:walledai/AdvBench")
    assert "`datasets` package is not installed" in message and "advbench:PATH" in message


def test_hub_spec_maps_columns_with_a_stand_in_library(monkeypatch):
    calls = []

    class Table(list):
        column_names = ["goal", "target"]

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return Table([{"goal": "Do X", "target": "Sure"}, {"goal": "Do Y", "target": "Sure"}])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    data = load_dataset("hf:org/advbench-like:test?response=target")
    assert calls == [("org/advbench-like", "test")]
    assert data.prompts() == ["Do X", "Do Y"] and data[0].response == "Sure"
    assert data[0].source == "hf:org/advbench-like"
    load_dataset("hf:org/advbench-like")
    assert calls[-1] == ("org/advbench-like", "train")


# ---- through the CLI: one line on stderr, exit status 2, no traceback ------------------------------

@pytest.mark.parametrize("content, expect", [
    ('{"prompt": "ok"}\n{bad json}\n', "line 2"),
    ("", "empty"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, content, expect):
    from ssah.cli import main

    path = write(tmp_path / "x.jsonl", content)
    with pytest.raises(SystemExit) as info:
        main(["data", "show", f"jsonl:{path}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err and str(path) in err
    assert "Traceback" not in err


def test_cli_missing_file_subprocess(tmp_path):
    import subprocess
    import sys

    script = "from ssah.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", script, "data", "show", "advbench:/nonexistent.csv"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "/nonexistent.csv" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_import_is_cheap_and_offline():
    import subprocess

    code = ("import sys, ssah.data, ssah.data.cli; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers', 'requests') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
