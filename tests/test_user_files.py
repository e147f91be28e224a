"""No command changes a file ssah did not write.

A user's own folder given as --out is refused whole, with or without --force; inside ssah's own
folders, --force (and `ssah run --force STAGE`) removes only what ssah recorded writing and refuses
when anything else is there, hidden files and sub-folders included. Each refusal is exit status 2,
one line, no traceback, and the whole workspace byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ssah.outputs import MARKER, OutputFolder, lock_path
from ssah.pipeline.layout import RUN
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model", "tiny:llama"]
EVAL = [*TINY, "--suite", "safety", "--limit", "2", "--max-new-tokens", "2", "--system-prompt", "none",
        "--rules", "prefix"]
RUN_CONFIG = ("model: tiny:llama\ndevice: cpu\ndtype: fp32\n"
              "eval: {limit: 2, max_new_tokens: 2, batch_size: 2, rules: [prefix], text_limit: 2, max_openings: 2}\n")
# a user's folder: names ssah writes itself, a hidden file, and a notebook in a sub-folder
USER_FILES = {"config.yaml": "model: mine  # my own notes\n", "results.json": '{"mine": 1}\n',
              "report.html": "<p>my page</p>\n", "eval.json": "{}\n", "manifest.json": "{}\n",
              "config.json": '{"model_type": "llama"}\n', "model.safetensors": b"\x00\x01my weights",
              "tokenizer.json": "{}\n", ".hidden": "secret\n", "nb/analysis.ipynb": '{"cells": []}\n'}
# what a user adds inside a folder ssah made: a hidden file, a notebook in a sub-folder, an empty folder
EXTRAS = {".notes": "mine\n", "nb/analysis.ipynb": '{"cells": []}\n', "empty/": None}


def _write_tree(folder: Path, files: dict) -> Path:
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return folder


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, hidden ones included: its kind and, for files, a hash of the bytes."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def _cli(*argv: str) -> None:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from ssah.cli import main

    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
        try:
            main(list(argv))
        except SystemExit as exc:
            assert exc.code in (0, None), (argv, err.getvalue())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """What the commands read, and one folder of each kind ssah writes (copied before a test writes)."""
    a = tmp_path_factory.mktemp("assets")
    _cli("score", *TINY, "--data", "harmful:calibration", "--limit", "4", "--responses", "refusals",
         "--batch-size", "4", "--out", str(a / "safety"))
    _cli("score", *TINY, "--data", "benign:calibration", "--limit", "4", "--batch-size", "4",
         "--out", str(a / "utility"))
    _cli("groups", "--safety", str(a / "safety"), "--utility", str(a / "utility"),
         "--sizes", "scu=0.05,ucu=0.1,ru=0.2", "--out", str(a / "groups"))
    _cli("eval", *EVAL, "--out", str(a / "eval"))
    _cli("prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(a / "pruned"))
    _cli("transfer", "--before", str(a / "groups"), "--after", str(a / "groups"), "--out", str(a / "transfer"))
    (a / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}."}) + "\n"
                                           for i in range(4)))
    _cli("finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1", "--out", str(a / "tuned"))
    (a / "run.yaml").write_text(RUN_CONFIG)
    _cli("run", "--config", str(a / "run.yaml"), "--out", str(a / "run"), "--only", "baseline")
    _cli(*COMMANDS["probe"][0](a, a / "probe"))
    _cli(*COMMANDS["faithfulness"][0](a, a / "faithfulness"))
    return a


@pytest.mark.parametrize("folder", ["safety", "groups", "eval", "pruned", "tuned", "transfer", "run", "probe",
                                    "faithfulness"])
def test_every_file_a_command_writes_is_recorded(assets, folder):
    from ssah.ownership import Manifest

    manifest = Manifest.read(assets / folder)
    assert manifest is not None and manifest.files
    assert manifest.foreign() == []


# command -> (argv for an --out folder, whether it takes --force)
COMMANDS: dict[str, tuple[Callable[[Path, Path], list[str]], bool]] = {
    "score": (lambda a, out: ["score", *TINY, "--data", "harmful:calibration", "--limit", "2", "--out", str(out)],
              True),
    "groups": (lambda a, out: ["groups", "--safety", str(a / "safety"), "--utility", str(a / "utility"),
                               "--sizes", "scu=0.05,ucu=0.1,ru=0.2", "--out", str(out)], True),
    "faithfulness": (lambda a, out: ["faithfulness", *TINY, "--scorers", "variance", "--normalizations", "rank",
                                     "--rankings", "global", "--score-limit", "2", "--samples", "2", "--draws", "1",
                                     "--out", str(out)], False),
    "eval": (lambda a, out: ["eval", *EVAL, "--out", str(out)], True),
    "prune": (lambda a, out: ["prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(out)],
              True),
    "restore": (lambda a, out: ["restore", "--aligned", "tiny:llama", "--attacked", "tiny:llama", "--groups",
                                str(a / "groups"), "--parts", "SCU,norms", "--limit", "2", "--max-new-tokens", "2",
                                "--resamples", "10", "--out", str(out)], True),
    "align": (lambda a, out: ["align", *TINY, "--budget", f"{a / 'groups'}:RU", "--limit", "2", "--max-steps", "1",
                              "--out", str(out)], True),
    "finetune": (lambda a, out: ["finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1",
                                 "--out", str(out)], True),
    "probe": (lambda a, out: ["probe", *TINY, "--limit", "2", "--lengths", "2", "--out", str(out)], False),
    "transfer": (lambda a, out: ["transfer", "--before", str(a / "groups"), "--after", str(a / "groups"),
                                 "--out", str(out)], False),
    "run": (lambda a, out: ["run", "--config", str(a / "run.yaml"), "--out", str(out), "--only", "baseline"], True),
    "demo": (lambda a, out: ["demo", "--out", str(out), "--only", "baseline"], True),
}
# a folder ssah made for each command (in `assets`), and the --force of each
OWN_FOLDERS = {"score": "safety", "groups": "groups", "eval": "eval", "prune": "pruned", "align": "tuned",
               "finetune": "tuned", "run": "run"}


def _force(command: str) -> list[str]:
    return ["--force", "baseline"] if command in ("run", "demo") else ["--force"]


def test_every_command_that_writes_is_covered():
    import click

    from ssah.cli import SUBCOMMANDS, cli

    writers = set()
    for name in SUBCOMMANDS:
        command = cli.get_command(click.Context(cli), name)
        params = [p for c in ([command] if not isinstance(command, click.Group) else command.commands.values())
                  for p in c.params]
        if any("--out" in p.opts for p in params):
            writers.add(name)
    assert writers == set(COMMANDS) | {"report"}


@pytest.mark.parametrize(("command", "force"), [(name, force) for name in sorted(COMMANDS)
                                                  for force in (False, True) if COMMANDS[name][1] or not force])
def test_a_users_folder_is_never_written_into(command, force, assets, tmp_path, capsys):
    argv, _ = COMMANDS[command]
    mine = _write_tree(tmp_path / "mine", USER_FILES)
    before = _snapshot(tmp_path)
    result = run_cli(capsys, *argv(assets, mine), *(_force(command) if force else []))
    assert result.code == 2
    assert_one_line_error(result, "ssah did not write", "no .ssah-output.json")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", sorted(OWN_FOLDERS))
def test_force_in_ssahs_own_folder_refuses_what_a_user_added(command, assets, tmp_path, capsys):
    argv, _ = COMMANDS[command]
    out = tmp_path / "out"
    shutil.copytree(assets / OWN_FOLDERS[command], out, symlinks=True)
    inner = out / "1-baseline" / "eval" if command == "run" else out  # a stage's sub-folder
    _write_tree(inner, EXTRAS)
    before = _snapshot(tmp_path)
    result = run_cli(capsys, *argv(assets, out), *_force(command))
    assert_one_line_error(result, "files ssah did not write")
    assert result.code == 2
    assert _snapshot(tmp_path) == before
    for name, content in EXTRAS.items():  # each is found alone too
        shutil.rmtree(tmp_path / "out")
        shutil.copytree(assets / OWN_FOLDERS[command], out, symlinks=True)
        _write_tree(inner, {name: content})
        before = _snapshot(tmp_path)
        result = run_cli(capsys, *argv(assets, out), *_force(command))
        assert result.code == 2, (name, result)
        assert _snapshot(tmp_path) == before, name


def test_run_from_a_stage_refuses_a_users_file_in_a_later_stage_before_any_work(assets, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(assets / "run", out)
    _write_tree(out / "1-baseline" / "eval", {".ipynb_checkpoints/x.ipynb": "{}"})
    before = _snapshot(tmp_path)
    result = run_cli(capsys, "run", "--config", str(assets / "run.yaml"), "--out", str(out), "--from", "baseline",
                     "--only", "baseline")
    assert_one_line_error(result, "files ssah did not write", ".ipynb_checkpoints")
    assert _snapshot(tmp_path) == before


def test_in_its_own_folder_ssah_rewrites_its_files_and_leaves_a_users_alone(assets, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(assets / "run", out)
    _write_tree(out, {"notes.md": "mine\n", "1-baseline/eval/nb/analysis.ipynb": "{}"})
    result = run_cli(capsys, "run", "--config", str(assets / "run.yaml"), "--out", str(out), "--only", "baseline")
    assert result.code == 0, result.err
    result = run_cli(capsys, "report", str(out))
    assert result.code == 0, result.err
    assert (out / "notes.md").read_text() == "mine\n"
    assert (out / "1-baseline" / "eval" / "nb" / "analysis.ipynb").read_text() == "{}"
    # the same stage, with nothing of the user's in its folder, is redone
    shutil.rmtree(out / "1-baseline" / "eval" / "nb")
    stamp = (out / "1-baseline" / "done.json").stat().st_mtime_ns
    result = run_cli(capsys, "run", "--config", str(assets / "run.yaml"), "--out", str(out), "--only", "baseline",
                     "--force", "baseline")
    assert result.code == 0, result.err
    assert (out / "1-baseline" / "done.json").stat().st_mtime_ns != stamp
    assert (out / "notes.md").read_text() == "mine\n"
    recorded = json.loads((out / MARKER).read_text())
    assert "1-baseline/eval/eval.json" in recorded["files"] and "1-baseline" in recorded["dirs"]
    assert "notes.md" not in recorded["files"]


def test_a_users_file_where_ssah_writes_one_of_its_own_is_left_alone(assets, tmp_path, capsys):
    out = tmp_path / "t"
    shutil.copytree(assets / "transfer", out)
    (out / "transfer.png").unlink()  # a user puts their own file where ssah writes the plot
    from ssah.ownership import Manifest

    Manifest.read(out).drop_missing()
    (out / "transfer.png").write_bytes(b"my plot")
    result = run_cli(capsys, *COMMANDS["transfer"][0](assets, out))
    assert_one_line_error(result, "exists and ssah did not write it")
    assert (out / "transfer.png").read_bytes() == b"my plot"


@pytest.mark.parametrize("how", ["config in the folder", "current folder"])
def test_run_never_rewrites_the_config_it_was_given(how, tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("# my study\n" + RUN_CONFIG)
    before = _snapshot(tmp_path)
    if how == "current folder":
        monkeypatch.chdir(tmp_path)
        result = run_cli(capsys, "run", "--config", "config.yaml", "--out", ".", "--only", "baseline")
    else:
        result = run_cli(capsys, "run", "--config", str(config), "--out", str(tmp_path), "--only", "baseline")
    assert_one_line_error(result, "ssah did not write")
    assert _snapshot(tmp_path) == before


def test_report_writes_only_into_a_run_folder_ssah_made(assets, tmp_path, capsys):
    mine = _write_tree(tmp_path / "mine", {"results.json": '{"mine": 1}\n', "report.html": "<p>mine</p>\n"})
    shutil.copy(assets / "run" / "config.yaml", mine / "config.yaml")  # a valid config, but no run ssah made
    before = _snapshot(tmp_path)
    assert_one_line_error(run_cli(capsys, "report", str(mine)), "not a run folder ssah made")
    assert _snapshot(tmp_path) == before


def test_report_out_replaces_only_a_file_it_wrote_and_nobody_changed(assets, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(assets / "run", run)
    page = tmp_path / "page.html"
    page.write_text("<title>ssah report</title> mine\n")  # looks like a report, but ssah did not write it
    before = _snapshot(tmp_path)
    assert_one_line_error(run_cli(capsys, "report", str(run), "--out", str(page)), "ssah did not write it")
    assert _snapshot(tmp_path) == before
    ours = tmp_path / "ours.html"
    for _ in range(2):  # written, then replaced: ssah wrote it and it is unchanged
        assert run_cli(capsys, "report", str(run), "--out", str(ours)).code == 0
    ours.write_text(ours.read_text() + "<!-- my edit -->")
    edited = ours.read_bytes()
    assert_one_line_error(run_cli(capsys, "report", str(run), "--out", str(ours)), "changed since")
    assert ours.read_bytes() == edited
    inside = run / "1-baseline" / "page.html"
    assert_one_line_error(run_cli(capsys, "report", str(run), "--out", str(inside)), "a folder ssah made")
    assert not inside.exists()


def test_the_lock_holds_through_a_symlink_to_the_folder(assets, tmp_path, capsys):
    real = tmp_path / "real"
    shutil.copytree(assets / "run", real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = _snapshot(real)
    with OutputFolder(real, RUN):  # the first writer
        result = run_cli(capsys, "run", "--config", str(assets / "run.yaml"), "--out", str(link),
                         "--only", "baseline")
        assert_one_line_error(result, "being written by another ssah process", "pid")
        assert _snapshot(real) == before
    assert lock_path(link) == lock_path(real)
    assert run_cli(capsys, "run", "--config", str(assets / "run.yaml"), "--out", str(link),
                   "--only", "baseline").code == 0  # released: the link is a way in like any other


def test_the_lock_is_no_file_beside_or_inside_the_folder(assets, tmp_path, capsys):
    _write_tree(tmp_path, {".out.lock": "my own lock notes\n", "out.lock": "mine\n"})
    before = _snapshot(tmp_path)
    result = run_cli(capsys, "transfer", "--before", str(assets / "groups"), "--after", str(assets / "groups"),
                     "--out", str(tmp_path / "out"))
    assert result.code == 0, result.err
    after = _snapshot(tmp_path)
    assert {name: after.get(name) for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out", "out.lock"]
    assert not any("lock" in name for name in os.listdir(tmp_path / "out"))
    assert lock_path(tmp_path / "out").is_file()  # under the cache, named by the folder's real path


def test_the_runs_own_config_given_as_config_keeps_the_users_edits(assets, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(assets / "run", run)
    (run / "config.yaml").write_text("# my notes on this study\n" + (run / "config.yaml").read_text())
    edited = (run / "config.yaml").read_bytes()
    result = run_cli(capsys, "run", "--config", str(run / "config.yaml"), "--out", str(run), "--only", "baseline")
    assert result.code == 0, result.err
    assert (run / "config.yaml").read_bytes() == edited
