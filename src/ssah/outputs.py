"""Output folders: ssah writes only into folders it made, and removes only what it recorded writing.

Every command that writes a folder goes through an `OutputFolder`:

- `check()`, before any expensive step: the path is no file, and is absent, an empty folder, or a
  folder ssah made for the same kind of output (its marker, ``.ssah-output.json``, records what ssah
  wrote there: `ssah.ownership`). A folder without a marker is never written into, `--force` or not.
  With `force`, or for an output written whole (a model), the folder must hold nothing ssah did not
  write (hidden files and sub-folders included), must not be the current folder and must not contain
  an input of the command. It is writable and has room for what the command will write.
- `with folder:` holds an advisory lock keyed on the folder's real path (`lock_path`: a file in
  ``$SSAH_CACHE/locks`` named by a hash of that path, so a symlinked way in meets the same lock and
  no user file is touched; a second writer gets one line naming the holder), and, for outputs
  written in place, creates the folder with its marker and records every write inside it.
- `swap()` builds an output written whole (a model folder) beside the target and swaps it in; the
  replaced folder is removed only after the new one is in place.

`check_file` and `record_file` do the same for a single file ssah writes outside its folders
(`ssah report RUN --out FILE`): it replaces only a file it wrote, unchanged since.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from ssah import ownership
from ssah.errors import SsahError
from ssah.io import atomic_dir, write_json_atomic
from ssah.ownership import MARKER, Manifest, read_marker

__all__ = ["MARKER", "OutputFolder", "OutputKind", "check_file", "lock_path", "read_marker", "record_file"]
_MB = 1 << 20


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: its name, and the names ssah writes in it (glob patterns: the layout,
    for readers; what ssah did write is the folder's record, `ssah.ownership`). `record`: the file
    whose presence marks a finished output of this kind (e.g. eval.json). `whole`: written whole
    into a sibling and swapped in (models)."""

    name: str
    own: tuple[str, ...]
    record: str | None = None
    whole: bool = False


class OutputFolder:
    """One command's output folder; see the module docstring."""

    def __init__(self, path: str | Path, kind: OutputKind, *, inputs: Sequence[str | Path] = (),
                 force: bool = False, need_bytes: int = 0, command: str = ""):
        self.path = Path(path)
        self.kind = kind
        self.inputs = [Path(p) for p in inputs if p]
        self.force = force
        self.need_bytes = need_bytes
        self.command = command or _command_path()
        self._lock = None
        self._hold = None

    @property
    def target(self) -> Path:
        """The folder itself, every symlink on the way resolved (a symlink named by --out is followed:
        ssah writes into the folder it names and never replaces the link)."""
        return Path(os.path.realpath(self.path.expanduser()))

    # -- checks -----------------------------------------------------------------------------------
    def check(self) -> OutputFolder:
        """Every check that needs no write (see the module docstring); returns self."""
        path, target = self.path, self.target
        if target.exists() and not target.is_dir():
            raise SsahError(f"output {path} is a file; give a folder")
        if self.force or self.kind.whole:
            self._check_replaceable()
        if target.is_dir():
            self._check_ours(target)
        self._check_writable()
        return self

    def foreign_entries(self) -> list[str]:
        """What the folder holds that ssah did not write (relative paths); everything when it has no record."""
        target = self.target
        if not target.is_dir():
            return []
        manifest = Manifest.read(target)
        return manifest.foreign() if manifest else sorted(os.listdir(target))

    def _check_ours(self, target: Path) -> None:
        marker = read_marker(target)
        if marker is None:
            entries = sorted(os.listdir(target))
            if entries:
                raise SsahError(f"{self.path} holds files ssah did not write ({ownership.describe(entries)}) and "
                                f"is no folder ssah made (no {MARKER}); ssah writes only into folders it made: "
                                "choose a new or empty --out")
            return
        if marker.get("kind") != self.kind.name:
            raise SsahError(f"{self.path} holds ssah {marker.get('kind')} output, not {self.kind.name} output; "
                            "choose another --out")
        manifest = Manifest.read(target)
        if manifest is None:
            raise SsahError(f"{self.path} was made by an earlier ssah that kept no record of its files, so ssah "
                            "cannot tell them from yours; choose a new --out")
        foreign = manifest.foreign()
        if foreign and (self.force or self.kind.whole):
            raise SsahError(f"{self.path} holds files ssah did not write ({ownership.describe(foreign)}); ssah "
                            "replaces only what it wrote: move them out or choose another --out")

    def _check_replaceable(self) -> None:
        target = self.target
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise SsahError(f"{self.path} is the current folder (or holds it); ssah will not replace it: "
                            "choose another --out")
        for source in self.inputs:
            source = source.expanduser().resolve()
            if source == target or target in source.parents:
                raise SsahError(f"{self.path} contains {source}, an input of this command; choose another --out")

    def _check_writable(self) -> None:
        target = self.target
        probe = target if target.is_dir() and not self.kind.whole else _existing_ancestor(target.parent)
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
        self._lock = _acquire(self.path, self.target)
        try:
            self.check()  # again under the lock: another writer may have finished since
            if not self.kind.whole:
                target = self.target
                ownership.make_dirs(target)
                manifest = Manifest.read(target) or Manifest(target, self._marker())
                manifest.drop_missing()  # also writes the marker of a new folder
                self._hold = ownership.hold(manifest)
                self._hold.__enter__()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._release()

    def _release(self) -> None:
        if self._hold is not None:
            self._hold.__exit__(None, None, None)
            self._hold = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _marker(self) -> dict:
        from ssah import __version__

        return {"made_by": f"ssah {__version__}", "kind": self.kind.name, "command": self.command}

    @contextlib.contextmanager
    def swap(self) -> Iterator[Path]:
        """A temporary sibling to write the whole output into; swapped in, with its record, when the block ends."""
        if self._lock is None:
            raise RuntimeError("OutputFolder.swap() needs the folder's `with` block")
        with atomic_dir(self.target) as tmp:
            yield tmp
            Manifest.scan(tmp, self._marker()).save()


