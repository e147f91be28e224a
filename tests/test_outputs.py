"""Output folders and finished work: what ssah replaces, what it reuses, and what it refuses."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from ssah.artifacts import Artifact
from ssah.config import load_config
from ssah.errors import SsahError
from ssah.io import write_json_atomic
from ssah.outputs import MARKER, OutputFolder, OutputKind
from ssah.pipeline import run_pipeline
from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = Path(__file__).parent / "data" / "tiny_run.yaml"
KIND = OutputKind("thing", ("record.json", "data.bin"), record="record.json")
WHOLE = OutputKind("model", ("record.json", "weights.bin"), record="record.json", whole=True)


def test_artifact_reuses_same_inputs_redoes_settings_and_refuses_another_subject(tmp_path):
    made = Artifact(tmp_path / "record.json", "a thing", {"model": "m1", "settings": 1}, guard=("model",))
    assert made.lookup() is None
    made.save({"value": 7})
    assert made.lookup()["value"] == 7  # same inputs: reused
    other_settings = Artifact(tmp_path / "record.json", "a thing", {"model": "m1", "settings": 2}, guard=("model",))
    assert other_settings.lookup() is None  # same subject, other settings: redone
    other_model = Artifact(tmp_path / "record.json", "a thing", {"model": "m2", "settings": 1}, guard=("model",))
    with pytest.raises(SsahError, match="already holds a thing made differently .different model"):
        other_model.lookup()
    assert other_model.lookup(replace=True) is None and other_model.lookup(force=True) is None
    (tmp_path / "record.json").write_text("{half")
    with pytest.raises(SsahError, match="is damaged"):
        made.lookup()


def test_force_replaces_a_whole_folder_ssah_wrote_and_only_that(tmp_path):
    target = tmp_path / "out"
    for value in ("first", "second"):
        with OutputFolder(target, WHOLE, force=True) as folder, folder.swap() as tmp:
            (tmp / "weights.bin").write_text(value)
            (tmp / "record.json").write_text("{}")
    assert (target / "weights.bin").read_text() == "second"
    assert json.loads((target / MARKER).read_text())["files"] == ["record.json", "weights.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.is_dir()]  # no swap leftovers
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SsahError, match="holds files ssah did not write .e.g. notes.txt"):
        OutputFolder(target, WHOLE, force=True).check()
    assert (target / "notes.txt").read_text() == "mine"


def test_a_folder_ssah_did_not_make_is_never_written_into_and_an_empty_one_is_claimed(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "record.json").write_text("{}")  # a name ssah uses does not make it ssah's
    for force in (False, True):
        with pytest.raises(SsahError, match=r"holds files ssah did not write .e.g. record.json.* \(no .ssah-output"):
            OutputFolder(tmp_path / "theirs", KIND, force=force).check()
    assert (tmp_path / "theirs" / "record.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    with OutputFolder(tmp_path / "empty", KIND):
        write_json_atomic(tmp_path / "empty" / "record.json", {})
    assert json.loads((tmp_path / "empty" / MARKER).read_text())["files"] == ["record.json"]
    # a marker from before manifests: ssah cannot tell its files from the user's
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MARKER).write_text(json.dumps({"kind": "thing"}))
    with pytest.raises(SsahError, match="kept no record of its files"):
        OutputFolder(tmp_path / "old", KIND).check()


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    first = OutputFolder(tmp_path / "out", KIND)
    with first:
        with pytest.raises(SsahError, match=r"being written by another ssah process \(.*pid \d+"):
            with OutputFolder(tmp_path / "out", KIND):
                pass
    with OutputFolder(tmp_path / "out", KIND):  # released when the first writer ended
        pass


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        result = run_cli(capsys, "eval", "--model", "tiny:llama", "--suite", "safety", "--limit", "2",
                         "--max-new-tokens", "2", "--system-prompt", "none", "--rules", "prefix",
                         "--out", str(tmp_path / "e"))
        assert result.code == 0, result.err
        groups = tmp_path / "groups"
        from ssah.io import atomic_dir

        with atomic_dir(groups) as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    for name in ("eval.json", "replies.jsonl", MARKER):
        assert stat.S_IMODE((tmp_path / "e" / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(groups.stat().st_mode) == 0o777 & ~umask


def test_a_typo_fails_before_any_stage_and_the_fix_reuses_finished_stages(tmp_path, capsys):
    done = ("baseline", "align", "groups")
    run_pipeline(load_config(path=CONFIG), tmp_path / "run", only=done)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/done.json")}
    text = CONFIG.read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace('masks: [SCU, UCU, "random:like=SCU"]', 'masks: [SCU, UCX, "random:like=SCU"]'))
    start = time.perf_counter()
    result = run_cli(capsys, "run", "--config", str(typo), "--out", str(tmp_path / "run"))
    assert time.perf_counter() - start < 5
    assert_one_line_error(result, "prune.masks", "UCX")
    assert not (tmp_path / "run" / "4-prune").exists()
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(text.replace('masks: [SCU, UCU, "random:like=SCU"]', 'masks: [SCU, UCU]'))
    result = run_cli(capsys, "run", "--config", str(fixed), "--out", str(tmp_path / "run"), "--only", "prune")
    assert result.code == 0, result.err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished stages reused, untouched
    assert "[groups] done earlier" not in result.out and "[prune] running" in result.out
    summary = json.loads((tmp_path / "run" / "4-prune" / "done.json").read_text())["summary"]
    assert set(summary) == {"none", "SCU", "UCU"}


def test_what_a_killed_write_leaves_is_ssahs_and_a_users_look_alike_is_not(tmp_path):
    from ssah.ownership import Manifest

    out = tmp_path / "out"
    with OutputFolder(out, KIND):
        write_json_atomic(out / "sub" / "record.json", {})
    manifest = Manifest.read(out)
    assert manifest.files == {"sub/record.json"} and manifest.dirs == {"sub"}
    (out / "sub" / ".record.json.a1b2c3d4.tmp").write_text("")  # atomic_write cut short by a kill
    Manifest.read(out).claim(".model.0a1b2c3d", "tree")  # an atomic_dir, recorded whole before it is made
    (out / ".model.0a1b2c3d").mkdir()
    (out / ".model.0a1b2c3d" / "weights.bin").write_text("half")  # ... and killed while it was written
    assert Manifest.read(out).foreign() == []
    (out / "sub" / ".notes.a1b2c3d4.tmp").write_text("")  # the same shape, around a name ssah never wrote
    (out / ".record.json.x.tmp").write_text("")  # ssah's name, but in another folder
    assert Manifest.read(out).foreign() == [".record.json.x.tmp", "sub/.notes.a1b2c3d4.tmp"]


def test_a_write_over_a_users_file_or_into_a_users_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, KIND):
        (out / "record.json").write_text("mine")  # appeared while ssah held the folder, not written by it
        (out / "theirs").mkdir()
        with pytest.raises(SsahError, match="record.json exists and ssah did not write it"):
            write_json_atomic(out / "record.json", {})
        with pytest.raises(SsahError, match="theirs is a folder ssah did not make"):
            write_json_atomic(out / "theirs" / "data.bin", {})
    assert (out / "record.json").read_text() == "mine" and not (out / "theirs" / "data.bin").exists()


def test_a_sub_folder_with_its_own_marker_is_judged_by_its_own_record(tmp_path):
    from ssah.ownership import Manifest

    outer = tmp_path / "outer"
    with OutputFolder(outer, KIND), OutputFolder(outer / "inner", KIND):  # a command's folder inside another's
        write_json_atomic(outer / "record.json", {})
        write_json_atomic(outer / "inner" / "record.json", {})
    assert Manifest.read(outer).files == {"record.json"} and Manifest.read(outer / "inner").files == {"record.json"}
    assert Manifest.read(outer).foreign() == []
    (outer / "inner" / "notes.txt").write_text("mine")
    assert Manifest.read(outer).foreign() == ["inner/notes.txt"]
    with OutputFolder(outer / "elsewhere", KIND):  # made while nothing held `outer`: not recorded there
        pass
    assert Manifest.read(outer).foreign() == ["elsewhere", "inner/notes.txt"]


def test_a_file_name_that_is_not_utf8_is_recorded_and_read_back(tmp_path):
    from ssah.ownership import Manifest

    out = tmp_path / "out"
    name = os.fsdecode(b"caf\xe9.bin")  # Latin-1 bytes: a lone surrogate in Python
    with OutputFolder(out, KIND):
        from ssah.io import atomic_write

        atomic_write(out / name, b"x")
    assert Manifest.read(out).files == {name} and Manifest.read(out).foreign() == []
