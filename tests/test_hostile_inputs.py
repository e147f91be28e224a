"""Hostile and unlucky inputs against the CLI: each one ends in exit status 2 with one clear line on
stderr, no traceback, and every file that existed before is byte-identical afterwards.

One row per case: how to set the workspace up, the command line, fragments the error line must
hold, and optionally an injected OS failure (a read-only or full disk) or a held lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model", "tiny:llama"]
EVAL = [*TINY, "--suite", "safety", "--limit", "2", "--max-new-tokens", "2", "--system-prompt", "none",
        "--rules", "prefix"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Inputs that commands read (never write): scores and groups of tiny:llama, a saved model
    folder, small datasets, a finished evaluation and a fine-tuned model."""
    root = tmp_path_factory.mktemp("assets")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from ssah.cli import main

    def cli(*argv):
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            try:
                main(list(argv))
            except SystemExit as exc:
                assert exc.code in (0, None), argv
    cli("score", *TINY, "--data", "harmful:calibration", "--limit", "6", "--responses", "refusals",
        "--batch-size", "3", "--out", str(root / "safety"))
    cli("score", *TINY, "--data", "benign:calibration", "--limit", "6", "--batch-size", "3",
        "--out", str(root / "utility"))
    cli("groups", "--safety", str(root / "safety"), "--utility", str(root / "utility"),
        "--sizes", "scu=0.05,ucu=0.1,ru=0.2", "--out", str(root / "groups"))
    from ssah.models.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}."}) + "\n"
                                              for i in range(8)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Do thing {i}."}) + "\n" for i in range(4)))
    cli("eval", *EVAL, "--out", str(root / "eval"))
    cli("finetune", *TINY, "--data", f"jsonl:{root / 'pairs.jsonl'}", "--max-steps", "1", "--out", str(root / "ft"))
    cli("prune", *TINY, "--groups", str(root / "groups"), "--mask", "SCU", "--out", str(root / "pruned"))
    return root


@dataclass
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (workspace, assets) -> command line
    fragments: tuple[str, ...]
    setup: Callable[[Path, Path], None] = lambda w, a: None
    inject: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    chdir: bool = False
    code: int = 2  # 0: the input is legal and the command succeeds


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)


def _copy_model(w: Path, a: Path, name: str = "m") -> Path:
    shutil.copytree(a / "model", w / name)
    return w / name


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _ssah_run(folder: Path, config_text: str) -> None:
    """A run folder ssah made (its marker records config.yaml), holding `config_text` as its config."""
    from ssah.io import write_text_atomic
    from ssah.outputs import OutputFolder
    from ssah.pipeline.layout import RUN

    with OutputFolder(folder, RUN):
        write_text_atomic(folder / "config.yaml", config_text)


def _config(w: Path, body: str, name: str = "run.yaml") -> str:
    _write(w / name, "model: tiny:llama\ndevice: cpu\n" + body)
    return str(w / name)


def _read_only(monkeypatch, w):
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


def _full_disk(monkeypatch, w):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20))


def _disk_fills_while_writing(monkeypatch, w):
    import ssah.units.scores

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ssah.units.scores, "atomic_write", full)  # the scores file, after the work


def _locked(monkeypatch, w):
    from ssah.outputs import _acquire

    held = _acquire(w / "out")
    monkeypatch.setattr("tests.test_hostile_inputs._HELD", held, raising=False)


_HELD = None


def _scores_folder(w: Path, a: Path, name: str = "s") -> Path:
    shutil.copytree(a / "safety", w / name)
    return w / name


