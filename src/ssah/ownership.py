"""What ssah wrote: the record every output folder keeps of ssah's own files, kept as it writes.

A folder ssah makes holds a marker, ``.ssah-output.json``: the kind of output, and a manifest of
what ssah wrote there as paths relative to the folder: `files`, `dirs` (folders it made) and
`trees` (hidden working folders, e.g. a model being built, whose whole content is ssah's). While a
command holds an output folder (`ssah.outputs.OutputFolder` registers it with `hold`), every write
inside it goes through `claim` first: the path is recorded before the file exists (so a killed
process leaves nothing of its own unrecorded), and a path that exists without being recorded is a
user's, so the write is refused. `remove` deletes only what is recorded, and refuses a folder that
holds anything else, hidden files and sub-folders included.

A sub-folder with a marker of its own (a folder a command made inside another) is judged by its own
manifest. Writes outside every held folder (caches) are not recorded. Cheap to import (no torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ssah.errors import SsahError

MARKER = ".ssah-output.json"
# the temporary sibling `ssah.io.atomic_write` writes a file through: .NAME.RANDOM.tmp
_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp")
_ACTIVE: list[Manifest] = []
_GUARD = threading.RLock()


def real(path: str | Path) -> Path:
    """The path with every symlink of its folder resolved (the last name itself is kept as is: a
    symlink there is an entry of the folder, not a way into another one)."""
    path = Path(path).expanduser()
    return Path(os.path.realpath(path.parent)) / path.name


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder ssah made, or None (no marker, or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _strings(value) -> set[str]:
    return {item for item in value if isinstance(item, str)} if isinstance(value, list) else set()


class Manifest:
    """The record of one folder ssah made (see the module docstring)."""

    def __init__(self, root: str | Path, marker: dict):
        self.root = Path(os.path.realpath(root))
        self.marker = marker
        self.files = _strings(marker.get("files"))
        self.dirs = _strings(marker.get("dirs"))
        self.trees = _strings(marker.get("trees"))

    @classmethod
    def read(cls, folder: str | Path) -> Manifest | None:
        """The manifest of `folder`; None when it has no marker, or one from before manifests
        (only `files` of a folder written whole, which holds no sub-folder, still counts)."""
        marker = read_marker(folder)
        if marker is None or not isinstance(marker.get("files"), list):
            return None
        return cls(folder, marker)

    @classmethod
    def scan(cls, folder: str | Path, marker: dict) -> Manifest:
        """A manifest recording everything now in `folder` (a folder ssah has just written whole)."""
        manifest = cls(folder, marker)
        for entry, is_dir in _walk(manifest.root):
            rel = entry.relative_to(manifest.root).as_posix()
            if rel != MARKER:
                (manifest.dirs if is_dir else manifest.files).add(rel)
        return manifest

    # -- what is ssah's ----------------------------------------------------------------------------
    def relative(self, path: str | Path) -> str | None:
        """`path` relative to the folder ('' for the folder itself), or None when outside it."""
        try:
            rel = real(path).relative_to(self.root).as_posix()
            return "" if rel == "." else rel
        except ValueError:
            return None if Path(os.path.realpath(path)) != self.root else ""

    def owns(self, rel: str, is_dir: bool) -> bool:
        if rel in ("", MARKER):
            return True
        parts = rel.split("/")
        if any("/".join(parts[:i]) in self.trees for i in range(1, len(parts) + 1)):
            return True
        if is_dir:
            return rel in self.dirs
        if rel in self.files:
            return True
        temporary = _TEMPORARY.fullmatch(parts[-1])  # a write of a recorded file, cut short by a kill
        return temporary is not None and "/".join([*parts[:-1], temporary.group(1)]) in (self.files | {MARKER})

    def foreign(self, rel: str = "") -> list[str]:
        """Every entry under `rel` that ssah did not write (paths relative to the folder), sorted;
        a folder ssah did not make is listed once, not entered."""
        start = self.root / rel if rel else self.root
        if not start.is_dir() or start.is_symlink():
            return [] if self.owns(rel, False) or not os.path.lexists(start) else [rel]
        found = []
        for entry in sorted(os.scandir(start), key=lambda e: e.name):
            child = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if not self.owns(child, is_dir):
                found.append(child)
            elif is_dir and not any(child == t or child.startswith(t + "/") for t in self.trees):
                inner = Manifest.read(entry.path)
                found += [f"{child}/{name}" for name in inner.foreign()] if inner else self.foreign(child)
        return found

    # -- recording ----------------------------------------------------------------------------------
    def claim(self, rel: str, what: str = "file") -> None:
        """Record `rel` (a file, a folder, or a working `tree`) before ssah writes it, with every
        folder on the way that does not exist yet; refuse a path or a folder on the way that exists
        and is not ssah's."""
        path = self.root / rel
        parts = rel.split("/")
        changed = False
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if not os.path.lexists(self.root / parent):
                changed |= parent not in self.dirs
                self.dirs.add(parent)
            elif not self.owns(parent, True):
                raise SsahError(f"{self.root / parent} is a folder ssah did not make; ssah writes nothing into it: "
                                f"move it out of {self.root}")
        if os.path.lexists(path) and not self.owns(rel, what != "file"):
            raise SsahError(f"{path} exists and ssah did not write it; it is left as it is: move it out of "
                            f"{self.root}")
        target = {"file": self.files, "dir": self.dirs, "tree": self.trees}[what]
        if rel not in target:
            target.add(rel)
            changed = True
        if changed:
            self.save()

    def forget(self, rel: str) -> None:
        """Drop `rel` and everything under it from the record (ssah removed it)."""
        prefix = rel + "/"
        for names in (self.files, self.dirs, self.trees):
            names.difference_update({n for n in names if n == rel or n.startswith(prefix)})
        self.save()

    def drop_missing(self) -> None:
        """Forget recorded paths that no longer exist, so a name a user reuses later is not taken for ssah's."""
        for names in (self.files, self.dirs, self.trees):
            names.difference_update({n for n in names if not os.path.lexists(self.root / n)})
        self.save()

    def save(self) -> None:
        """Write the marker atomically (temporary sibling, then rename). Not fsynced: it must
        survive a killed process, which the page cache does, and it is rewritten on every new path."""
        self.marker.update(files=sorted(self.files), dirs=sorted(self.dirs), trees=sorted(self.trees))
        fd, tmp = tempfile.mkstemp(prefix=f".{MARKER}.", suffix=".tmp", dir=self.root)  # as atomic_write names it
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.marker, handle, indent=1)  # ASCII: a name that is not UTF-8 is kept as an escape
                handle.write("\n")
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, self.root / MARKER)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _walk(root: Path) -> Iterator[tuple[Path, bool]]:
    for entry in os.scandir(root):
        is_dir = entry.is_dir(follow_symlinks=False)
        yield Path(entry.path), is_dir
        if is_dir:
            yield from _walk(Path(entry.path))


