"""Finished work on disk, reused when it was made the same way: the one reuse check of ssah.

An artifact is a folder whose record file (e.g. ``eval.json``, ``manifest.json``, ``train.json``,
``done.json``) is written last, atomically, and carries the artifact's `identity`: what made it
(model and data fingerprints, settings). Looking an artifact up gives

- its record, when the record exists and holds the same identity: the work is done, reuse it;
- None, when there is no record (or `force`): do the work;
- None as well, when the record holds another identity and `replace` is set (inside a run folder,
  every artifact is ssah's own and is redone when its inputs change);
- otherwise one SsahError line naming what differs, so one command never overwrites another's
  results unasked (`guard` narrows the keys that count as "another result": an evaluation of the
  same model with other settings is simply redone).

    artifact = Artifact(out / "eval.json", "an evaluation", {"model": key, "settings": ...}, guard=("model",))
    record = artifact.lookup()
    if record is None:
        ...  # compute, write the other files
        artifact.save(report)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssah.errors import SsahError
from ssah.io import write_json_atomic
from ssah.schemas import check_record


def fingerprint(value: Any) -> str:
    """16 hex digits of sha256 over `value` as canonical JSON (what configs and identities hash to)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class Artifact:
    """A record file and the identity it must hold to be reused (see the module docstring)."""

    path: Path
    kind: str  # what it is, as it reads in a sentence: "an evaluation", "scores", "a trained model"
    identity: dict
    guard: Sequence[str] | None = None  # identity keys whose difference means another result (None: all)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.identity = _canonical(self.identity)

    def read(self) -> dict | None:
        """The record on disk, or None when there is none; one line when it is damaged."""
        if not self.path.is_file():
            return None
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SsahError(f"{self.path} is damaged ({str(err).splitlines()[0]}); delete that file to redo "
                            "the work") from None
        if not isinstance(record, dict):
            raise SsahError(f"{self.path} is damaged (not a JSON object); delete that file to redo the work")
        return check_record(self.path, record)

    def differences(self, record: dict) -> list[str]:
        """Identity keys whose recorded value differs from ours."""
        saved = record.get("identity") if isinstance(record.get("identity"), dict) else {}
        return [key for key in self.identity if saved.get(key) != self.identity[key]]

    def lookup(self, force: bool = False, replace: bool = False) -> dict | None:
        """The record to reuse, or None to (re)do the work; see the module docstring."""
        if force:  # redone whatever the old record holds, even when it is damaged
            return None
        record = self.read()
        if record is None:
            return None
        differing = self.differences(record)
        if not differing:
            return record
        guarded = [key for key in differing if self.guard is None or key in self.guard]
        if guarded and not replace:
            raise SsahError(f"{self.path.parent} already holds {self.kind} made differently (different "
                            f"{', '.join(guarded)}); choose another --out, or pass --force to replace it")
        return None

    def stamp(self, record: dict) -> dict:
        """`record` with this artifact's identity."""
        return {**record, "identity": self.identity}

    def save(self, record: dict) -> dict:
        """Write the record (with the identity) atomically; call it after every other file is written."""
        record = self.stamp(record)
        write_json_atomic(self.path, record)
        return record