CASES: list[Case] = [
    # -- output folders: nothing ssah did not write is ever removed or overwritten ------------------
    Case("force on the current folder with a stranger's file", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "groups"), "--mask", "SCU", "--out", ".", "--force"],
        ("current folder",), setup=lambda w, a: (_write(w / "notes.txt", "mine"), shutil.copytree(a / "groups",
                                                                                                  w / "groups")),
        chdir=True),
    Case("force on a folder with a stranger's file", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(w / "o"), "--force"],
        ("files ssah did not write", "notes.txt"), setup=lambda w, a: _write(w / "o" / "notes.txt", "mine")),
    Case("a non-empty folder ssah did not make", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(w / "o")],
        ("files ssah did not write",), setup=lambda w, a: _write(w / "o" / "notes.txt", "mine")),
    Case("force on the folder that holds the input groups", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "g" / "groups"), "--mask", "SCU", "--out", str(w / "g"), "--force"],
        ("input of this command",), setup=lambda w, a: shutil.copytree(a / "groups", w / "g" / "groups")),
    Case("force on an ancestor of the current folder", lambda w, a: [
        "finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1", "--out", "..", "--force"],
        ("current folder",), setup=lambda w, a: (w / "sub").mkdir(), chdir=True),
    Case("finetune output that is a file", lambda w, a: [
        "finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1", "--out", str(w / "f")],
        ("is a file",), setup=lambda w, a: _write(w / "f", "x")),
    Case("eval output that is a file", lambda w, a: ["eval", *EVAL, "--out", str(w / "f")], ("is a file",),
         setup=lambda w, a: _write(w / "f", "x")),
    Case("score into a folder of other files", lambda w, a: [
        "score", *TINY, "--data", "harmful:calibration", "--limit", "2", "--out", str(w / "o")],
        ("files ssah did not write", "todo.txt"), setup=lambda w, a: _write(w / "o" / "todo.txt", "x")),
    Case("eval into a scores folder", lambda w, a: ["eval", *EVAL, "--out", str(w / "s")],
         ("holds ssah scores output",), setup=lambda w, a: _scores_folder(w, a)),
    Case("groups with force into the folder holding its inputs", lambda w, a: [
        "groups", "--safety", str(w / "x" / "s"), "--utility", str(a / "utility"), "--out", str(w / "x"), "--force"],
        ("input of this command",), setup=lambda w, a: (w / "x").mkdir() or _scores_folder(w / "x", a)),
    Case("eval with force into the folder holding its data", lambda w, a: [
        "eval", *EVAL, "--harmful", f"jsonl:{w / 'd' / 'p.jsonl'}", "--out", str(w / "d"), "--force"],
        ("input of this command",), setup=lambda w, a: shutil.copy(a / "prompts.jsonl", _mk(w / "d") / "p.jsonl")),
    Case("run into a folder of other files", lambda w, a: [
        "run", "--config", _config(w, ""), "--out", str(w / "o"), "--only", "baseline"],
        ("files ssah did not write",), setup=lambda w, a: _write(w / "o" / "thesis.tex", "x")),
    Case("run into a folder made for another model", lambda w, a: [
        "run", "--config", _config(w, ""), "--out", str(w / "o"), "--only", "baseline"],
        ("holds a run of model 'tiny:qwen2'",),
        setup=lambda w, a: _ssah_run(w / "o", "model: tiny:qwen2\n")),
    Case("an evaluation of another model", lambda w, a: ["eval", *EVAL[:-6], "--suite", "safety", "--limit", "2",
                                                         "--max-new-tokens", "2", "--system-prompt", "none",
                                                         "--model", "tiny:qwen2", "--out", str(w / "e")],
         ("already holds an evaluation made differently", "--force"),
         setup=lambda w, a: shutil.copytree(a / "eval", w / "e")),
    Case("a second writer on a locked folder", lambda w, a: ["eval", *EVAL, "--out", str(w / "out")],
         ("being written by another ssah process", "pid"), inject=_locked),
    # -- everything checked before the first expensive step -----------------------------------------
    Case("a typo in prune.masks", lambda w, a: ["run", "--config", _config(w, "prune: {masks: [SCU, SCX]}\n"),
                                                "--out", str(w / "o")], ("prune.masks", "SCX")),
    Case("group sizes summing over 1", lambda w, a: [
        "run", "--config", _config(w, "groups: {sizes: {scu: 0.6, ucu: 0.5}}\n"), "--out", str(w / "o")],
        ("groups.sizes", "sum to 1.1")),
    Case("an unknown suite in a config", lambda w, a: [
        "run", "--config", _config(w, "eval: {suites: [safety, jailbreak]}\n"), "--out", str(w / "o")],
        ("eval.suites[1]", "jailbreak")),
    Case("an unknown scorer in a config", lambda w, a: [
        "run", "--config", _config(w, "scores: {scorer: magic}\n"), "--out", str(w / "o")],
        ("scores.scorer", "unknown scorer")),
    Case("a missing data file in a config", lambda w, a: [
        "run", "--config", _config(w, f"data: {{harmful_test: 'jsonl:{w / 'none.jsonl'}'}}\n"), "--out", str(w / "o")],
        ("data.harmful_test", "no such file")),
    Case("a missing model in a config", lambda w, a: ["run", "--config", str(w / "r.yaml"), "--out", str(w / "o")],
         ("model path", "does not exist"), setup=lambda w, a: _write(w / "r.yaml", f"model: {w / 'gone'}\n")),
    Case("fine-tuning data without responses", lambda w, a: [
        "run", "--config", _config(w, f"data: {{finetune: 'jsonl:{a / 'prompts.jsonl'}'}}\n"), "--out", str(w / "o")],
        ("data.finetune", "no response")),
    Case("utility data without answers", lambda w, a: [
        "run", "--config", _config(w, f"data: {{benign_test: 'jsonl:{a / 'pairs.jsonl'}'}}\n"), "--out", str(w / "o")],
        ("data.benign_test", "no records with an answer")),
    Case("a run stage whose needs are not done", lambda w, a: [
        "run", "--config", _config(w, ""), "--out", str(w / "o"), "--only", "prune"], ("needs the groups stage",)),
    Case("an unknown stage", lambda w, a: ["run", "--config", _config(w, ""), "--out", str(w / "o"), "--from", "x"],
         ("unknown stage 'x'",)),
    Case("an unknown preset", lambda w, a: ["run", "--preset", "nope", "--out", str(w / "o")], ("unknown preset",)),
    Case("both a preset and a config", lambda w, a: ["run", "--preset", "demo", "--config", _config(w, ""),
                                                     "--out", str(w / "o")], ("exactly one",)),
    Case("a config that is a folder", lambda w, a: ["run", "--config", str(w), "--out", str(w / "o")],
         ("is a folder",)),
    Case("a YAML syntax error", lambda w, a: ["run", "--config", _config(w, "eval:\n  limit: [1, 2\n"),
                                              "--out", str(w / "o")], ("not valid YAML", "line")),
    Case("a UTF-16 config with a bad key", lambda w, a: ["run", "--config", str(w / "u.yaml"), "--out", str(w / "o")],
         ("unknown config key 'evaluation'",),
         setup=lambda w, a: _write(w / "u.yaml", "model: tiny:llama\nevaluation: {}\n".encode("utf-16"))),
    Case("a config that is a list", lambda w, a: ["run", "--config", str(w / "l.yaml"), "--out", str(w / "o")],
         ("must hold a mapping",), setup=lambda w, a: _write(w / "l.yaml", "- a\n- b\n")),
    Case("a string where a number goes", lambda w, a: [
        "run", "--config", _config(w, "eval: {limit: '3'}\n"), "--out", str(w / "o")], ("eval.limit", "integer")),
    Case("a negative loss weight", lambda w, a: [
        "run", "--config", _config(w, "align: {refusal_unlikelihood: -1}\n"), "--out", str(w / "o")],
        ("align.refusal_unlikelihood", ">= 0")),
    Case("all-zero group sizes", lambda w, a: [
        "groups", "--safety", str(a / "safety"), "--utility", str(a / "utility"), "--sizes", "scu=0,ucu=0,ru=0",
        "--out", str(w / "g")], ("every group size is 0",)),
    Case("an unknown group size", lambda w, a: [
        "groups", "--safety", str(a / "safety"), "--utility", str(a / "utility"), "--sizes", "cu=0.5",
        "--out", str(w / "g")], ("CU is always the rest",)),
    Case("sizes over 1", lambda w, a: [
        "groups", "--safety", str(a / "safety"), "--utility", str(a / "utility"), "--sizes", "scu=0.7,ru=0.7",
        "--out", str(w / "g")], ("sum to 1.4",)),
    # -- masks -------------------------------------------------------------------------------------
    Case("an unknown mask term", lambda w, a: ["prune", *TINY, "--groups", str(a / "groups"), "--mask", "XYZ",
                                               "--out", str(w / "p")], ("unknown mask term 'XYZ'",)),
    Case("a negative top=", lambda w, a: ["prune", *TINY, "--groups", str(a / "groups"), "--mask", "CU:top=-0.1",
                                          "--out", str(w / "p")], ("top=-0.1", "between 0 and 1")),
    Case("top= above 1", lambda w, a: ["prune", *TINY, "--groups", str(a / "groups"), "--mask", "CU:top=2",
                                       "--out", str(w / "p")], ("between 0 and 1",)),
    Case("a seed that is no integer", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "random:like=SCU,seed=x", "--out", str(w / "p")],
        ("must be an integer",)),
    Case("random with both like and frac", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "random:like=SCU,frac=0.1", "--out", str(w / "p")],
        ("exactly one of like=",)),
    Case("an unknown mask option", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU:colour=red", "--out", str(w / "p")],
        ("unknown mask option 'colour'",)),
    Case("a mask of another model", lambda w, a: [
        "prune", "--model", "tiny:qwen2", "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(w / "p")],
        ("was made for model",)),
    Case("a freeze spec that is no groups folder", lambda w, a: [
        "finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--freeze", "nowhere:SCU", "--out", str(w / "f")],
        ("is not GROUPS_DIR:MASK",)),
    # -- datasets ----------------------------------------------------------------------------------
    Case("a missing dataset file", lambda w, a: ["score", *TINY, "--data", f"jsonl:{w / 'no.jsonl'}",
                                                 "--out", str(w / "s")], ("no such file",)),
    Case("an empty dataset file", lambda w, a: ["score", *TINY, "--data", f"jsonl:{w / 'e.jsonl'}",
                                                "--out", str(w / "s")], ("empty",),
         setup=lambda w, a: _write(w / "e.jsonl", "")),
    Case("a binary dataset", lambda w, a: ["data", "show", f"jsonl:{w / 'b.jsonl'}"], ("binary",),
         setup=lambda w, a: _write(w / "b.jsonl", bytes(range(256)) * 8)),
    Case("a UTF-16 dataset", lambda w, a: ["data", "show", f"jsonl:{w / 'u.jsonl'}"], ("UTF-16",),
         setup=lambda w, a: _write(w / "u.jsonl", '{"prompt": "hi"}\n'.encode("utf-16"))),
    Case("a dataset with one huge line", lambda w, a: ["data", "show", f"jsonl:{w / 'h.jsonl'}"],
         ("one record per line",),
         setup=lambda w, a: _write(w / "h.jsonl", json.dumps({"prompt": "x" * 1_500_000}) + "\n")),
    Case("a malformed JSON line", lambda w, a: ["data", "show", f"jsonl:{w / 'm.jsonl'}"], ("line 2",),
         setup=lambda w, a: _write(w / "m.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
    Case("a dataset folder", lambda w, a: ["data", "show", f"jsonl:{w}"], ("is a folder",)),
    Case("an unknown dataset", lambda w, a: ["data", "show", "nosuchset"], ("unknown dataset",)),
    Case("an unknown split", lambda w, a: ["data", "show", "benign:dev"], ("no split 'dev'",)),
    Case("fine-tuning data without responses (finetune)", lambda w, a: [
        "finetune", *TINY, "--data", f"jsonl:{a / 'prompts.jsonl'}", "--max-steps", "1", "--out", str(w / "f")],
        ("have no response",)),
    # -- models ------------------------------------------------------------------------------------
    Case("a truncated model.safetensors", lambda w, a: ["units", "--model", str(w / "m")], ("truncated",),
         setup=lambda w, a: _truncate(_copy_model(w, a) / "model.safetensors")),
    Case("a config.json holding a list", lambda w, a: ["units", "--model", str(w / "m")], ("JSON list",),
         setup=lambda w, a: _write(_copy_model(w, a) / "config.json", "[1, 2]")),
    Case("a config.json of another family", lambda w, a: ["units", "--model", str(w / "m")],
         ("unsupported model type 'bert'",),
         setup=lambda w, a: _write(_copy_model(w, a) / "config.json", '{"model_type": "bert"}')),
    Case("a config.json without model_type", lambda w, a: ["units", "--model", str(w / "m")], ("no model_type",),
         setup=lambda w, a: _write(_copy_model(w, a) / "config.json", '{"hidden_size": 8}')),
    Case("a pickle-only model folder", lambda w, a: ["units", "--model", str(w / "m")],
         ("could not load the weights",),
         setup=lambda w, a: (_copy_model(w, a) / "model.safetensors").rename(w / "m" / "pytorch_model.bin")),
    Case("a model folder without weights", lambda w, a: ["units", "--model", str(w / "m")], ("holds no weights",),
         setup=lambda w, a: (_copy_model(w, a) / "model.safetensors").unlink()),
    Case("a model folder without a tokenizer", lambda w, a: ["units", "--model", str(w / "m")],
         ("could not load the tokenizer",),
         setup=lambda w, a: [p.unlink() for p in _copy_model(w, a).glob("tokenizer*")]),
    Case("a truncated GGUF file", lambda w, a: ["units", "--model", str(w / "x.gguf")], ("damaged or cut short",),
         setup=lambda w, a: _write(w / "x.gguf", b"GGUF" + bytes(200))),
    Case("a file that is no GGUF", lambda w, a: ["units", "--model", str(w / "x.gguf")], ("not a GGUF file",),
         setup=lambda w, a: _write(w / "x.gguf", b"hello")),
    Case("a missing model path", lambda w, a: ["units", "--model", str(w / "gone")], ("does not exist",)),
    Case("a hub id offline and not cached", lambda w, a: ["units", "--model", "someone/some-model"],
         ("HF_HUB_OFFLINE",)),
    Case("an unknown tiny family", lambda w, a: ["units", "--model", "tiny:bert"], ("unknown tiny family",)),
    Case("a device that does not exist", lambda w, a: ["units", *TINY, "--device", "gpu0"], ("gpu0",)),
    # -- artifacts ---------------------------------------------------------------------------------
    Case("scores without a manifest", lambda w, a: [
        "groups", "--safety", str(w / "s"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("manifest.json is missing",), setup=lambda w, a: (_scores_folder(w, a) / "manifest.json").unlink()),
    Case("truncated scores", lambda w, a: [
        "groups", "--safety", str(w / "s"), "--utility", str(a / "utility"), "--out", str(w / "g")], ("damaged",),
        setup=lambda w, a: _truncate(_scores_folder(w, a) / "scores.safetensors")),
    Case("a damaged groups.json", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "g"), "--mask", "SCU", "--out", str(w / "p")], ("groups.json",),
        setup=lambda w, a: _truncate(Path(shutil.copytree(a / "groups", w / "g")) / "groups.json")),
    Case("a damaged eval.json", lambda w, a: ["eval", *EVAL, "--out", str(w / "e")], ("eval.json is damaged",),
         setup=lambda w, a: _truncate(Path(shutil.copytree(a / "eval", w / "e")) / "eval.json")),
    Case("scores of two models", lambda w, a: [
        "groups", "--safety", str(a / "safety"), "--utility", str(w / "q"), "--out", str(w / "g")],
        ("different models",), setup=lambda w, a: _score_other(w / "q")),
    Case("a monitor config with an unknown key", lambda w, a: [
        "eval", *EVAL, "--monitor", str(w / "m.yaml"), "--out", str(w / "e")], ("unknown config key 'threshhold'",),
        setup=lambda w, a: _write(w / "m.yaml", "threshhold: 1\n")),
    Case("a truncated monitor state", lambda w, a: [
        "eval", *EVAL, "--monitor", str(w / "m.safetensors"), "--out", str(w / "e")], ("monitor state",),
        setup=lambda w, a: _write(w / "m.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{")),
    # -- options -----------------------------------------------------------------------------------
    Case("freeze together with LoRA", lambda w, a: [
        "finetune", *TINY, "--data", "benign:train", "--freeze", f"{a / 'groups'}:SCU", "--lora", "--out",
        str(w / "f")], ("cannot be combined",)),
    Case("avoided refusals without borderline prompts", lambda w, a: [
        "align", *TINY, "--budget", "all", "--avoid-refusals", "0.1", "--out", str(w / "a")], ("needs --borderline",)),
    Case("a system text without a system prompt", lambda w, a: [
        "eval", *EVAL, "--system", "Be nice.", "--out", str(w / "e")], ("no effect",)),
    Case("a limit of zero", lambda w, a: ["eval", *TINY, "--limit", "0", "--out", str(w / "e")], ("--limit",)),
    Case("a word where a number goes", lambda w, a: ["finetune", *TINY, "--data", "benign:train", "--lr", "fast",
                                                     "--out", str(w / "f")], ("--lr",)),
    Case("a judge folder that does not exist", lambda w, a: [
        "eval", *EVAL, "--judge", str(w / "judge"), "--out", str(w / "e")], ("judge",)),
    Case("a missing monitor file", lambda w, a: ["eval", *EVAL, "--monitor", str(w / "none.yaml"),
                                                 "--out", str(w / "e")], ("does not exist",)),
    Case("bad recovery lengths", lambda w, a: ["align", *TINY, "--budget", "all", "--recovery", "2,x",
                                               "--out", str(w / "a")], ("--recovery",)),
    Case("transfer between groupings of different sizes", lambda w, a: [
        "transfer", "--before", str(a / "groups"), "--after", str(w / "g2"), "--out", str(w / "t")], ("sizes",),
        setup=lambda w, a: _group_other_sizes(w / "g2", a)),
    # -- the disk ----------------------------------------------------------------------------------
    Case("a read-only output disk", lambda w, a: ["eval", *EVAL, "--out", str(w / "e")], ("cannot write",),
         inject=_read_only),
    Case("a full output disk", lambda w, a: ["finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}",
                                             "--out", str(w / "f")], ("MB free",), inject=_full_disk),
    Case("a disk that fills while writing", lambda w, a: [
        "score", *TINY, "--data", "benign:calibration", "--limit", "2", "--out", str(w / "s")],
        ("No space left on device", "scores.safetensors"), inject=_disk_fills_while_writing),
]


LONG = "x" * 100_000  # a value far longer than any error line may quote
SEED_OVER = str(2**32)  # one past what numpy (through accelerate's set_seed) accepts


def _pipe_path(w: Path) -> str:
    """A path that reads from a pipe (as `--config <(...)` gives), kept open for the test."""
    import os

    read, write = os.pipe()
    os.write(write, b"model: tiny:llama\n")
    os.close(write)
    _OPEN_FDS.append(read)
    return f"/dev/fd/{read}"


_OPEN_FDS: list[int] = []


def _fifo(w: Path) -> None:
    import os

    os.mkfifo(w / "fifo.yaml")


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


def _eval_with_monitor(w: Path, body: str) -> list[str]:
    _write(w / "m.yaml", body)
    return ["eval", *EVAL, "--monitor", str(w / "m.yaml"), "--out", str(w / "e")]


def _run(w: Path, body: str, *extra: str) -> list[str]:
    return ["run", "--config", _config(w, body), "--out", str(w / "o"), *extra]


def _finetune(a: Path, w: Path, *options: str) -> list[str]:
    return ["finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1", *options,
            "--out", str(w / "f")]


def _prune(a: Path, w: Path, mask: str, *options: str) -> list[str]:
    return ["prune", *TINY, "--groups", str(a / "groups"), "--mask", mask, *options, "--out", str(w / "p")]


def _groups(a: Path, w: Path, *options: str) -> list[str]:
    return ["groups", "--safety", str(a / "safety"), "--utility", str(a / "utility"), *options,
            "--out", str(w / "g")]


INPUT_CASES: list[Case] = [
    # -- seeds: within what torch and numpy (accelerate's set_seed) accept, wherever they enter ---------
    Case("a run seed over 2**32-1", lambda w, a: _run(w, f"seed: {SEED_OVER}\n"), ("seed", "<= 4294967295")),
    Case("a run seed beyond 64 bits", lambda w, a: _run(w, f"seed: {2**70}\n"), ("seed", "64-bit")),
    Case("a negative run seed", lambda w, a: _run(w, "seed: -1\n"), ("seed", ">= 0")),
    Case("a negative seed of the random alignment budgets",
         lambda w, a: _run(w, "align: {random_budget_seeds: [0, -1]}\n"), ("align.random_budget_seeds[1]", ">= 0")),
    Case("an attack control seed over 2**32-1", lambda w, a: _run(w, f"attacks: {{random_seeds: [{SEED_OVER}]}}\n"),
         ("attacks.random_seeds[0]", "<= 4294967295")),
    Case("a monitor seed out of range", lambda w, a: _run(w, f"probe: {{monitor_settings: {{seed: {SEED_OVER}}}}}\n"),
         ("probe.monitor_settings.seed",)),
    Case("a monitor config seed out of range", lambda w, a: _eval_with_monitor(w, "seed: -4\n"), ("seed", ">= 0")),
    Case("finetune --seed -1", lambda w, a: _finetune(a, w, "--seed", "-1"), ("--seed", "0<=x<=4294967295")),
    Case("finetune --seed 2**32", lambda w, a: _finetune(a, w, "--seed", SEED_OVER), ("--seed",)),
    Case("align --seed 2**64", lambda w, a: ["align", *TINY, "--budget", "all", "--seed", str(2**64),
                                             "--out", str(w / "a")], ("--seed",)),
    Case("score --seed -7", lambda w, a: ["score", *TINY, "--data", "harmful:calibration", "--seed", "-7",
                                          "--out", str(w / "s")], ("--seed",)),
    Case("eval --seed 2**33", lambda w, a: ["eval", *EVAL, "--seed", str(2**33), "--out", str(w / "e")], ("--seed",)),
    Case("prune --seed -3", lambda w, a: _prune(a, w, "SCU", "--seed", "-3"), ("--seed",)),
    Case("probe --seed 2**40", lambda w, a: ["probe", *TINY, "--seed", str(2**40), "--out", str(w / "pr")],
         ("--seed",)),
    Case("faithfulness --seed -1", lambda w, a: ["faithfulness", *TINY, "--seed", "-1", "--out", str(w / "fa")],
         ("--seed",)),
    Case("a mask seed below 0", lambda w, a: _prune(a, w, "random:like=SCU,seed=-1"), ("seed=-1", "0 to 4294967295")),
    Case("a mask seed over 2**32-1 in a config",
         lambda w, a: _run(w, f"prune: {{masks: ['random:frac=0.1,seed={SEED_OVER}']}}\n"), ("prune.masks", "seed")),
    # -- numbers: finite, and in range -----------------------------------------------------------------
    Case("finetune --lr inf", lambda w, a: _finetune(a, w, "--lr", "inf"), ("--lr", "not a finite number")),
    Case("finetune --lr nan", lambda w, a: _finetune(a, w, "--lr", "nan"), ("--lr", "not a finite number")),
    Case("finetune --lr -inf", lambda w, a: _finetune(a, w, "--lr", "-inf"), ("--lr", "finite")),
    Case("finetune --epochs inf", lambda w, a: _finetune(a, w, "--epochs", "inf"), ("--epochs", "finite")),
    Case("finetune --epochs 1e9", lambda w, a: _finetune(a, w, "--epochs", "1e9"), ("epochs", "<= 10000")),
    Case("finetune --warmup nan", lambda w, a: _finetune(a, w, "--warmup", "nan"), ("--warmup", "finite")),
    Case("finetune --weight-decay inf", lambda w, a: _finetune(a, w, "--weight-decay", "inf"), ("--weight-decay",)),
    Case("finetune --frozen-epochs-multiplier inf", lambda w, a: _finetune(a, w, "--frozen-epochs-multiplier", "inf"),
         ("--frozen-epochs-multiplier", "finite")),
    Case("finetune --frozen-epochs-multiplier 0", lambda w, a: _finetune(a, w, "--frozen-epochs-multiplier", "0"),
         ("--frozen-epochs-multiplier", "> 0")),
    Case("align --avoid-refusals nan", lambda w, a: ["align", *TINY, "--budget", "all", "--avoid-refusals", "nan",
                                                     "--out", str(w / "a")], ("--avoid-refusals", "finite")),
    Case("align --lr 1e400", lambda w, a: ["align", *TINY, "--budget", "all", "--lr", "1e400", "--out", str(w / "a")],
         ("--lr", "finite")),
    Case("a finite learning rate that diverges", lambda w, a: _finetune(a, w, "--lr", "1e30", "--batch-size", "2",
                                                                         "--max-steps", "3"),
         ("training diverged", "lower the learning rate")),
    Case("an infinite learning rate in a config", lambda w, a: _run(w, "align: {train: {lr: .inf}}\n"),
         ("align.train.lr", "finite number")),
    Case("infinite epochs in a config", lambda w, a: _run(w, "finetune: {train: {epochs: .inf}}\n"),
         ("finetune.train.epochs", "finite")),
    Case("an infinite multiplier in a config", lambda w, a: _run(w, "finetune: {frozen_epochs_multiplier: .inf}\n"),
         ("finetune.frozen_epochs_multiplier", "finite")),
    Case("a NaN group size in a config", lambda w, a: _run(w, "groups: {sizes: {scu: .nan}}\n"),
         ("groups.sizes.scu", "finite")),
    Case("an infinite attack learning rate", lambda w, a: _run(w, "attacks: {sweep: {lr: [.inf]}}\n"),
         ("attacks.sweep.lr[0]", "finite")),
    Case("a NaN loss weight in a config", lambda w, a: _run(w, "align: {refusal_unlikelihood: .nan}\n"),
         ("align.refusal_unlikelihood", "finite")),
    Case("an infinite steering strength", lambda w, a: _run(w, "probe: {monitor_settings: {steer_alpha: .inf}}\n"),
         ("probe.monitor_settings.steer_alpha", "finite")),
    Case("an infinite utility drop", lambda w, a: _run(w, "attacks: {utility_drop: .inf}\n"),
         ("attacks.utility_drop",)),
    Case("a NaN monitor threshold", lambda w, a: _eval_with_monitor(w, "threshold: .nan\n"), ("threshold", "finite")),
    Case("an infinite group size", lambda w, a: _groups(a, w, "--sizes", "scu=inf"), ("scu=inf", "between 0 and 1")),
    Case("a NaN percentage size", lambda w, a: _groups(a, w, "--sizes", "scu=nan%"), ("between 0 and 1",)),
    Case("a NaN top= share", lambda w, a: _prune(a, w, "SCU+CU:top=nan"), ("top=nan", "between 0 and 1")),
    Case("an infinite random share", lambda w, a: _prune(a, w, "random:frac=inf"), ("frac=inf",)),
    # -- devices this machine has -----------------------------------------------------------------------
    Case("--device mps without one", lambda w, a: ["units", *TINY, "--device", "mps"], ("'mps'", "no mps device")),
    Case("--device xpu without one", lambda w, a: ["units", *TINY, "--device", "xpu"], ("no xpu device",)),
    Case("--device npu without one", lambda w, a: ["units", *TINY, "--device", "npu:0"], ("no npu device",)),
    Case("--device cuda:7", lambda w, a: ["units", *TINY, "--device", "cuda:7"], ("cuda:7",)),
    Case("finetune on a missing xpu", lambda w, a: _finetune(a, w, "--device", "xpu:0"), ("no xpu device",)),
    Case("groups --sizes auto on a missing mps", lambda w, a: _groups(a, w, "--sizes", "auto", "--device", "mps"),
         ("no mps device",)),
    Case("a run on a missing device", lambda w, a: ["run", "--config", str(w / "r.yaml"), "--out", str(w / "o")],
         ("device", "no mps device"), setup=lambda w, a: _write(w / "r.yaml", "model: tiny:llama\ndevice: mps\n")),
    Case("a device name with a newline", lambda w, a: ["units", *TINY, "--device", "cuda\n:0"], ("--device",)),
    # -- dataset specs ------------------------------------------------------------------------------------
    Case("an empty dataset spec in a config", lambda w, a: _run(w, "data: {harmful_test: ''}\n"),
         ("data.harmful_test", "empty dataset spec")),
    Case("a blank fine-tuning spec in a config", lambda w, a: _run(w, "data: {finetune: '   '}\n"),
         ("data.finetune", "empty dataset spec")),
    Case("an empty borderline spec in a config", lambda w, a: _run(w, "data: {borderline_train: ''}\n"),
         ("data.borderline_train", "null")),
    Case("a dataset spec that is a number", lambda w, a: _run(w, "data: {benign_test: 3}\n"),
         ("data.benign_test", "string")),
    Case("eval --harmful ''", lambda w, a: ["eval", *EVAL, "--harmful", "", "--out", str(w / "e")],
         ("empty dataset spec",)),
    Case("finetune --data ''", lambda w, a: ["finetune", *TINY, "--data", "", "--out", str(w / "f")],
         ("empty dataset spec",)),
    Case("score --data ' '", lambda w, a: ["score", *TINY, "--data", " ", "--out", str(w / "s")],
         ("empty dataset spec",)),
    # -- YAML and the files a config comes from -------------------------------------------------------
    Case("a top-level key given twice", lambda w, a: _run(w, "seed: 1\nseed: 2\n"), ("'seed'", "lines 3 and 4")),
    Case("a nested key given twice", lambda w, a: _run(w, "align:\n  enabled: true\n  study: base\n  enabled: false\n"),
         ("'enabled'", "lines 4 and 6")),
    Case("a section given twice", lambda w, a: _run(w, "eval: {limit: 2}\nprune: {}\neval: {limit: 3}\n"),
         ("'eval'", "lines 3 and 5")),
    Case("a monitor key given twice", lambda w, a: _eval_with_monitor(w, "target_fpr: 0.1\ntarget_fpr: 0.2\n"),
         ("'target_fpr'", "lines 1 and 2")),
    Case("a monitor config that is /dev/null", lambda w, a: ["eval", *EVAL, "--monitor", "/dev/null",
                                                             "--out", str(w / "e")], ("/dev/null", "a device")),
    Case("a monitor config that is a folder", lambda w, a: ["eval", *EVAL, "--monitor", str(w / "m.yaml"),
                                                            "--out", str(w / "e")], ("is a folder",),
         setup=lambda w, a: (w / "m.yaml").mkdir()),
    Case("a config that is /dev/null", lambda w, a: ["run", "--config", "/dev/null", "--out", str(w / "o")],
         ("/dev/null", "a device")),
    Case("a config that is a FIFO", lambda w, a: ["run", "--config", str(w / "fifo.yaml"), "--out", str(w / "o")],
         ("a pipe",), setup=lambda w, a: _fifo(w)),
    Case("a config read from a pipe", lambda w, a: ["run", "--config", _pipe_path(w), "--out", str(w / "o")],
         ("a pipe",)),
    Case("a config of 20 MB", lambda w, a: ["run", "--config", str(w / "big.yaml"), "--out", str(w / "o")],
         ("small text file",), setup=lambda w, a: _sparse(w / "big.yaml", 20 << 20)),
    Case("a config with a tab indent", lambda w, a: _run(w, "eval:\n\tlimit: 2\n"), ("not valid YAML", "line 4")),
    Case("a config key that is a list", lambda w, a: _run(w, "[1, 2]: 3\n"), ("config",)),
    # -- error lines stay short, whatever the input ---------------------------------------------------
    Case("a 100 000-character mask", lambda w, a: _prune(a, w, "SCU+" * 25_000 + "XYZ"), ("unknown mask term",)),
    Case("a 100 000-character dataset spec", lambda w, a: ["data", "show", LONG], ("unknown dataset",)),
    Case("a 100 000-character model spec", lambda w, a: ["units", "--model", "a/" * 50_000], ()),
    Case("a 100 000-character config key", lambda w, a: _run(w, f"? {LONG}\n: 1\n"), ("unknown config key",)),
    Case("a 100 000-character config value", lambda w, a: _run(w, f"eval: {{rules: [{LONG}]}}\n"),
         ("eval.rules[0]",)),
    Case("a 100 000-character --lr", lambda w, a: _finetune(a, w, "--lr", LONG), ("--lr",)),
    Case("a 100 000-character stage name", lambda w, a: ["run", "--config", _config(w, ""), "--out", str(w / "o"),
                                                          "--from", LONG], ("unknown stage",)),
    Case("a 100 000-character device", lambda w, a: ["units", *TINY, "--device", LONG], ("--device",)),
    Case("a config value with line breaks", lambda w, a: ["run", "--config", str(w / "r.yaml"), "--out", str(w / "o")],
         ("unknown tiny family",),
         setup=lambda w, a: _write(w / "r.yaml", 'model: "tiny:llama\\nsecond line\\rthird"\ndevice: cpu\n')),
    Case("a mask with a line break", lambda w, a: _prune(a, w, "SCU\nRU"), ("unknown mask term",)),
]

CASES += INPUT_CASES


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def _copied(w: Path, a: Path, name: str, record: str, change: Callable[[dict], object]) -> Path:
    folder = Path(shutil.copytree(a / name, w / name))
    _edit_json(folder / record, change)
    return folder


def _scores_with(w: Path, a: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    folder = _scores_folder(w, a)
    tensors = load_file(folder / "scores.safetensors")
    tensors["mlp"][1, 2] = value
    save_file(tensors, folder / "scores.safetensors")


def _groups_with(w: Path, a: Path, key: str, value) -> None:
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(a / "groups", w / "groups"))
    tensors = load_file(folder / "groups.safetensors")
    tensors[key][0, 0] = value
    save_file(tensors, folder / "groups.safetensors")


def _monitor_state(w: Path, **metadata: str) -> None:
    import torch

    from ssah.io import save_tensors_atomic
    from ssah.probe.monitor.config import MonitorConfig
    from ssah.probe.monitor.state import STATE_FORMAT

    base = {"format": STATE_FORMAT, "config": json.dumps(MonitorConfig(layers=[1]).to_dict()), "layers": "[1]",
            "threshold": "0.5", "num_layers": "3", "meta": "{}"}
    base.update(metadata)
    base = {key: value for key, value in base.items() if value is not None}
    save_tensors_atomic(w / "m.safetensors", {"weight": torch.zeros(1, 32), "bias": torch.zeros(1),
                                              "steer": torch.zeros(1, 32)}, base)


def _eval_state(w: Path, a: Path) -> list[str]:
    return ["eval", *EVAL, "--monitor", str(w / "m.safetensors"), "--out", str(w / "e")]


def _set(key: str, value):
    def change(data: dict) -> None:
        data[key] = value
    return change


def _drop(key: str):
    return lambda data: data.pop(key) and None


def _fail_safetensors(monkeypatch, w):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)


def _fail_plot(monkeypatch, w):
    import matplotlib.figure

    def broken(*args, **kwargs):
        raise RuntimeError("libpng error: Write Error")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)


