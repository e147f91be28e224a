"""`ssah data list` and `ssah data show`."""

from __future__ import annotations

import json

import pytest

from ssah.cli import main
from ssah.data import load_dataset


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_list_text_and_json(capsys):
    code, out, _ = run(["data", "list"], capsys)
    assert code == 0 and "harmful" in out and "calibration 128" in out
    code, out, _ = run(["data", "list", "--json"], capsys)
    info = json.loads(out)
    assert info["harmful"]["splits"]["test"] == 163 and info["text"]["splits"] == {"all": info["text"]["total"]}


def test_show_builtin(capsys):
    code, out, _ = run(["data", "show", "harmful:test", "--limit", "3"], capsys)
    assert code == 0
    assert load_dataset("harmful:test").fingerprint in out
    assert out.count("prompt:") == 3 and "160 more" in out


def test_show_json_file(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "2+2?", "a": "4"}\n{"q": "3+3?", "a": "6"}\n', encoding="utf-8")
    code, out, _ = run(["data", "show", f"jsonl:{path}?prompt=q&answer=a", "--json", "--limit", "0"], capsys)
    shown = json.loads(out)
    assert code == 0 and shown["count"] == 2 and len(shown["records"]) == 2
    assert shown["records"][1] == {"id": "jsonl/1", "prompt": "3+3?", "response": None, "category": "",
                                   "source": "jsonl", "answer": "6", "normalizer": None}
    assert shown["fingerprint"] == load_dataset(f"jsonl:{path}?prompt=q&answer=a").fingerprint


@pytest.mark.parametrize("spec, expect", [
    ("advbench:/nonexistent.csv", "/nonexistent.csv: no such file"),
    ("nosuchset", "unknown dataset 'nosuchset'"),
    ("benign:dev", "no split 'dev'"),
])
def test_show_errors_are_one_line(spec, expect, capsys):
    code, out, err = run(["data", "show", spec], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err
