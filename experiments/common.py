"""What the experiment scripts share: their common flags, the tiny sizes of --smoke, and the results file.

Every script appends one run to its results file (default experiments/results/NAME.json):

    {"script": "align_recipe.py", "question": "...",
     "runs": [{"source": "measured by this script" | "transcribed from the docstring" | ...,
               "date": ..., "commit": ..., "command": ..., "model": ..., "smoke": false,
               "settings": {...}, "rule": "...", "rows": [{...}, ...],
               "decision": {"kind": "choice", "chosen": ..., ...} | {"kind": "measurement", "summary": {...}}}]}

A "choice" decision applies the script's rule to the rows; a "measurement" has no rule and only
summarises them. Runs transcribed from earlier prose keep the date and commit that prose gives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SMOKE_MODEL = "tiny:llama"
# Deep-merged onto a run config by --smoke: a tiny random model and sizes that run in seconds (the sizes
# of tests/data/tiny_run.yaml). The numbers a smoke run gives mean nothing; it checks that the script runs.
SMOKE_CONFIG: dict[str, Any] = {
    "model": SMOKE_MODEL, "device": "cpu", "dtype": "fp32",
    "eval": {"limit": 4, "max_new_tokens": 4, "batch_size": 4, "text_limit": 2, "max_openings": 2},
    "scores": {"limit": 6, "batch_size": 3, "max_length": 256},
    "groups": {"sizes": {"scu": 0.05, "ucu": 0.1, "ru": 0.2}},
    "align": {"group_sizes": {"scu": 0.1, "ucu": 0.1, "ru": 0.2}, "benign_limit": 6, "recovery_lengths": [2, 4],
              "borderline_reply_tokens": 4,
              "train": {"max_steps": 2, "batch_size": 4, "max_length": 256, "bf16": False}},
    "finetune": {"train": {"max_steps": 2, "batch_size": 4, "max_length": 256, "limit": 8, "bf16": False}},
    "probe": {"limit": 4, "opening_lengths": [2, 4],
              "monitor_settings": {"calibration_limit": 4, "calibration_tokens": 4, "batch_size": 4}},
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None or False (required, derived or off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(script: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every script takes: --results and --smoke."""
    name = Path(script).stem
    title = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    out = argparse.ArgumentParser(description=title, formatter_class=HelpFormatter,
                                  epilog="Question, rule and results so far: the docstring and experiments/README.md.")
    out.add_argument("--results", type=Path, default=RESULTS_DIR / f"{name}.json",
                     help="JSON file this run is appended to")
    out.add_argument("--smoke", action="store_true",
                     help=f"tiny sizes (and {SMOKE_MODEL} where the script picks the model): checks that the "
                     "script runs in seconds; its numbers mean nothing")
    return out


def section(doc: str, label: str) -> str:
    """The paragraph of a script's docstring that starts with `label` ("Question", "Rule"), after its
    first colon, on one line: the docstring is where the question and the rule are written."""
    for paragraph in doc.strip().split("\n\n"):
        text = " ".join(line.strip() for line in paragraph.strip().splitlines())
        if text.startswith(label):
            return text.split(":", 1)[1].strip()
    raise ValueError(f"the docstring has no paragraph starting with {label!r}")


def run_context(run: Path):
    """The `RunContext` of a run folder: its config.yaml and its layout (whose study the config says)."""
    from ssah.config import load_config
    from ssah.pipeline.context import RunContext

    return RunContext(load_config(path=Path(run) / "config.yaml"), Path(run).resolve())


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied, nested dicts merged key by key (neither argument is modified)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def commit() -> str | None:
    """The checkout's commit (short hash), or None outside a git checkout."""
    try:
        found = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def _plain(value: Any) -> Any:
    """JSON-ready: paths as text, infinities and NaN as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dumps(value: Any, level: int = 0) -> str:
    """JSON text with one line per row (the entries of every "rows" list) and per list of plain values."""
    pad = " " * level
    if isinstance(value, dict) and value:
        lines = []
        for key, item in value.items():
            if key == "rows" and isinstance(item, list) and item:
                text = "[\n" + ",\n".join(f"{pad}  {json.dumps(row)}" for row in item) + f"\n{pad} ]"
            else:
                text = dumps(item, level + 1)
            lines.append(f"{pad} {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(f"{pad} {dumps(item, level + 1)}" for item in value) + f"\n{pad}]"
    return json.dumps(value)


def record_run(path: Path, *, script: str, doc: str, model: str, args: argparse.Namespace, rows: list[dict],
               decision: dict) -> dict:
    """Append this run to the results file at `path` (created with its header when missing); returns the run.
    The question and the rule are the "Question" and "Rule" paragraphs of the script's docstring `doc`."""
    path = Path(path)
    name = Path(script).name
    question, rule = section(doc, "Question"), section(doc, "Rule")
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("script") != name:
            raise SystemExit(f"error: {path} holds the results of {data.get('script')!r}, not {name!r}")
    else:
        data = {"script": name, "question": question, "runs": []}
    run = {"source": "measured by this script",
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit(), "command": shlex.join(["python", *sys.argv]), "model": model,
           "smoke": bool(args.smoke),
           "settings": _plain({k: v for k, v in vars(args).items() if k not in ("results", "smoke")}),
           "rule": rule, "rows": _plain(rows), "decision": _plain(decision)}
    data["runs"].append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(json.dumps({"decision": run["decision"]}))
    print(f"results appended to {path}")
    return run


def first_rule_rate(value: dict | float | None, rule: str) -> float | None:
    """A report's rate for `rule` (ASR-like entries are {rule: rate}; others are one number)."""
    if isinstance(value, dict):
        return value.get(rule)
    return value
