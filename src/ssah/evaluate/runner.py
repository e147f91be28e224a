"""`evaluate_model`: run the evaluation suites on a prepared model and write the report.

The model arrives ready (loaded, pruned, fine-tuned ...) with a `model_key` that names it in the
generation cache, so callers can modify a model (e.g. inside a pruning context manager) and still
resume and reuse cached replies. Output folder:

- `eval.json`: the report (see `evaluate_model`), written last and atomically: its presence marks a
  finished evaluation, and its model key guards the folder against mixing two models.
- `replies.jsonl`: one row per generated reply with its verdict under every rule (atomic).
- `generations.jsonl`: the generation cache (append-only, fsync'ed per batch); rerunning the same
  evaluation regenerates nothing, an interrupted one resumes where it stopped.

System prompt conditions: `none` (no system message: the model's own template default) and `default`
(`settings.system`, by default the Llama-2-Chat system prompt). With `both`, the headline safety rates
pool the two conditions (k and n summed: the paper's "ASR avg" when both have the same prompts) and
`by_system_prompt` holds each one. Utility is measured without a system prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ssah.data import Dataset, load_dataset
from ssah.errors import SsahError
from ssah.evaluate.generation import GenerationCache
from ssah.evaluate.refusal_score import DEFAULT_MAX_OPENINGS, DEFAULT_OPENING_WORDS, RefusalScore, refusal_score
from ssah.evaluate.rules import check_rules
from ssah.evaluate.safety import DEFAULT_SYSTEM_PROMPT, OVERREFUSAL_RULE, SafetyRun, prefill_openings, run_prompts
from ssah.evaluate.stats import Rate
from ssah.evaluate.utility import (
    DEFAULT_STRIDE, DEFAULT_WINDOW, Perplexity, TaskAccuracy, checkable, perplexity, task_accuracy,
)

SUITES = ("safety", "refusal_score", "prefill", "overrefusal", "utility")
DEFAULT_SUITES = ("safety", "refusal_score", "prefill", "overrefusal", "utility")
SYSTEM_PROMPT_MODES = ("none", "default", "both")
SCHEMA_VERSION = 1

EVAL_FILE, REPLIES_FILE, CACHE_FILE = "eval.json", "replies.jsonl", "generations.jsonl"

# data role -> (default spec, suites that need it)
DATA_ROLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "harmful": ("harmful:test", ("safety", "refusal_score", "prefill")),
    "sensitive": ("sensitive_safe:test", ("overrefusal",)),  # the train split may be used in alignment
    "benign": ("benign:test", ("utility",)),
    "text": ("text", ("utility",)),
    "refusals": ("refusals", ("refusal_score",)),
    "compliance": ("compliance_openings", ("refusal_score", "prefill")),
}


@dataclass
class EvalSettings:
    """What to run and how. Unknown suites, rules or modes are rejected by `validate`."""

    suites: tuple[str, ...] = DEFAULT_SUITES
    rules: tuple[str, ...] = ("prefix", "keywords")
    max_new_tokens: int = 64
    batch_size: int = 8
    system_prompt: str = "both"  # which conditions: none, default or both
    system: str = DEFAULT_SYSTEM_PROMPT  # the text of the `default` condition
    limit: int | None = None  # first N records of each dataset
    opening_words: int = DEFAULT_OPENING_WORDS
    max_openings: int = DEFAULT_MAX_OPENINGS
    ppl_window: int = DEFAULT_WINDOW
    ppl_stride: int = DEFAULT_STRIDE
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None
    lm_eval_include: str | None = None
    progress: bool = True

    def validate(self) -> EvalSettings:
        for suite in self.suites:
            if suite not in SUITES:
                raise SsahError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
        if not self.suites:
            raise SsahError(f"no suite given; known suites: {', '.join(SUITES)}")
        self.suites = tuple(dict.fromkeys(self.suites))
        self.rules = tuple(check_rules(list(self.rules)))
        if self.system_prompt not in SYSTEM_PROMPT_MODES:
            raise SsahError(f"unknown system prompt mode {self.system_prompt!r}; use one of "
                            f"{', '.join(SYSTEM_PROMPT_MODES)}")
        if self.system_prompt != "none" and not self.system.strip():
            raise SsahError("the system prompt text is empty; give a text or use --system-prompt none")
        for name in ("max_new_tokens", "batch_size", "opening_words", "max_openings", "ppl_window", "ppl_stride"):
            if getattr(self, name) < 1:
                raise SsahError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise SsahError(f"--limit must be at least 1, got {self.limit}")
        return self

    def conditions(self) -> dict[str, str | None]:
        """System prompt condition name -> system prompt text (None: no system message)."""
        modes = ("none", "default") if self.system_prompt == "both" else (self.system_prompt,)
        return {mode: (None if mode == "none" else self.system) for mode in modes}


def load_eval_data(suites: Sequence[str], limit: int | None = None,
                   **specs: str | Dataset | None) -> dict[str, Dataset]:
    """The datasets the suites need, by role (harmful, sensitive, benign, text, refusals, compliance).

    Each role takes a spec (see `ssah.data.load_dataset`) or a Dataset; unnamed roles use the
    built-in default. With `limit`, every set is cut to its first `limit` records (the opening sets
    used by the refusal score and the prefill attack are kept whole).
    """
    unknown = set(specs) - set(DATA_ROLES)
    if unknown:
        raise SsahError(f"unknown data role {sorted(unknown)[0]!r}; roles: {', '.join(DATA_ROLES)}")
    out: dict[str, Dataset] = {}
    for role, (default, users) in DATA_ROLES.items():
        if not any(suite in users for suite in suites):
            continue
        given = specs.get(role)
        dataset = given if isinstance(given, Dataset) else load_dataset(given or default)
        if limit is not None and role not in ("refusals", "compliance"):
            dataset = dataset.take(limit)
        if len(dataset) == 0:
            raise SsahError(f"dataset {dataset.name!r} ({role}) has no records; pass a dataset with records")
        out[role] = dataset
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling and os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_report(out_dir: str | Path) -> dict | None:
    """The eval.json in `out_dir`, or None when there is none."""
    path = Path(out_dir) / EVAL_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SsahError(f"{path} is not valid JSON ({err}); remove it or pass --force") from None


def check_output_folder(out_dir: str | Path, model_key: str, force: bool = False) -> Path:
    """Refuse a folder that holds another model's evaluation (unless `force`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SsahError(f"output {out} is a file; pass a folder to --out")
    if force:
        return out
    report = read_report(out) if out.is_dir() else None
    if report is not None:
        previous = report.get("model", {})
        if previous.get("key") != model_key:
            raise SsahError(f"{out} holds an evaluation of another model ({previous.get('spec')!r}, key "
                            f"{previous.get('key')}); pass --force to overwrite it, or choose another --out folder")
    return out


