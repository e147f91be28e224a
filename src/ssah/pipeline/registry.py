"""The stage registry: what each stage reads, what it needs, and when its finished work is reused.

A stage is one module of `ssah.pipeline.stages` that registers a `Stage`: its name, the part of the
config it reads (`reads`), the stages whose results it uses (`needs`), and the function that runs it
and returns its summary. A stage's identity is the hash of what it reads and of the identities of
the stages it needs, so a changed setting redoes exactly the stages it reaches; `done.json` records
the identity and the summary (`ssah.artifacts`). Inside a stage, every artifact (scores, trained
models, evaluations, cached generations) checks its own inputs again, so a redone stage still reuses
whatever its change left valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssah.artifacts import Artifact, fingerprint
from ssah.config import RunConfig
from ssah.pipeline.layout import STAGES, RunLayout

STAGE_REGISTRY: dict[str, Stage] = {}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any], dict]  # RunContext -> summary (a JSON-ready dict of the stage's summary type)
    reads: Callable[[RunConfig], dict]  # the config values the stage depends on
    needs: tuple[str, ...] = ()  # stages whose results it reads
    needs_done: bool = True  # False: it runs on whatever of its needs has finished (the report)


def register(stage: Stage) -> Stage:
    STAGE_REGISTRY[stage.name] = stage
    return stage


def common(config: RunConfig) -> dict:
    """What every evaluation depends on: the model, the seed, the data and the evaluation settings (not
    the slot count: replies are the same at any; not the attack grid's suites, which only its stage reads)."""
    evaluation = config.eval.model_dump(exclude={"slots"})
    evaluation["stage_suites"] = {kind: suites for kind, suites in evaluation["stage_suites"].items()
                                  if kind != "attacks"}
    return {"model": config.model, "seed": config.seed, "data": config.data.model_dump(), "eval": evaluation}


def stage_identity(name: str, config: RunConfig) -> dict:
    stage = STAGE_REGISTRY[name]
    return {"stage": name, "reads": fingerprint(stage.reads(config)),
            "needs": {need: stage_identity(need, config)["reads"] for need in _closure(name)}}


def _closure(name: str) -> list[str]:
    """Every stage `name` needs, directly or through another, in pipeline order."""
    found: set[str] = set()
    todo = list(STAGE_REGISTRY[name].needs)
    while todo:
        need = todo.pop()
        if need not in found:
            found.add(need)
            todo += STAGE_REGISTRY[need].needs
    return [stage for stage in STAGES if stage in found]


def done_record(name: str, config: RunConfig, layout: RunLayout) -> Artifact:
    """The stage's done.json: present with this identity when the stage is finished for this config."""
    return Artifact(layout.done(name), f"the {name} stage", stage_identity(name, config))


def stage_summary(name: str, config: RunConfig, layout: RunLayout) -> dict:
    """The summary in a stage's done.json ({} when the stage has not finished)."""
    record = done_record(name, config, layout).read()
    return (record or {}).get("summary", {})
