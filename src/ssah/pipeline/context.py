"""`RunContext`: what every stage shares: the config, the run folder's layout, and the few steps
all stages take the same way (load a model, evaluate it, score and group its units)."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from ssah.config import RunConfig
from ssah.pipeline.layout import RunLayout

log = logging.getLogger("ssah.pipeline")


def study_of(config: RunConfig) -> str:
    """Which model stages 3-7 study: "budget" or "full" (an aligned model), or "base" (the model as given)."""
    return config.align.study if config.align.enabled else "base"


def release() -> None:
    """Collect after the caller dropped a model, so two models never sit in memory together."""
    from ssah.models.loading import free_memory

    free_memory()


class RunContext:
    """One run: its config, its folder's layout and the steps stages share."""

    def __init__(self, config: RunConfig, out: str | Path):
        self.config = config
        self.layout = RunLayout(Path(out), study_of(config))
        self._fingerprints: dict[tuple, str] = {}

    @property
    def out(self) -> Path:
        return self.layout.root

    def load(self, spec: str | Path | None = None):
        from ssah.models.loading import load_model

        return load_model(str(spec or self.config.model), dtype=self.config.dtype, device=self.config.device)

    def fingerprint(self, spec: str | Path) -> str:
        """The fingerprint of the model `spec` names, loaded once for it while its files stay as they are
        (a stage that checks many records against one model loads it once, not once per record)."""
        path = Path(str(spec)).expanduser()
        key = (str(spec), path.stat().st_mtime_ns if path.exists() else None)
        if key not in self._fingerprints:
            loaded = self.load(spec)
            self._fingerprints[key] = loaded.fingerprint
            del loaded
            release()
        return self._fingerprints[key]

    def studied_model_spec(self) -> str:
        studied = self.layout.studied_model
        return self.config.model if studied is None else str(studied)

    def relative(self, spec: str | Path) -> str:
        """A spec inside the run folder, relative to it (summaries must not depend on where RUN_DIR is)."""
        try:
            return str(Path(spec).relative_to(self.out))
        except ValueError:
            return str(spec)

    def budget_sizes(self) -> dict[str, float]:
        """Group sizes of the unaligned model, from which the alignment budget is taken."""
        return self.config.align.group_sizes or self.config.groups.sizes

    # -- evaluation ---------------------------------------------------------------------------------
    def suites_for(self, kind: str, default=None) -> list[str] | None:
        """The suites of one kind of evaluation (`eval.stage_suites`), else `default` (None: the run's)."""
        return self.config.eval.stage_suites.get(kind, default)

    def eval_settings(self, suites=None, system: str | None = None, limit: int | None = None):
        """The run's evaluation settings; `system`: evaluate under this system prompt instead; `limit`:
        fewer items per set than the run's."""
        from ssah.evaluate.settings import EvalSettings

        e = self.config.eval
        prompt = {"system_prompt": "default", "system": system} if system else {"system_prompt": e.system_prompt}
        return EvalSettings(suites=list(suites or e.suites), rules=list(e.rules), max_new_tokens=e.max_new_tokens,
                            batch_size=e.batch_size, slots=e.slots, limit=limit or e.limit, max_openings=e.max_openings,
                            engine=e.engine, vllm_gpu_memory=e.vllm_gpu_memory, generation_dtype=e.generation_dtype,
                            progress=True, **prompt)

    @cached_property
    def eval_data(self) -> dict:
        """The evaluation sets by role; utility uses the checkable records of the benign test set."""
        from ssah.data import load_dataset
        from ssah.evaluate.runner import load_eval_data

        d = self.config.data
        benign = role_data("benign", d.benign_test)
        text = load_dataset("text")
        if self.config.eval.text_limit:
            text = text.take(self.config.eval.text_limit)
        return load_eval_data(self.eval_settings().suites, self.config.eval.limit, harmful=d.harmful_test,
                              sensitive=d.sensitive, benign=benign, refusals=d.opening_refusals,
                              compliance=d.compliance_openings, text=text)

    def evaluate(self, loaded, out: Path, label: str, interventions=(), suites=None, system: str | None = None,
                 limit: int | None = None, as_loaded: bool = False, sets: dict | None = None) -> dict:
        """Evaluate a prepared model into `out`, reused when finished with the same model, settings and
        data; `interventions` (pruning, a monitor) apply for the evaluation only; `system`: under this
        system prompt; `limit`: the first `limit` items of each set the run evaluates. `as_loaded`: the
        model is unchanged since it was loaded, so an engine that reads weights from disk may read them
        from its folder (otherwise it gets a saved copy). `sets`: {role: a dataset or its spec} in place of
        the run's test sets (e.g. calibration prompts)."""
        from ssah.evaluate.engines import folder_of
        from ssah.evaluate.runner import evaluate_model

        settings = self.eval_settings(suites, system, limit)
        if any(i.kind == "monitor" for i in interventions):  # it runs inside the Hugging Face loop
            settings = settings.model_copy(update={"engine": "hf"})
        given = {**self.eval_data, **{role: role_data(role, spec) for role, spec in (sets or {}).items()}}
        data = {role: dataset.take(limit) if limit and role not in ("refusals", "compliance") else dataset
                for role, dataset in given.items() if role in _roles(settings.suites)}
        log.info("  evaluating %s", label)
        report = evaluate_model(loaded.model, loaded.tokenizer, loaded.fingerprint, out, settings, data=data,
                                model_info={"spec": loaded.spec, "label": label}, interventions=interventions,
                                replace=True,
                                model_folder=folder_of(loaded.spec) if as_loaded and settings.engine != "hf" else None)
        report = self.judged(out, report)
        # the headline rule travels with the report (not in eval.json: changing it re-evaluates nothing)
        return {**report, "verdict_rule": self.config.eval.verdict_rule}

    def judged(self, out: Path, report: dict) -> dict:
        """The report with the run's judge's verdicts (`eval.judge`), judged now unless this judge with
        these settings already judged it."""
        judge_config = self.config.eval.judge
        if judge_config is None or not ({"safety", "prefill"} & set(report["settings"]["suites"])):
            return report
        if (report.get("judge") or {}).get("settings") == judge_config.identity():
            return report
        from ssah.evaluate.judges import apply_judge

        log.info("  judging with %s", judge_config.model)
        return apply_judge(out, self.judge, progress=True, settings=judge_config.identity())

    @cached_property
    def judge(self):
        """The run's judge model, loaded once and kept beside the models it judges."""
        from ssah.evaluate.judges import load_judge

        c = self.config.eval.judge
        options = {"max_new_tokens": c.max_new_tokens} if c.max_new_tokens else {}
        options.update({"threshold": c.threshold} if c.kind == "strongreject" else {"prompt_format": c.prompt_format})
        return load_judge(c.model, c.kind, dtype=c.dtype, device=self.config.device, batch_size=c.batch_size,
                          **options)

    # -- unit scores and groups ---------------------------------------------------------------------
    def score_and_group(self, loaded, out: Path, sizes: dict[str, float] | str | None = None):
        """Safety scores (harmful prompts + the scoring refusals or the model's own), utility scores
        (benign answers), groups of `sizes` (default groups.sizes; "auto": a pruning sweep on the
        calibration splits)."""
        from ssah.units.recipes import score_and_group

        s, g = self.config.scores, self.config.groups
        return score_and_group(loaded, out, harmful=self.config.data.harmful_calibration,
                               benign=self.config.data.benign_calibration, sizes=sizes or g.sizes,
                               normalize=g.normalize, ranking=g.ranking, scorer=s.scorer, limit=s.limit,
                               batch_size=s.batch_size, max_length=s.max_length, token_scope=s.token_scope,
                               seed=self.config.seed, replace=True, responses=s.responses,
                               refusals=self.config.data.scoring_refusals, max_new_tokens=s.reply_tokens,
                               ru_normalize=g.ru_normalize, ru_ranking=g.ru_ranking)


def role_data(role: str, spec):
    """The dataset of one evaluation role from its spec (utility keeps the checkable records, those with an
    answer); a dataset given as such is taken as it is."""
    from ssah.data import Dataset, load_dataset

    if isinstance(spec, Dataset):
        return spec
    data = load_dataset(spec)
    return Dataset(f"{data.name}[checkable]", [r for r in data.records if r.answer]) if role == "benign" else data


def _roles(suites) -> set[str]:
    from ssah.evaluate.settings import DATA_ROLES

    return {role for role, (_, users) in DATA_ROLES.items() if any(suite in users for suite in suites)}