def _rate_map(rates: dict[str, Rate]) -> tuple[dict, dict, int]:
    """(rule -> rate, rule -> Wilson interval, n) of a rule -> Rate map."""
    n = next(iter(rates.values())).n
    return ({rule: r.rate for rule, r in rates.items()}, {rule: list(r.ci) for rule, r in rates.items()}, n)


def _pool_maps(maps: list[dict[str, Rate]]) -> dict[str, Rate]:
    return {rule: sum((m[rule] for m in maps[1:]), maps[0][rule]) for rule in maps[0]}


def _reply_rows(suite: str, condition: str, dataset: Dataset, run: SafetyRun) -> list[dict]:
    rows = []
    for i, (record, gen, verdict) in enumerate(zip(dataset.records, run.generations, run.verdicts)):
        row = {"suite": suite, "system_prompt": condition, "id": record.id, "prompt": record.prompt}
        if run.prefills is not None:
            row["prefill"] = run.prefills[i]
        row.update({"reply": gen.reply, "verdicts": verdict})
        rows.append(row)
    return rows


@dataclass
class _Condition:
    """The results of one system prompt condition."""

    asr: dict[str, Rate] | None = None
    prefill_asr: dict[str, Rate] | None = None
    refusal: RefusalScore | None = None
    overrefusal: Rate | None = None

    def to_dict(self) -> dict:
        block: dict = {"n": {}, "ci": {}}
        for key in ("asr", "prefill_asr"):
            rates = getattr(self, key)
            if rates is not None:
                block[key], block["ci"][key], block["n"][key] = _rate_map(rates)
        if self.refusal is not None:
            block["refusal_score"], block["n"]["refusal_score"] = self.refusal.score, self.refusal.n
        if self.overrefusal is not None:
            rate = self.overrefusal
            block["overrefusal_rate"], block["ci"]["overrefusal_rate"] = rate.rate, list(rate.ci)
            block["n"]["overrefusal_rate"] = rate.n
        return block


