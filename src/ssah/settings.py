"""The base of every typed setting in ssah: strict pydantic models whose errors read as one line.

Configs (`ssah.config`), training settings (`ssah.train.settings`) and the monitor's config
(`ssah.probe.monitor.config`) derive from `Settings`: unknown keys, wrong types and values outside
a range are refused, and `settings_error` turns pydantic's report into one line that names the
key, e.g. ``unknown groups.ranking 'per_layer'; use global, per-layer``. Cheap to import.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ssah.defaults import SEED_MAX, quoted
from ssah.errors import SsahError

S = TypeVar("S", bound="Settings")
_nesting = threading.local()
# a seed every random generator ssah seeds accepts (numpy's, through accelerate, is the narrowest)
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
INT64 = 2**63
MAX_INPUT_FILE = 16 << 20  # bytes of a config or monitor file: far beyond any real one, short of a mistake


class InvalidSettings(SsahError):
    """Settings that do not validate: one line, and pydantic's full report in `error`."""

    def __init__(self, error: ValidationError, model: type[BaseModel]):
        super().__init__(settings_error(error, model))
        self.error, self.model = error, model


class Settings(BaseModel):
    """Strict: YAML `"3"` is not an int, `true` is not a number; unknown keys are errors; numbers
    are finite (`.inf` and `.nan` are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        # pydantic calls __init__ of nested settings too: only the outermost call turns the error into
        # one line, so that line names the whole key (scores.colour, not colour)
        depth = getattr(_nesting, "depth", 0)
        _nesting.depth = depth + 1
        try:
            super().__init__(**data)
        except ValidationError as err:
            if depth:
                raise
            raise InvalidSettings(err, type(self)) from None
        finally:
            _nesting.depth = depth

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise InvalidSettings(err, type(self)) from None

    @model_validator(mode="before")
    @classmethod
    def _tuples_are_lists(cls, data: Any) -> Any:
        # Python callers pass tuples where YAML gives lists; strict mode would refuse them
        if isinstance(data, dict):
            for key, value in data.items():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if type(item) is int and not -INT64 <= item < INT64:
                        raise ValueError(f"{key} {quoted(item, 40)} is beyond 64-bit integers, which torch "
                                         "takes; give a smaller number")
            return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}
        return data

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls: type[S], data: Any, source: str = "", prefix: str = "") -> S:
        """Validate `data`; any problem is one SsahError line ("SOURCE: ..." when `source` is given)."""
        try:
            return cls.model_validate({} if data is None else data)
        except (InvalidSettings, ValidationError) as err:
            error, model = (err.error, err.model) if isinstance(err, InvalidSettings) else (err, cls)
            line = settings_error(error, model, prefix)
            raise SsahError(f"{source}: {line}" if source else line) from None


def _key(loc: tuple, prefix: str = "") -> str:
    # union members appear in the location as type names ("dict[str,float]", "literal['auto']"): drop them
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif isinstance(part, str) and (part.isidentifier() or "[" not in part and "(" not in part):
            key = f"{key}.{part}" if key else part
    return key


def settings_error(err: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """The first problem of a pydantic ValidationError as one line naming the key."""
    first = err.errors(include_url=False)[0]
    kind, loc, value = first["type"], first["loc"], first.get("input")
    key = _key(loc, prefix)
    ctx = first.get("ctx") or {}
    if kind == "extra_forbidden":
        where = _key(loc[:-1], prefix)
        allowed = _allowed(model, loc[:-1])
        return f"unknown config key {quoted(key)}" + (f"; allowed{' in ' + where if where else ''}: {allowed}"
                                                 if allowed else "")
    if kind == "literal_error":
        choices = ", ".join(part.strip("'") for part in ctx.get("expected", "").replace(" or ", ", ").split(", "))
        return f"unknown {key} {quoted(value)}; use {choices}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"{key} must be {sign} {bound}, got {quoted(value)}"
    if kind == "value_error":
        message = str(ctx.get("error", first["msg"]))
        return f"{key}: {message}" if key else message
    if kind == "missing":
        return f"{key} is required"
    if kind in ("model_type", "dict_type"):
        return f"{key} must be a mapping of keys to values, got {quoted(value)}"
    wanted = first["msg"].removeprefix("Input should be ").removeprefix("a valid ").removeprefix("a ")
    return f"{key} must be {'an' if wanted[:1] in 'aeiou' else 'a'} {wanted}, got {quoted(value)}"


def _allowed(model: type[BaseModel] | None, loc: tuple) -> str:
    """The keys allowed where an unknown one was found (empty when it cannot be told)."""
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ", ".join(sorted(model.model_fields)) if model is not None else ""


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a small input file (UTF-8, or UTF-16 with its byte-order mark); one line when it
    is missing, a folder, unreadable or not text."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SsahError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise SsahError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise SsahError(f"{what} {path} is a folder; give a file")
    if not stat.S_ISREG(mode):
        # a pipe or FIFO blocks until someone writes, /dev/null reads as nothing: neither is a config
        # the run can record and read again
        kind = "a pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise SsahError(f"{what} {path} is {kind}, not a file; save it to a file and pass that")
    if path.stat().st_size > MAX_INPUT_FILE:
        raise SsahError(f"{what} {path} holds {path.stat().st_size:,} bytes; a {what} is a small text file "
                        f"(at most {MAX_INPUT_FILE:,} bytes)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SsahError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SsahError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None


def read_mapping_file(path: str | Path, what: str, yaml: bool = False) -> dict:
    """A YAML (`yaml`, or a .yaml/.yml name) or JSON file holding one mapping; every problem is one
    line, with the line number of a syntax error."""
    path = Path(path)
    text = read_text_file(path, what)
    try:
        if yaml or path.suffix in (".yaml", ".yml"):
            data = load_yaml(text)
        else:
            data = json.loads(text) if text.strip() else None
    except ValueError as err:  # json.JSONDecodeError
        raise SsahError(f"{what} {path} is not valid JSON ({err})") from None
    except Exception as err:  # yaml.YAMLError and its subclasses
        raise SsahError(f"{what} {path} is not valid YAML ({_yaml_problem(err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SsahError(f"{what} {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that a key given twice in one mapping is an error naming both lines
    (PyYAML keeps the last one silently, so a second `lr:` would quietly win)."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)


@functools.cache
def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                lines: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` keys may be overridden: that is what a merge is for
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = lines.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:  # an unhashable key: SafeLoader's own error names it
                        continue
                    if first != key_node.start_mark.line + 1:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {quoted(key, 80)} is given twice, on lines {first} and "
                            f"{key_node.start_mark.line + 1}; keep one", key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
