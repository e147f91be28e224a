"""Bridge to lm-evaluation-harness (optional dependency: pip install lm-eval).

The in-memory model is handed to lm-eval as an `HFLM`, so a pruned or otherwise modified model is
evaluated as it is, without saving it. Tasks are lm-eval task names (`arc_easy`, `hellaswag`, ...) or
tasks defined in YAML files under `include_path` (e.g. a local task over a JSONL file, for offline use).
Standard tasks download their data through the `datasets` library, so they need the network or a
warm Hugging Face cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ssah.errors import SsahError

INSTALL_HINT = "pip install lm-eval"


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    """One clear error with the install command when lm-eval is missing."""
    if not lm_eval_available():
        raise SsahError(f"--lm-eval-tasks needs lm-evaluation-harness, which is not installed; install it with: "
                        f"{INSTALL_HINT}")


def _task_manager(tasks: Sequence[str], include_path: str | Path | None):
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.exists():
            raise SsahError(f"lm-eval include path {str(include_path)!r} does not exist; "
                            "pass a folder of task YAML files")
        # Indexing lm-eval's thousands of built-in tasks takes ~10 s: skip it when the local folder has them all.
        local = TaskManager(include_path=str(path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
        manager = TaskManager(include_path=str(path))
    else:
        manager = TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise SsahError(f"unknown lm-eval task {unknown[0]!r}; list tasks with `lm-eval ls tasks`, "
                        "or define it in a YAML file under --lm-eval-include")
    return manager


def _numeric_metrics(task_result: dict) -> dict[str, float]:
    out = {}
    for name, value in task_result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or name in ("sample_len",):
            continue
        if isinstance(value, float) and math.isnan(value):
            continue
        out[name] = float(value)
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, batch_size: int = 8, limit: int | None = None,
                num_fewshot: int | None = None, include_path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the in-memory model; returns task -> {metric: value} (e.g. 'acc,none').

    `limit` caps the documents per task (for quick runs); stderr bootstrapping is skipped.
    """
    tasks = [task.strip() for task in tasks if task.strip()]
    if not tasks:
        raise SsahError("--lm-eval-tasks got no task name; e.g. --lm-eval-tasks arc_easy,hellaswag")
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(tasks, include_path)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    except (OSError, ConnectionError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SsahError(f"lm-eval could not run {', '.join(tasks)}: {first} (standard tasks download their "
                        "data: run online once, or define a local task with --lm-eval-include)") from err
    return {task: _numeric_metrics(values) for task, values in results["results"].items()}
