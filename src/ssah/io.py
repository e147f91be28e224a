"""Atomic file and folder writes: a killed process never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary sibling, fsync, then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_png(figure, path: str | Path, **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG in memory and write it with `atomic_write`."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig_kwargs)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def save_tensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write a safetensors file (tensors + string metadata) with `atomic_write`."""
    from safetensors.torch import save

    atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
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


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically (see `atomic_write`)."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are shared like any other folder
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing_run(out: str | Path, record: str, identity: dict, force: bool = False) -> dict | None:
    """Guard an output folder: the record it holds if it was made from the same inputs, else None.

    `identity` names what made the output (model fingerprint, data fingerprint, settings). A folder
    holding a record with another identity is refused, so one run never overwrites another's
    results; `force=True` allows redoing it.
    """
    from ssah.errors import SsahError

    path = Path(out) / record
    if not path.is_file():
        if Path(out).is_dir() and any(Path(out).iterdir()) and not force:
            raise SsahError(f"output folder {out} is not empty and holds no {record}; "
                            "choose another folder or pass --force")
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SsahError(f"{path} is not valid JSON ({err}); delete it or pass --force") from err
    if force:
        return None
    differing = [k for k, v in identity.items() if saved.get("identity", {}).get(k) != v]
    if differing:
        raise SsahError(f"output folder {out} holds another run (different {', '.join(differing)}); "
                        "choose another folder or pass --force")
    return saved
