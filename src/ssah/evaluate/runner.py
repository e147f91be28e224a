"""`evaluate_model`: run the evaluation suites on a prepared model and write the report.

The model arrives ready (loaded, fine-tuned ...) with a `model_key` that names it in the generation
cache; changes made only for the evaluation (pruning, a runtime monitor) come as `interventions`,
which the evaluation applies and whose keys join the model key (`ssah.interventions.base`). Output
folder:

- `eval.json`: the report (see `evaluate_model`), written last and atomically: its presence marks a
  finished evaluation, and its identity (model key, settings, data fingerprints) says whether a rerun
  can reuse it (`ssah.artifacts`); another model's evaluation is never overwritten unasked.
- `replies.jsonl`: one row per generated reply with its verdict under every rule (atomic).
- `generations.jsonl`: the generation cache (append-only, fsync'ed per batch); rerunning the same
  evaluation regenerates nothing, an interrupted one resumes where it stopped.

System prompt conditions: see `ssah.evaluate.settings`. With `both`, the headline safety rates pool
the two conditions (k and n summed: the paper's "ASR avg" when both have the same prompts) and
`by_system_prompt` holds each one. Utility is measured without a system prompt.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ssah.artifacts import Artifact
from ssah.data import Dataset, load_dataset
from ssah.errors import SsahError
from ssah.evaluate.engines import ENGINE_MODEL_DIR
from ssah.evaluate.generation import GenerationCache, weights_cast
from ssah.evaluate.refusal import RefusalScore, refusal_score
from ssah.evaluate.rules import AGREEMENT_RULES, rule_agreement
from ssah.evaluate.safety import OVERREFUSAL_RULE, SafetyRun, prefill_openings, run_prompts
from ssah.evaluate.settings import DATA_ROLES, EvalSettings
from ssah.evaluate.stats import Rate
from ssah.evaluate.utility import Perplexity, TaskAccuracy, checkable, perplexity, task_accuracy
from ssah.interventions.base import Intervention
from ssah.interventions.base import model_key as key_under
from ssah.io import write_jsonl_atomic
from ssah.outputs import OutputKind
from ssah.ownership import make_dirs
from ssah.schemas import check_record

SCHEMA_VERSION = 1

EVAL_FILE, REPLIES_FILE, CACHE_FILE = "eval.json", "replies.jsonl", "generations.jsonl"
EVALUATION = OutputKind("evaluation", (EVAL_FILE, REPLIES_FILE, CACHE_FILE, ENGINE_MODEL_DIR), record=EVAL_FILE)


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
        dataset = given if isinstance(given, Dataset) else load_dataset(default if given is None else given)
        if limit is not None and role not in ("refusals", "compliance"):
            dataset = dataset.take(limit)
        if len(dataset) == 0:
            raise SsahError(f"dataset {dataset.name!r} ({role}) has no records; pass a dataset with records")
        out[role] = dataset
    return out


def read_report(out_dir: str | Path) -> dict | None:
    """The eval.json in `out_dir`, or None when there is none."""
    path = Path(out_dir) / EVAL_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SsahError(f"{path} is damaged ({err}); delete it to redo the evaluation") from None
    return check_record(path, record)


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
                 cache: GenerationCache, rewrite=None, engine=None, watchers: Sequence[Intervention] = ()):
        self.model, self.tokenizer, self.settings, self.data = model, tokenizer, settings, data
        if engine is not None:  # its replies are cached apart from the hf engine's
            model_key = f"{model_key}|engine={engine.name}"
        elif settings.generation_dtype != "model":  # other rounding, other near-tie breaks: cached apart
            model_key = f"{model_key}|generation_dtype={settings.generation_dtype}"
        self.gen = dict(model_key=model_key, max_new_tokens=settings.max_new_tokens,
                        batch_size=settings.batch_size, slots=settings.slots, cache=cache,
                        progress=settings.progress, rewrite=rewrite, engine=engine, watchers=tuple(watchers))
        self.rows: list[dict] = []
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def generating(self):
        """The weights as the settings' generation dtype asks, while replies are generated (hf engine)."""
        dtype = self.settings.generation_dtype if self.gen["engine"] is None else "model"
        return weights_cast(self.model, dtype)

    def _generate(self, suite: str, role: str, condition: str, system: str | None, rules: list[str],
                  prefills: list[str] | None = None) -> SafetyRun:
        with self.timed(suite), self.generating():
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
            with self.generating():
                accuracy = task_accuracy(self.model, self.tokenizer, tasks, **self.gen)
            ppl = text_perplexity(self.model, self.tokenizer, self.data["text"], self.settings)
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


