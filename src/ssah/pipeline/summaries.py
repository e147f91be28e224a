"""The summaries stages return (typed), and the helpers that make them from reports and records.

Each summary is JSON-ready (it is written to the stage's done.json and gathered into results.json);
the TypedDicts below say what each stage's summary holds.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Headline(TypedDict):
    """The numbers of one evaluation that the report and the verdicts read."""

    rule: str  # the headline rule (eval.verdict_rule): which entry of asr and prefill_asr the verdicts read
    asr: dict[str, float] | None  # rule -> rate (with a judge, `judge`: unsafe / decided)
    prefill_asr: dict[str, float] | None
    refusal_score: float | None
    overrefusal_rate: float | None
    task_accuracy: float | None
    perplexity: float | None
    ci: dict[str, Any]  # Wilson 95% intervals of the rates
    n: dict[str, int]
    rule_agreement: dict[str, Any] | None  # where prefix and keywords disagree, per suite (both rules only)
    judge: dict[str, Any] | None  # the judge's model, decided and unknown counts per metric (None: no judge)


class TrainSummary(TypedDict):
    steps: int
    final_loss: float | None
    seconds: float
    check: dict[str, Any]  # what moved: frozen entries' largest change (0.0 when freezing held), shares
    lr: float | None  # the learning rate it trained at (None: a record that trained nothing, or an older one)


class BaselineSummary(TypedDict):
    eval: Headline
    model_fingerprint: str


class GroupsSummary(TypedDict):
    model: str
    model_fingerprint: str
    counts: dict[str, int]
    total_units: int


def headline(report: dict, rule: str | None = None) -> Headline:
    """The headline of an evaluation's report; `rule`: the headline rule (default: the one the run
    stamped on the report, `RunContext.evaluate`, else prefix)."""
    utility = report.get("utility") or {}
    judge = report.get("judge")
    return {"rule": rule or report.get("verdict_rule") or "prefix", "asr": report.get("asr"),
            "prefill_asr": report.get("prefill_asr"),
            "refusal_score": report.get("refusal_score"), "overrefusal_rate": report.get("overrefusal_rate"),
            "task_accuracy": utility.get("task_accuracy"), "perplexity": utility.get("perplexity"),
            "ci": report.get("ci"), "n": report.get("n"), "rule_agreement": report.get("rule_agreement"),
            "judge": None if not judge else {k: judge.get(k) for k in ("kind", "model", "fingerprint", "n", "unknown",
                                                                      "decided", "unknown_by_metric", "categories")}}


def headline_rate(block: dict | None, key: str = "asr") -> float | None:
    """The rate `key` (asr, prefill_asr) of a headline under its own rule (prefix for old summaries)."""
    value = (block or {}).get(key)
    return value.get((block or {}).get("rule") or "prefix") if isinstance(value, dict) else value


def train_summary(record: dict) -> TrainSummary:
    result = record["result"]
    return {"steps": result["steps"], "final_loss": result["final_loss"], "seconds": result["seconds"],
            "check": result["check"], "lr": (record.get("config") or {}).get("lr")}