# -- the folders this process holds ------------------------------------------------------------------
@contextlib.contextmanager
def hold(manifest: Manifest) -> Iterator[Manifest]:
    """Record every write under `manifest.root` in it while the block runs."""
    with _GUARD:
        _ACTIVE.append(manifest)
    try:
        yield manifest
    finally:
        with _GUARD:
            _ACTIVE.remove(manifest)


def _holder(path: str | Path) -> tuple[Manifest, str] | None:
    """The innermost held folder that contains `path`, and `path` relative to it."""
    best = None
    for manifest in _ACTIVE:
        rel = manifest.relative(path)
        if rel is not None and (best is None or len(manifest.root.parts) > len(best[0].root.parts)):
            best = (manifest, rel)
    return best


def claim(path: str | Path, what: str = "file") -> None:
    """Record that ssah is about to write `path` (see `Manifest.claim`); a path in no held folder
    is not recorded."""
    with _GUARD:
        found = _holder(path)
        if found is not None and found[1]:
            found[0].claim(found[1], what)


def claim_written(target: str | Path, source: str | Path) -> None:
    """Record, under `target`, everything now in `source`: a folder built elsewhere that is about to
    take `target`'s place."""
    with _GUARD:
        found = _holder(target)
        if found is None or not found[1]:
            return
        manifest, rel = found
        manifest.claim(rel, "dir")
        for entry, is_dir in _walk(Path(source)):
            manifest.claim(f"{rel}/{entry.relative_to(source).as_posix()}", "dir" if is_dir else "file")


def make_dirs(path: str | Path) -> Path:
    """`mkdir -p`, recording each folder it makes inside a held folder."""
    path = Path(path)
    claim(path, "dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_removable(path: str | Path) -> None:
    """Refuse (one line) to remove `path` inside a held folder when it holds anything ssah did not write."""
    with _GUARD:
        found = _holder(path)
        if found is None or not found[1]:
            return
        manifest, rel = found
        foreign = manifest.foreign(rel)
        if foreign:
            raise SsahError(f"{path} holds files ssah did not write ({describe(foreign)}); ssah removes only what "
                            "it wrote: move them out first")


def remove(path: str | Path) -> None:
    """Delete `path` (a file or a folder) and forget it; inside a held folder only when everything
    in it is ssah's (`check_removable`)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    check_removable(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    forget(path)


def forget(path: str | Path) -> None:
    with _GUARD:
        found = _holder(path)
        if found is not None and found[1]:
            found[0].forget(found[1])


def owned(path: str | Path) -> bool:
    """Whether `path` is ssah's: recorded in a held folder, or outside every held folder."""
    with _GUARD:
        found = _holder(path)
        return found is None or found[0].owns(found[1], Path(path).is_dir() and not Path(path).is_symlink())


def describe(foreign: list[str]) -> str:
    """`foreign` (relative paths) in a few words on one line: the first, and how many more."""
    first = foreign[0] if foreign[0].isprintable() else repr(foreign[0])
    more = f", and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    return f"e.g. {first[:200]}{more}"
