"""Output folders: ssah never deletes or overwrites what it did not write, and never writes late.

Every command that writes a folder goes through an `OutputFolder`:

- `check()`, before any expensive step: the path is no file, ssah may write there (absent, empty,
  or a folder ssah made for the same kind of output), it is writable and has room for what the
  command will write; with `force`, it is not the current folder, holds no file ssah did not write,
  and contains no input of the command.
- `with folder:` holds an advisory lock (a hidden sibling ``.NAME.lock``; a second writer gets one
  line naming the holder) and, for outputs written in place, creates the folder with its marker.
- `swap()` builds an output written whole (a model folder) beside the target and swaps it in; the
  replaced folder is removed only after the new one is in place.

A folder ssah made carries a marker file (``.ssah-output.json``: the kind of output and, for
folders written whole, the names ssah wrote). Folders from before the marker count as ssah's when
every entry has a name this kind of output uses.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssah.errors import SsahError
from ssah.io import atomic_dir, write_json_atomic

MARKER = ".ssah-output.json"
_MB = 1 << 20


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: its name and the names ssah writes in it (glob patterns).

    `record`: the file whose presence marks a finished output of this kind (e.g. eval.json).
    `whole`: written whole into a sibling and swapped in (models); its own names are recorded in the
    marker when it is written, and `own` lists those a folder from before the marker must hold.
    """

    name: str
    own: tuple[str, ...]
    record: str | None = None
    whole: bool = False


def _is_ours(name: str, patterns: Sequence[str]) -> bool:
    """An entry ssah writes in this kind of folder: an own name, or the temporary sibling of one."""
    return name == MARKER or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f".{p}.*")
                                 for p in patterns)


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder ssah made, or None (no marker, or an unreadable one)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


class OutputFolder:
    """One command's output folder; see the module docstring."""

    def __init__(self, path: str | Path, kind: OutputKind, *, inputs: Sequence[str | Path] = (),
                 force: bool = False, need_bytes: int = 0, command: str = ""):
        self.path = Path(path)
        self.kind = kind
        self.inputs = [Path(p) for p in inputs if p]
        self.force = force
        self.need_bytes = need_bytes
        self.command = command or " ".join(["ssah", *sys.argv[1:2]])
        self._lock = None

    # -- checks -----------------------------------------------------------------------------------
    def check(self) -> OutputFolder:
        """Every check that needs no write (see the module docstring); returns self."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise SsahError(f"output {path} is a file; give a folder")
        if self.force or self.kind.whole:
            self._check_replaceable()
        if path.is_dir():
            self._check_ours()
        self._check_writable()
        return self

    def own_entries(self) -> set[str]:
        marker = read_marker(self.path) or {}
        recorded = set(marker.get("files") or ())
        return {e.name for e in self.path.iterdir() if e.name in recorded or _is_ours(e.name, self.kind.own)}

    def foreign_entries(self) -> list[str]:
        if not self.path.is_dir():
            return []
        own = self.own_entries()
        return sorted(e.name for e in self.path.iterdir() if e.name not in own)

    def _check_ours(self) -> None:
        marker = read_marker(self.path)
        if marker is not None and marker.get("kind") != self.kind.name:
            raise SsahError(f"{self.path} holds ssah {marker.get('kind')} output, not {self.kind.name} output; "
                            "choose another --out")
        foreign = self.foreign_entries()
        if foreign and (marker is None or self.force):
            raise SsahError(f"{self.path} holds files ssah did not write (e.g. {foreign[0]}); "
                            + ("ssah replaces only folders it wrote; " if self.force else "")
                            + "choose another --out")

    def _check_replaceable(self) -> None:
        target = _resolved(self.path)
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise SsahError(f"{self.path} is the current folder (or holds it); ssah will not replace it: "
                            "choose another --out")
        for source in self.inputs:
            source = _resolved(source)
            if source == target or target in source.parents:
                raise SsahError(f"{self.path} contains {source}, an input of this command; choose another --out")

    def _check_writable(self) -> None:
        probe = self.path if self.path.is_dir() and not self.kind.whole else _existing_ancestor(self.path.parent)
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as err:
            raise SsahError(f"cannot write to {probe} ({err.strerror or err}); choose another --out") from None
        free = shutil.disk_usage(probe).free
        if self.need_bytes and free < self.need_bytes + 16 * _MB:
            raise SsahError(f"only {free // _MB} MB free on the disk of {self.path}; this command writes about "
                            f"{self.need_bytes // _MB + 1} MB there; free some space or choose another --out")

    # -- lock and marker --------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire(self.path)
        try:
            if not self.kind.whole:
                self.path.mkdir(exist_ok=True)
                if read_marker(self.path) is None:
                    self._write_marker(self.path)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _write_marker(self, folder: Path, files: Sequence[str] | None = None) -> None:
        from ssah import __version__

        marker = {"made_by": f"ssah {__version__}", "kind": self.kind.name, "command": self.command}
        if files is not None:
            marker["files"] = sorted(files)
        write_json_atomic(folder / MARKER, marker)

    @contextlib.contextmanager
    def swap(self) -> Iterator[Path]:
        """A temporary sibling to write the whole output into; swapped in when the block ends."""
        if self._lock is None:
            raise RuntimeError("OutputFolder.swap() needs the folder's `with` block")
        with atomic_dir(self.path) as tmp:
            yield tmp
            self._write_marker(tmp, [entry.name for entry in tmp.iterdir()])


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve()


def _existing_ancestor(path: Path) -> Path:
    path = _resolved(path)
    while not path.exists():
        path = path.parent
    return path


def _acquire(folder: Path):
    """An advisory lock on a hidden sibling file (`FileLock`), with the holder's description inside:
    the file stays after release, so every waiter locks the same file."""
    from filelock import FileLock, Timeout

    path = folder.parent / f".{folder.name}.lock"
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SsahError(f"{folder} is being written by another ssah process ({_holder(path)}); wait for it to "
                        "finish or choose another --out") from None
    except OSError as err:
        raise SsahError(f"cannot lock {folder} ({err.strerror or err}); choose another --out") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["ssah", *sys.argv[1:]])[:200],
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):
        with open(path, "r+", encoding="utf-8") as handle:
            handle.truncate(0)
            handle.write(json.dumps(holder))
    return lock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"{holder['command']}, pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
