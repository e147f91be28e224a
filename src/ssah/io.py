"""Atomic file and folder writes: a killed process never leaves a half-written artifact.

Files are written to a hidden temporary sibling (``.NAME.*.tmp``), flushed and renamed over the
target; folders are built in a hidden sibling (``.NAME.*``) and swapped in (`atomic_dir`). Both
follow the user's umask, like any file the user's programs create. Inside an output folder a command
holds, each write is recorded first and refused over a file ssah did not write (`ssah.ownership`).
Cheap to import (no torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ssah import ownership


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn any exception of the writer inside (safetensors, matplotlib, save_pretrained: each has its
    own error types for a full disk or a lost mount) into one SsahError line naming `path`; the
    atomic writes around it keep everything written before."""
    from ssah.errors import SsahError

    try:
        yield
    except (SsahError, OSError):
        raise  # one line already (the CLI prints an OSError with its file name)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise SsahError(f"could not write {path} ({text[0] if text else type(err).__name__}); nothing already "
                        "finished was lost: free some space or choose another --out, then rerun") from err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary sibling, fsync, then rename over `path`: readers never see half a file."""
    path = Path(path)
    ownership.claim(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically. A file name whose bytes are not UTF-8 reaches Python as lone
    surrogates; in text meant for reading (a report) they are written as backslash escapes."""
    atomic_write(path, text.encode("utf-8", "backslashreplace"))


def _json_bytes(dump) -> bytes:
    """JSON as UTF-8, or, when a string holds such surrogates, as ASCII with \\udcXX escapes, which
    `json.loads` reads back as the very same file name."""
    try:
        return dump(False).encode("utf-8")
    except UnicodeEncodeError:
        return dump(True).encode("ascii")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically (see `atomic_write`)."""
    atomic_write(path, _json_bytes(lambda ascii: json.dumps(data, indent=2, sort_keys=False, default=str,
                                                            ensure_ascii=ascii) + "\n"))


def write_jsonl_atomic(path: str | Path, rows: Sequence[dict]) -> None:
    atomic_write(path, _json_bytes(lambda ascii: "".join(json.dumps(row, ensure_ascii=ascii) + "\n"
                                                         for row in rows)))


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """A JSON file's content; one SsahError line (with the fix) when it is missing or damaged."""
    from ssah.errors import SsahError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SsahError(f"{what} {path} is missing; {fix}") from None
    except (OSError, ValueError) as err:
        raise SsahError(f"{what} {path} is damaged ({str(err).splitlines()[0]}); {fix}") from None


def save_png(figure, path: str | Path, **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG in memory and write it with `atomic_write`."""
    import io

    buffer = io.BytesIO()
    with writing(path):
        figure.savefig(buffer, format="png", **savefig_kwargs)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def save_tensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write a safetensors file (tensors + string metadata) with `atomic_write`."""
    from safetensors.torch import save

    with writing(path):
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, data)
    return Path(path)


def read_tensors_with_metadata(path: str | Path, what: str, missing_hint: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file; one SsahError line for a missing or damaged file."""
    from safetensors import safe_open

    from ssah.errors import SsahError

    path = Path(path)
    if not path.is_file():
        raise SsahError(f"{what} {path} does not exist; {missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except Exception as err:  # safetensors raises several types on a damaged file
        raise SsahError(f"{what} {path} is not a readable safetensors file: {err}") from err


@contextlib.contextmanager
def encodable_path(path: str | Path) -> Iterator[Path]:
    """`path`, or, when its name holds bytes that are not UTF-8 (libraries written in Rust, such as
    safetensors and tokenizers, take UTF-8 paths only), a symbolic link to it under an ASCII name in
    the temporary folder, removed afterwards. Reads and writes through the link reach `path` itself."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield path
        return
    aliases = Path(tempfile.mkdtemp(prefix="ssah-path-"))
    alias = aliases / (path.suffix.encode("ascii", "ignore").decode() and f"p{path.suffix}" or "p")
    try:
        os.symlink(os.path.abspath(path), alias)
        yield alias
    finally:
        shutil.rmtree(aliases, ignore_errors=True)  # removes the link, never what it points to


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling folder; on success it takes `target`'s place, on error it is
    removed. A `target` that exists is swapped out and removed only after the new folder is in place:
    inside a held output folder it must hold only what ssah wrote (`ssah.ownership`); elsewhere the
    caller must have checked that (`ssah.outputs.OutputFolder`)."""
    target = Path(target)
    ownership.make_dirs(target.parent)
    if target.exists():
        ownership.check_removable(target)
    tmp = _working_dir(target, "")
    try:
        with writing(target), encodable_path(tmp) as writable:
            yield writable  # the block writes the folder's files: any failure there is a write failure
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs follow the umask
        old = None
        if target.exists():
            ownership.check_removable(target)
            old = _working_dir(target, "old.")
            os.rename(target, old / target.name)
        try:
            ownership.claim_written(target, tmp)
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old / target.name, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            ownership.forget(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ownership.forget(tmp)


def _working_dir(target: Path, kind: str) -> Path:
    """A hidden sibling of `target`, recorded whole as ssah's (a kill may leave it behind)."""
    path = target.parent / f".{target.name}.{kind}{secrets.token_hex(4)}"
    ownership.claim(path, "tree")  # before it exists: a folder that exists unrecorded is a user's
    path.mkdir(mode=0o700)
    return path