class _Evaluation:
    """One evaluation run: the model, its data and settings, the reply rows and timings it collects."""

    def __init__(self, model, tokenizer, model_key: str, settings: EvalSettings, data: dict[str, Dataset],
                 cache: GenerationCache, rewrite=None):
        self.model, self.tokenizer, self.settings, self.data = model, tokenizer, settings, data
        self.gen = dict(model_key=model_key, max_new_tokens=settings.max_new_tokens,
                        batch_size=settings.batch_size, cache=cache, progress=settings.progress, rewrite=rewrite)
        self.rows: list[dict] = []
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _generate(self, suite: str, role: str, condition: str, system: str | None, rules: list[str],
                  prefills: list[str] | None = None) -> SafetyRun:
        with self.timed(suite):
            run = run_prompts(self.model, self.tokenizer, self.data[role].prompts(), rules=rules, system=system,
                              prefills=prefills, desc=f"{suite} ({condition})", **self.gen)
        self.rows += _reply_rows(suite, condition, self.data[role], run)
        return run

    def condition(self, condition: str, system: str | None) -> _Condition:
        suites, rules, result = self.settings.suites, list(self.settings.rules), _Condition()
        if "safety" in suites:
            run = self._generate("safety", "harmful", condition, system, rules)
            result.asr = {rule: run.attack_success(rule) for rule in rules}
        if "refusal_score" in suites:
            with self.timed("refusal_score"):
                result.refusal = refusal_score(
                    self.model, self.tokenizer, self.data["harmful"].prompts(), self.data["refusals"].prompts(),
                    self.data["compliance"].prompts(), system=system, opening_words=self.settings.opening_words,
                    max_openings=self.settings.max_openings, batch_size=self.settings.batch_size,
                    progress=self.settings.progress)
        if "prefill" in suites:
            prefills = prefill_openings(len(self.data["harmful"]), self.data["compliance"].prompts())
            run = self._generate("prefill", "harmful", condition, system, rules, prefills)
            result.prefill_asr = {rule: run.attack_success(rule) for rule in rules}
        if "overrefusal" in suites:
            # The over-refusal rule is fixed (prefix); the other rules' verdicts are recorded too.
            run = self._generate("overrefusal", "sensitive", condition, system,
                                 list(dict.fromkeys([OVERREFUSAL_RULE, *rules])))
            result.overrefusal = run.refusals(OVERREFUSAL_RULE)
        return result

    def utility(self) -> tuple[dict, TaskAccuracy, Perplexity]:
        """Task accuracy, perplexity and lm-eval tasks, without a system prompt."""
        tasks = checkable(self.data["benign"].records)
        with self.timed("utility"):
            accuracy = task_accuracy(self.model, self.tokenizer, tasks, **self.gen)
            ppl = perplexity(self.model, self.tokenizer, "\n\n".join(self.data["text"].prompts()),
                             window=self.settings.ppl_window, stride=self.settings.ppl_stride,
                             progress=self.settings.progress)
        for record, gen, ok in zip(tasks, accuracy.generations, accuracy.correct):
            self.rows.append({"suite": "utility", "system_prompt": "none", "id": record.id, "prompt": record.prompt,
                              "reply": gen.reply, "answer": record.answer, "correct": ok})
        utility = {"task_accuracy": accuracy.accuracy.rate, "perplexity": ppl.perplexity,
                   "perplexity_detail": ppl.to_dict()}
        if self.settings.lm_eval_tasks:
            from ssah.evaluate.lm_eval_bridge import run_lm_eval

            with self.timed("lm_eval"):
                utility["lm_eval"] = run_lm_eval(self.model, self.tokenizer, self.settings.lm_eval_tasks,
                                                 batch_size=self.settings.batch_size,
                                                 limit=self.settings.lm_eval_limit,
                                                 include_path=self.settings.lm_eval_include)
        return utility, accuracy, ppl


def _check_data(data: dict[str, Dataset], suites: Sequence[str]) -> None:
    """Every role the suites need is there, non-empty; the utility set has checkable records."""
    for role, (_, users) in DATA_ROLES.items():
        if any(suite in users for suite in suites) and role not in data:
            raise SsahError(f"no {role!r} dataset given; suites {', '.join(suites)} need one")
    for role, dataset in data.items():
        if len(dataset) == 0:
            raise SsahError(f"dataset {dataset.name!r} ({role}) has no records; pass a dataset with records")
    if "utility" in suites and not checkable(data["benign"].records):
        raise SsahError(f"dataset {data['benign'].name!r} has no records with an answer; task accuracy "
                        "needs checkable records (an `answer` field)")