def text_perplexity(model, tokenizer, text: Dataset, settings: EvalSettings) -> Perplexity:
    """The perplexity an evaluation reports: `text`'s records joined, with the settings' window and stride."""
    return perplexity(model, tokenizer, "\n\n".join(text.prompts()), window=settings.ppl_window,
                      stride=settings.ppl_stride, progress=settings.progress)


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


def evaluation_artifact(out_dir: str | Path, model_key: str, settings: EvalSettings,
                        data: dict[str, Dataset]) -> Artifact:
    """The eval.json of an evaluation: reused when model key, settings and data are the same; a
    folder holding another model's evaluation is refused (its guard is the model key)."""
    identity = {"model": model_key, "settings": settings.identity(),
                "data": {role: dataset.fingerprint for role, dataset in data.items()}}
    return Artifact(Path(out_dir) / EVAL_FILE, "an evaluation", identity, guard=("model",))


def evaluate_model(model, tokenizer, model_key: str, out_dir: str | Path, settings: EvalSettings | None = None,
                   data: dict[str, Dataset] | None = None, model_info: dict | None = None,
                   force: bool = False, interventions: Sequence[Intervention] = (), replace: bool = False,
                   model_folder: str | Path | None = None) -> dict:
    """Evaluate a prepared model and write eval.json + replies.jsonl in `out_dir`; returns the report.

    `model_key` names the model in the generation cache and the folder guard (its fingerprint).
    `interventions` (e.g. `pruned(...)`, a `Monitor`) are applied for the evaluation and undone after
    it; each one's key joins the model key, a monitor's refusals replace the replies it flags (before
    they are judged or cached: task replies too, so a monitor that flags benign tasks costs accuracy)
    and each one adds its block to the report (e.g. `monitor`: the share of replies replaced per suite).
    `data` maps roles to datasets (default: the built-in sets, see `load_eval_data`). `model_info`
    (e.g. spec and fingerprint) goes into the report. A finished evaluation of the same model key,
    settings and data is reused; one of another model is refused unless `force` (or `replace`, for
    folders that belong to a run). `settings.engine` picks what generates (`ssah.evaluate.engines`);
    `model_folder`, a folder holding exactly `model`'s weights, spares the vllm engine a saved copy
    (ignored under interventions, which change what the folder holds).

    Report keys: `asr` (rule -> rate), `prefill_asr` (rule -> rate), `refusal_score`,
    `overrefusal_rate` (+ `overrefusal_rule`), `utility` (task_accuracy, perplexity, lm_eval), `n`
    (items per metric), `ci` (Wilson 95% interval of every rate), `rules`, `by_system_prompt`, `data`
    (names and fingerprints), `model` (key, spec, fingerprint), `settings`, `seconds`, `rule_agreement`
    (where the prefix and keywords rules disagree, per suite: `rule_agreement`). Metrics of suites
    not run are null. Perplexity runs no generation and is unaffected by a monitor.
    """
    settings = settings or EvalSettings()
    key = key_under(model_key, interventions)
    check_engine(settings, interventions)
    data = data if data is not None else load_eval_data(settings.suites, settings.limit)
    _check_data(data, settings.suites)
    artifact = evaluation_artifact(out_dir, key, settings, data)
    found = artifact.lookup(force=force, replace=replace)
    if found is not None:
        return found
    out = make_dirs(out_dir)
    with contextlib.ExitStack() as stack:
        for intervention in interventions:
            stack.enter_context(intervention)
        engine = _engine(model, tokenizer, key, out, settings, None if interventions else model_folder)
        if engine is not None:
            stack.callback(engine.close)
        run = _Evaluation(model, tokenizer, key, settings, data, GenerationCache(out / CACHE_FILE),
                          _rewrite(interventions), engine, [i for i in interventions if i.watches_generation])
        conditions = {name: run.condition(name, system) for name, system in settings.conditions().items()}
        utility = run.utility() if "utility" in settings.suites else None
    report = _report(key, model_info, settings, conditions, utility, data, run.rows)
    for intervention in interventions:
        block = intervention.report_block(run.rows)
        if block is not None:
            report[intervention.kind] = block
    report["settings"] = settings.identity()
    report["seconds"] = {k: round(v, 2) for k, v in run.seconds.items()}
    write_jsonl_atomic(out / REPLIES_FILE, run.rows)  # replies first: eval.json marks a finished evaluation
    report = artifact.save(report)
    if engine is not None:
        from ssah.evaluate.engines import drop_engine_copy

        drop_engine_copy(out)  # a finished evaluation is reused from eval.json; the copy is not needed again
    return report


