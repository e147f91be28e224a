"""The shapes of the records ssah reads back, checked when they are read (no torch).

A record file (a scores or groups manifest, eval.json, train.json, done.json, a pruned model's record)
that a person edited by hand or another program wrote may hold any JSON. `check_record` validates it
against the schema of its file name before any key is used, so a record of the wrong shape is one
line that names the file and the command that writes it again, never a KeyError or TypeError later.
The schemas pin what ssah reads; other keys are kept as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ssah.errors import SsahError

Count = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


class Record(BaseModel):
    """Keys ssah reads, with their types; any other key is allowed and kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class ScoresManifest(Record):
    format: str
    scorer: str
    model_fingerprint: str
    num_layers: Annotated[int, Field(ge=1)]
    units_per_layer: dict[str, Annotated[int, Field(ge=1)]] = Field(min_length=1)
    values_sha256: str | None = None
    identity: dict[str, Any] = Field(default_factory=dict)


class GroupsMeta(Record):
    format: str
    sizes: dict[str, Share]
    counts: dict[str, Count]
    shares: dict[str, Share]
    total_units: Annotated[int, Field(ge=1)]
    normalize: str
    ranking: str
    model_fingerprint: str
    num_layers: Annotated[int, Field(ge=1)]
    units_per_layer: dict[str, Annotated[int, Field(ge=1)]] = Field(min_length=1)


class EvalModel(Record):
    key: str


class EvalRecord(Record):
    """Partial evaluations are read too (a report gathers what each one holds), so every key is
    optional; a key that is there has the type ssah writes."""

    model: EvalModel | None = None
    rules: list[str] | None = None
    asr: dict[str, Share | None] | None = None
    prefill_asr: dict[str, Share | None] | None = None
    refusal_score: float | None = None
    overrefusal_rate: Share | None = None
    utility: dict[str, Any] | None = None
    n: dict[str, Any] | None = None
    ci: dict[str, Any] | None = None
    rule_agreement: dict[str, Any] | None = None
    identity: dict[str, Any] | None = None


class TrainResult(Record):

    steps: Count
    final_loss: float | None = None
    seconds: float
    check: dict[str, Any]


class TrainRecord(Record):
    source_model: str
    config: dict[str, Any]
    result: TrainResult
    identity: dict[str, Any]


class PruneRecord(Record):
    units_pruned: Count
    unit_share: Share
    entries_zeroed: Count
    source_model: str
    identity: dict[str, Any]


class DoneRecord(Record):
    stage: str
    seconds: float
    summary: dict[str, Any]
    identity: dict[str, Any]


# file name -> (schema, what the file is, the command that writes it again)
SCHEMAS: dict[str, tuple[type[Record], str, str]] = {
    "manifest.json": (ScoresManifest, "scores manifest", "rerun ssah score --out FOLDER --force"),
    "groups.json": (GroupsMeta, "groups record", "rerun ssah groups --out FOLDER --force"),
    "eval.json": (EvalRecord, "evaluation record", "rerun ssah eval --out FOLDER --force"),
    "train.json": (TrainRecord, "training record", "rerun ssah finetune (or ssah align) --out FOLDER --force"),
    "ssah_prune.json": (PruneRecord, "pruned model record", "rerun ssah prune --out FOLDER --force"),
    "done.json": (DoneRecord, "stage record", "rerun ssah run --out RUN_DIR --force STAGE"),
}


def rebuild_command(path: Path, command: str) -> str:
    """`command` with its placeholders filled from where the record lies."""
    folder = path.parent
    return (command.replace("FOLDER", str(folder)).replace("RUN_DIR", str(folder.parent))
            .replace("STAGE", folder.name))


def check_record(path: str | Path, record: Any) -> Any:
    """`record` when it has the shape its file name calls for (any shape for other names); else
    one SsahError line naming the file, the first problem and the command that writes it again."""
    path = Path(path)
    known = SCHEMAS.get(path.name)
    if known is None:
        return record
    schema, what, command = known
    if not isinstance(record, dict):
        problem = f"it holds a JSON {type(record).__name__}, not an object"
    else:
        try:
            schema.model_validate(record)
            return record
        except ValidationError as err:
            problem = _problem(err)
    raise SsahError(f"{path} is not an ssah {what} ({problem}); it was changed by hand or by another program: "
                    f"{rebuild_command(path, command)}")


def _problem(err: ValidationError) -> str:
    from ssah.defaults import quoted

    first = err.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"]) or "the record"
    if first["type"] == "missing":
        return f"{key} is missing"
    message = first["msg"].removeprefix("Input should be ").removeprefix("a valid ")
    return f"{key} should be {message}, got {quoted(first.get('input'), 60)}"