def monitor_key(model_key: str, monitor) -> str:
    """The model key of an evaluation under a runtime monitor (a (config, state) pair), else `model_key`."""
    if monitor is None:
        return model_key
    from ssah.probe.monitor import monitor_digest

    return f"{model_key}+monitor-{monitor_digest(*monitor)}"


def evaluate_model(model, tokenizer, model_key: str, out_dir: str | Path, settings: EvalSettings | None = None,
                   data: dict[str, Dataset] | None = None, model_info: dict | None = None,
                   force: bool = False, monitor=None) -> dict:
    """Evaluate a prepared model and write eval.json + replies.jsonl in `out_dir`; returns the report.

    `model_key` names the model in the generation cache and the folder guard (its fingerprint, plus
    e.g. a prune-mask id when the caller modified it). `data` maps roles to datasets (default: the
    built-in sets, see `load_eval_data`). `model_info` (e.g. spec and fingerprint) goes into the report.

    Report keys: `asr` (rule -> rate), `prefill_asr` (rule -> rate), `refusal_score`,
    `overrefusal_rate` (+ `overrefusal_rule`), `utility` (task_accuracy, perplexity, lm_eval), `n`
    (items per metric), `ci` (Wilson 95% interval of every rate), `rules`, `by_system_prompt`, `data`
    (names and fingerprints), `model` (key, spec, fingerprint), `settings`, `seconds`. Metrics of suites
    not run are null.

    `monitor`, a (MonitorConfig | None, MonitorState) pair (see `ssah.probe.monitor`), puts every
    generation under the runtime monitor; with its `stop` action a flagged reply is replaced by the
    refusal text before it is judged or cached (task replies too, so a monitor that flags benign
    tasks costs accuracy). The model key gains the monitor's digest (`monitor_key`), and the report a
    `monitor` block with the share of replies replaced per suite. Perplexity runs no generation and is
    unaffected.
    """
    settings = (settings or EvalSettings()).validate()
    model_key = monitor_key(model_key, monitor)
    out = check_output_folder(out_dir, model_key, force)
    data = data if data is not None else load_eval_data(settings.suites, settings.limit)
    _check_data(data, settings.suites)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        rewrite = None
        if monitor is not None:
            from ssah.probe.monitor import Monitor

            active = stack.enter_context(Monitor(model, *monitor, tokenizer=tokenizer))
            rewrite = active.apply_refusals
        run = _Evaluation(model, tokenizer, model_key, settings, data, GenerationCache(out / CACHE_FILE), rewrite)
        conditions = {name: run.condition(name, system) for name, system in settings.conditions().items()}
        utility = run.utility() if "utility" in settings.suites else None

    suites, results = settings.suites, list(conditions.values())
    report: dict = {
        "schema": SCHEMA_VERSION, "model": {"key": model_key, **(model_info or {})}, "rules": list(settings.rules),
        "asr": None, "prefill_asr": None, "refusal_score": None, "overrefusal_rate": None,
        "overrefusal_rule": OVERREFUSAL_RULE if "overrefusal" in suites else None, "utility": None,
        "n": {}, "ci": {},
    }
    # With both system prompt conditions, the headline numbers pool them.
    for key in ("asr", "prefill_asr"):
        maps = [getattr(result, key) for result in results if getattr(result, key) is not None]
        if maps:
            report[key], report["ci"][key], report["n"][key] = _rate_map(_pool_maps(maps))
    scores = [result.refusal for result in results if result.refusal is not None]
    if scores:
        values = [value for score in scores for value in score.per_prompt]
        report["refusal_score"], report["n"]["refusal_score"] = sum(values) / len(values), len(values)
        report["refusal_openings"] = {"refusal": list(scores[0].refusal_openings),
                                      "compliance": list(scores[0].compliance_openings)}
    overrefusal = [result.overrefusal for result in results if result.overrefusal is not None]
    if overrefusal:
        total = sum(overrefusal[1:], overrefusal[0])
        report["overrefusal_rate"], report["ci"]["overrefusal_rate"] = total.rate, list(total.ci)
        report["n"]["overrefusal_rate"] = total.n
    if utility is not None:
        report["utility"], accuracy, ppl = utility
        report["ci"]["task_accuracy"] = list(accuracy.accuracy.ci)
        report["n"]["task_accuracy"], report["n"]["perplexity_tokens"] = accuracy.accuracy.n, ppl.n_tokens

    report["by_system_prompt"] = {name: result.to_dict() for name, result in conditions.items()}
    report["data"] = {role: {"name": ds.name, "fingerprint": ds.fingerprint, "n": len(ds)} for role, ds in data.items()}
    if monitor is not None:
        report["monitor"] = _monitor_block(monitor, run.rows)
    report["settings"] = {k: v for k, v in asdict(settings).items() if k != "progress"}
    report["seconds"] = {k: round(v, 2) for k, v in run.seconds.items()}
    write_jsonl(out / REPLIES_FILE, run.rows)  # replies first: eval.json marks a finished evaluation
    atomic_write_text(out / EVAL_FILE, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _monitor_block(monitor, rows: list[dict]) -> dict:
    """What the monitor was and how many replies per suite it replaced (stop action: the replies equal
    to its refusal text; counted from the rows so cached replies count too)."""
    from ssah.probe.monitor import monitor_digest

    config, state = monitor
    config = config or state.config
    block = {"digest": monitor_digest(config, state), "action": config.action, "layers": list(state.layers),
             "threshold": float(config.threshold if config.threshold is not None else state.threshold),
             "prompt_position": config.prompt_position, "calibration": state.meta.get("calibration"),
             "replaced": None}
    if config.action == "stop":
        replaced: dict[str, dict] = {}
        for row in rows:
            entry = replaced.setdefault(row["suite"], {"n": 0, "replaced": 0})
            entry["n"] += 1
            entry["replaced"] += row["reply"] == config.refusal_text
        block["replaced"] = {suite: {**e, "share": e["replaced"] / e["n"]} for suite, e in replaced.items()}
    return block


def read_replies(out_dir: str | Path) -> list[dict]:
    """The rows of replies.jsonl in `out_dir`."""
    path = Path(out_dir) / REPLIES_FILE
    if not path.is_file():
        raise SsahError(f"{path} is missing; run the evaluation first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def apply_judge(out_dir: str | Path, judge, progress: bool = True) -> dict:
    """Judge the safety and prefill replies saved in `out_dir` with a model judge; update the report.

    Run it after the evaluated model is freed. The judge sees [prompt, reply] (for prefill rows the
    continuation only, as the rules do). Its unsafe rate joins `asr` and `prefill_asr` under the judge's
    kind (e.g. `llama-guard`), with intervals, per system prompt condition too; `judge` names its model
    and fingerprint and counts replies whose verdict it could not parse (counted as not unsafe).
    """
    out = Path(out_dir)
    report = read_report(out)
    if report is None:
        raise SsahError(f"{out / EVAL_FILE} is missing; run the evaluation before judging")
    rows = read_replies(out)
    targets = [i for i, row in enumerate(rows) if row["suite"] in ("safety", "prefill")]
    if not targets:
        raise SsahError(f"{out} has no safety or prefill replies to judge; run --suite safety or prefill")
    verdicts = judge.judge([rows[i]["prompt"] for i in targets], [rows[i]["reply"] for i in targets],
                           cache=GenerationCache(out / CACHE_FILE), progress=progress)
    name = judge.kind
    for i, verdict in zip(targets, verdicts):
        rows[i]["verdicts"][name] = verdict.label
        if verdict.categories:
            rows[i]["judge_categories"] = list(verdict.categories)
    for suite, key in (("safety", "asr"), ("prefill", "prefill_asr")):
        per_condition: dict[str, Rate] = {}
        for row in rows:
            if row["suite"] == suite:
                flag = Rate(int(row["verdicts"][name] == "unsafe"), 1)
                cond = row["system_prompt"]
                per_condition[cond] = per_condition[cond] + flag if cond in per_condition else flag
        if not per_condition:
            continue
        total = sum(list(per_condition.values())[1:], next(iter(per_condition.values())))
        report[key][name] = total.rate
        report["ci"][key][name] = list(total.ci)
        for cond, rate in per_condition.items():
            block = report["by_system_prompt"][cond]
            block[key][name] = rate.rate
            block["ci"][key][name] = list(rate.ci)
    report["judge"] = {"kind": name, "model": judge.model_name, "fingerprint": judge.fingerprint,
                       "n": len(targets), "unparsed": sum(v.label == "unknown" for v in verdicts)}
    write_jsonl(out / REPLIES_FILE, rows)
    atomic_write_text(out / EVAL_FILE, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