def _command_path() -> str:
    """The command being run, e.g. 'ssah score' (recorded in the marker)."""
    import click

    context = click.get_current_context(silent=True)
    return context.command_path if context is not None else "ssah"


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().resolve()
    while not path.exists():
        path = path.parent
    return path


# -- locks ----------------------------------------------------------------------------------------------
def lock_path(folder: str | Path) -> Path:
    """The lock file of an output folder: in the cache's locks folder, named by a hash of the
    folder's real path (every way to the folder meets the same lock; no name in the user's folders)."""
    from ssah.defaults import cache_dir

    key = hashlib.sha256(os.fsencode(os.path.realpath(Path(folder).expanduser()))).hexdigest()[:32]
    return cache_dir() / "locks" / f"{key}.lock"


def _acquire(folder: Path, target: Path | None = None):
    """An advisory lock (`FileLock` on `lock_path`), with the holder's description inside: the file
    stays after release, so every waiter locks the same file."""
    from filelock import FileLock, Timeout

    target = target or Path(os.path.realpath(folder))
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=0)
        lock.acquire()
    except Timeout:
        raise SsahError(f"{folder} is being written by another ssah process ({_holder(path)}); wait for it to "
                        "finish or choose another --out") from None
    except OSError as err:
        raise SsahError(f"cannot lock {folder}: {path.parent} is not writable ({err.strerror or err}); set "
                        "SSAH_CACHE to a writable folder") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["ssah", *sys.argv[1:]])[:200],
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "folder": str(target)}
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


# -- single files -------------------------------------------------------------------------------------
def _ledger(path: Path) -> Path:
    from ssah.defaults import cache_dir

    key = hashlib.sha256(os.fsencode(ownership.real(path))).hexdigest()[:32]
    return cache_dir() / "written" / f"{key}.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_file(path: str | Path, option: str = "--out") -> None:
    """Refuse (one line) to write the single file `path` unless it is absent, or a file ssah wrote
    there (`record_file`) and nobody changed since; refuse a path inside a folder ssah made."""
    path = Path(path)
    if path.is_dir():
        raise SsahError(f"{option} {path} is a folder; give the name of the file to write")
    for folder in ownership.real(path).parents:
        if (folder / MARKER).is_file():
            raise SsahError(f"{option} {path} is inside {folder}, a folder ssah made and keeps a record of; "
                            "give a path outside it")
    if not os.path.lexists(path):
        return
    try:
        recorded = json.loads(_ledger(path).read_text(encoding="utf-8")).get("sha256")
        same = path.is_file() and not path.is_symlink() and recorded == _digest(path)
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise SsahError(f"{path} exists and ssah did not write it (or it changed since); it is left as it is: "
                        f"choose another {option}")


def record_file(path: str | Path) -> None:
    """Remember the content ssah wrote at `path`, so a later run may replace it (`check_file`)."""
    path = Path(path)
    write_json_atomic(_ledger(path), {"path": str(ownership.real(path)), "sha256": _digest(path)})