def check_engine(settings: EvalSettings, interventions: Sequence[Intervention] = ()) -> None:
    """One line when the engine cannot run these interventions or is not installed."""
    if settings.engine == "hf":
        return
    watching = [i.kind for i in interventions if i.watches_generation or type(i).rewrite is not Intervention.rewrite]
    if watching:
        raise SsahError(f"the {watching[0]} runs inside the Hugging Face generation loop; use --engine hf")
    from ssah.evaluate.engines import require_vllm

    require_vllm()


def _engine(model, tokenizer, key: str, out: Path, settings: EvalSettings, folder):
    """The engine object that generates, or None for the hf engine (the loaded model itself)."""
    if settings.engine == "hf":
        return None
    from ssah.evaluate.engines import VllmEngine, engine_model_folder

    dtype = {"model": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[settings.generation_dtype]
    return VllmEngine(engine_model_folder(model, tokenizer, key, out, folder), dtype=dtype,
                      gpu_memory=settings.vllm_gpu_memory)


def _rewrite(interventions: Sequence[Intervention]):
    """The interventions' reply rewrites in order, or None when none rewrites (keeps the cache plain)."""
    active = [i for i in interventions if type(i).rewrite is not Intervention.rewrite]
    if not active:
        return None

    def rewrite(replies: list[str]) -> list[str]:
        for intervention in active:
            replies = intervention.rewrite(replies)
        return replies

    return rewrite


def _report(key: str, model_info: dict | None, settings: EvalSettings, conditions: dict, utility,
            data: dict[str, Dataset], rows: list[dict]) -> dict:
    suites, results = settings.suites, list(conditions.values())
    report: dict = {
        "schema": SCHEMA_VERSION, "model": {"key": key, **(model_info or {})}, "rules": list(settings.rules),
        "asr": None, "prefill_asr": None, "refusal_score": None, "overrefusal_rate": None,
        "overrefusal_rule": OVERREFUSAL_RULE if "overrefusal" in suites else None, "utility": None,
        "n": {}, "ci": {},
    }
    # With both system prompt conditions, the headline numbers pool them.
    for name in ("asr", "prefill_asr"):
        maps = [getattr(result, name) for result in results if getattr(result, name) is not None]
        if maps:
            report[name], report["ci"][name], report["n"][name] = _rate_map(_pool_maps(maps))
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
    both = all(rule in settings.rules for rule in AGREEMENT_RULES)
    report["rule_agreement"] = (rule_agreement(rows) or None) if both else None
    report["data"] = {role: {"name": ds.name, "fingerprint": ds.fingerprint, "n": len(ds)} for role, ds in data.items()}
    return report


def read_replies(out_dir: str | Path) -> list[dict]:
    """The rows of replies.jsonl in `out_dir`."""
    path = Path(out_dir) / REPLIES_FILE
    if not path.is_file():
        raise SsahError(f"{path} is missing; run the evaluation first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