def _fail_json(monkeypatch, w):
    import ssah.artifacts

    def broken(path, data):
        raise ValueError("Circular reference detected")

    monkeypatch.setattr(ssah.artifacts, "write_json_atomic", broken)


ODD = "d\udcff ir\n-x"  # a name with a byte that is not UTF-8, a space, a line break and a dash


def _odd_data(w: Path, a: Path) -> str:
    path = _mk(w / ODD) / "-p\udcfe airs.jsonl"
    shutil.copy(a / "pairs.jsonl", path)
    return f"jsonl:{path}"


RECORD_CASES: list[Case] = [
    # -- records ssah reads back: validated by schema, one line naming the file and how to rebuild it ----
    Case("a scores manifest whose units_per_layer is text", lambda w, a: [
        "groups", "--safety", str(w / "safety"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("manifest.json", "units_per_layer", "ssah score"),
        setup=lambda w, a: _copied(w, a, "safety", "manifest.json", _set("units_per_layer", "mlp"))),
    Case("a scores manifest whose num_layers is text", lambda w, a: [
        "groups", "--safety", str(w / "safety"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("num_layers", "--force"),
        setup=lambda w, a: _copied(w, a, "safety", "manifest.json", _set("num_layers", "3"))),
    Case("a scores manifest without its scorer", lambda w, a: [
        "groups", "--safety", str(a / "safety"), "--utility", str(w / "utility"), "--out", str(w / "g")],
        ("scorer is missing",), setup=lambda w, a: _copied(w, a, "utility", "manifest.json", _drop("scorer"))),
    Case("a scores manifest with no unit kinds", lambda w, a: [
        "groups", "--safety", str(w / "safety"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("units_per_layer",), setup=lambda w, a: _copied(w, a, "safety", "manifest.json", _set("units_per_layer", {}))),
    Case("a scores manifest holding a number", lambda w, a: [
        "groups", "--safety", str(w / "safety"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("not a JSON object",), setup=lambda w, a: _copied(w, a, "safety", "manifest.json", lambda d: 7)),
    Case("NaN scores", lambda w, a: [
        "groups", "--safety", str(w / "s"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("NaN or infinite",), setup=lambda w, a: _scores_with(w, a, float("nan"))),
    Case("infinite scores", lambda w, a: [
        "groups", "--safety", str(w / "s"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("1 of 144 scores of mlp units are NaN or infinite",), setup=lambda w, a: _scores_with(w, a, float("inf"))),
    Case("scores beyond float32", lambda w, a: [
        "groups", "--safety", str(w / "s"), "--utility", str(a / "utility"), "--out", str(w / "g")],
        ("NaN or infinite",), setup=lambda w, a: _scores_with(w, a, float("-inf"))),
    Case("groups whose safety scores are NaN", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "groups"), "--mask", "SCU+CU:top=0.1", "--out", str(w / "p")],
        ("groups.safetensors", "NaN or infinite"), setup=lambda w, a: _groups_with(w, a, "S.mlp", float("nan"))),
    Case("groups with a label that names no group", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "groups"), "--mask", "SCU", "--out", str(w / "p")],
        ("labels that name no group",), setup=lambda w, a: _groups_with(w, a, "labels.attn", 9)),
    Case("a groups record whose counts are a list", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "groups"), "--mask", "SCU", "--out", str(w / "p")],
        ("groups.json", "counts", "ssah groups"),
        setup=lambda w, a: _copied(w, a, "groups", "groups.json", _set("counts", [1, 2]))),
    Case("a groups record with a size of 5", lambda w, a: [
        "prune", *TINY, "--groups", str(w / "groups"), "--mask", "SCU", "--out", str(w / "p")],
        ("sizes.scu",), setup=lambda w, a: _copied(w, a, "groups", "groups.json", _set("sizes", {"scu": 5}))),
    Case("a groups record of zero units", lambda w, a: [
        "transfer", "--before", str(w / "groups"), "--after", str(a / "groups"), "--out", str(w / "t")],
        ("total_units",), setup=lambda w, a: _copied(w, a, "groups", "groups.json", _set("total_units", 0))),
    Case("a groups record without its model", lambda w, a: [
        "transfer", "--before", str(a / "groups"), "--after", str(w / "groups"), "--out", str(w / "t")],
        ("model_fingerprint is missing",),
        setup=lambda w, a: _copied(w, a, "groups", "groups.json", _drop("model_fingerprint"))),
    Case("an evaluation record whose ASR is text", lambda w, a: ["eval", *EVAL, "--out", str(w / "eval")],
         ("eval.json", "asr", "ssah eval"), setup=lambda w, a: _copied(w, a, "eval", "eval.json", _set("asr", "high"))),
    Case("an evaluation record whose model is text", lambda w, a: ["eval", *EVAL, "--out", str(w / "eval")],
         ("model",), setup=lambda w, a: _copied(w, a, "eval", "eval.json", _set("model", "tiny"))),
    Case("an evaluation record with a rate of 3", lambda w, a: ["eval", *EVAL, "--out", str(w / "eval")],
         ("overrefusal_rate",), setup=lambda w, a: _copied(w, a, "eval", "eval.json", _set("overrefusal_rate", 3))),
    Case("a training record without its result", lambda w, a: [
        "finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1", "--out", str(w / "ft")],
        ("train.json", "result is missing", "ssah finetune"),
        setup=lambda w, a: _copied(w, a, "ft", "train.json", _drop("result"))),
    Case("a training record whose steps are text", lambda w, a: [
        "finetune", *TINY, "--data", f"jsonl:{a / 'pairs.jsonl'}", "--max-steps", "1", "--out", str(w / "ft")],
        ("result.steps",),
        setup=lambda w, a: _copied(w, a, "ft", "train.json", lambda d: d["result"].update(steps="one"))),
    Case("a pruned model's record of the wrong shape", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(w / "pruned")],
        ("ssah_prune.json", "unit_share", "ssah prune"),
        setup=lambda w, a: _copied(w, a, "pruned", "ssah_prune.json", _set("unit_share", "5%"))),
    Case("a monitor state with a NaN threshold", _eval_state, ("threshold or weights that are NaN",),
         setup=lambda w, a: _monitor_state(w, threshold="nan")),
    Case("a monitor state without a threshold", _eval_state, ("'threshold' is missing",),
         setup=lambda w, a: _monitor_state(w, threshold=None)),
    Case("a monitor state whose layers are text", _eval_state, ("wrong shape",),
         setup=lambda w, a: _monitor_state(w, layers='"all"')),
    Case("a monitor state with a layer beyond its depth", _eval_state, ("wrong shape",),
         setup=lambda w, a: _monitor_state(w, layers="[7]")),
    Case("a monitor state of a deeper model", _eval_state, ("5 layers", "has 3"),
         setup=lambda w, a: _monitor_state(w, num_layers="5")),
    Case("a monitor state whose config is no JSON", _eval_state, ("does not parse",),
         setup=lambda w, a: _monitor_state(w, config="{layers")),
    # -- monitor and probe layers within the model's depth, before the model loads ---------------------
    Case("a monitor layer beyond the model in a config",
         lambda w, a: _run(w, "probe: {monitor_settings: {layers: [7]}}\n"),
         ("probe.monitor_settings.layers", "layer 7", "3 layers")),
    Case("a negative monitor layer beyond the model",
         lambda w, a: _run(w, "probe: {monitor_settings: {layers: [-4]}}\n"), ("layer -4",)),
    Case("a monitor config layer beyond the model", lambda w, a: _eval_with_monitor(w, "layers: [3]\n"),
         ("layer 3", "tiny:llama")),
    Case("probe --layers beyond the model", lambda w, a: ["probe", *TINY, "--layers", "0,5", "--out", str(w / "pr")],
         ("--layers", "layer 5")),
    Case("probe --layers far below zero", lambda w, a: ["probe", *TINY, "--layers", "-9", "--out", str(w / "pr")],
         ("layer -9",)),
    Case("a monitor layer beyond a saved model", lambda w, a: [
        "eval", *EVAL[2:], "--model", str(a / "ft"), "--monitor", str(w / "m.yaml"), "--out", str(w / "e")],
        ("layer 9",), setup=lambda w, a: _write(w / "m.yaml", "layers: [9]\n")),
    # -- writers: any failure of one is a write failure, one line, nothing lost ---------------------------
    Case("safetensors fails while a pruned model is saved", lambda w, a: _prune(a, w, "SCU"),
         ("could not write", "StorageFull"), inject=_fail_safetensors),
    Case("safetensors fails while a fine-tuned model is saved", lambda w, a: _finetune(a, w),
         ("could not write", "nothing already finished was lost"), inject=_fail_safetensors),
    Case("the plot writer fails", lambda w, a: _groups(a, w, "--sizes", "scu=0.05,ucu=0.1,ru=0.2"),
         ("could not write", "libpng"), inject=_fail_plot),
    Case("a record cannot be written", lambda w, a: _prune(a, w, "UCU"), ("could not write", "Circular"),
         inject=_fail_json),
    # -- any file name the OS allows: the work finishes and says where it wrote ------------------------
    Case("scores of a dataset with an odd name into an odd folder", lambda w, a: [
        "score", *TINY, "--data", _odd_data(w, a), "--limit", "2", "--out", str(w / ODD / "s\udcfe -")],
        ("wrote",), code=0),
    Case("groups into a folder whose name is not UTF-8", lambda w, a: _groups(a, w)[:-1] + [str(w / "g\udcff \n")],
         ("wrote",), code=0),
    Case("a pruned model into a folder whose name is not UTF-8", lambda w, a: [
        "prune", *TINY, "--groups", str(a / "groups"), "--mask", "SCU", "--out", str(w / ODD / "p")],
        ("saved",), code=0),
    Case("a model folder whose name is not UTF-8", lambda w, a: ["units", "--model", str(w / ODD / "m")],
         ("layers",), setup=lambda w, a: shutil.copytree(a / "model", _mk(w / ODD) / "m"), code=0),
    Case("an evaluation into a folder named with a leading dash", lambda w, a: ["eval", *EVAL, "--out", "-e\udcfe"],
         ("wrote",), code=0, chdir=True),
    Case("a transfer into a folder with a line break", lambda w, a: [
        "transfer", "--before", str(a / "groups"), "--after", str(a / "groups"), "--out", str(w / "t\n\udcfe")],
        ("rows",), code=0),
    Case("a dataset file whose name is not UTF-8", lambda w, a: ["data", "show", _odd_data(w, a)], ("Say",), code=0),
    Case("a run into a folder whose name is not UTF-8", lambda w, a: [
        "run", "--config", _config(w, "eval: {suites: [safety], limit: 2, max_new_tokens: 2, rules: [prefix]}\n"),
        "--out", str(w / ODD / "run"), "--only", "baseline"], (), code=0),
    Case("a fine-tuned model from and into odd names", lambda w, a: [
        "finetune", "--model", str(w / ODD / "m"), "--device", "cpu", "--data", _odd_data(w, a), "--max-steps", "1",
        "--out", str(w / ODD / "-f\udcfe")], ("saved",), code=0,
        setup=lambda w, a: shutil.copytree(a / "model", _mk(w / ODD) / "m")),
]

CASES += RECORD_CASES


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _score_other(out: Path) -> None:
    from ssah.models.loading import load_model
    from ssah.units.scores import score_dataset

    score_dataset(load_model("tiny:qwen2", device="cpu"), "benign:calibration[take=3]", out=out, progress=False)


def _group_other_sizes(out: Path, a: Path) -> None:
    from ssah.units.groups import make_groups
    from ssah.units.scores import Scores

    make_groups(Scores.load(a / "safety"), Scores.load(a / "utility"), {"scu": 0.1, "ru": 0.1}).save(out)


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in root.rglob("*") if path.is_file()}


def test_enough_cases():
    assert len(CASES) >= 200 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_is_one_line_and_loses_nothing(case, assets, tmp_path, capsys, monkeypatch):
    workspace = tmp_path / "w"
    workspace.mkdir()
    case.setup(workspace, assets)
    argv = case.argv(workspace, assets)
    if case.chdir:
        monkeypatch.chdir(workspace / "sub" if (workspace / "sub").is_dir() else workspace)
    if case.inject is not None:
        case.inject(monkeypatch, workspace)
    before = _snapshot(workspace, assets)
    result = run_cli(capsys, *argv)
    assert result.code == case.code, result
    if case.code == 0:
        assert "error" not in result.err.lower() and "Traceback" not in result.err, result.err
        for fragment in case.fragments:
            assert fragment in result.out, (fragment, result.out)
    else:
        # progress bars of work that ran before a late failure (a writer's) are no error lines
        result.err = "\n".join(line for line in result.err.split("\n") if "\r" not in line)
        assert_one_line_error(result, *case.fragments)
        assert len(result.err) <= 1200, f"error line of {len(result.err)} characters"
    after = _snapshot(workspace, assets)
    changed = [str(path) for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"files that existed before changed or vanished: {changed}"
