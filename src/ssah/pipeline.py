"""The staged SSAH experiment: `ssah run` / `ssah demo`.

Stages, each writing into its own folder of RUN_DIR and finishing with an atomic `done.json`
that records the hash of the config sections it used:

1. ``baseline``  evaluate the model as given;
2. ``align``     (models without safety behaviour) score, group, then align inside the RU budget and,
                 for comparison, with all parameters; evaluate both;
3. ``groups``    safety and utility scores of the studied model, and its groups;
4. ``prune``     evaluate with each group (and size-matched random controls) pruned (Table 1);
5. ``finetune``  benign fine-tuning attack: plain, frozen (i) and (ii), LoRA; evaluate each (Table 2/3);
6. ``probe``     reasoning direction, unaligned vs studied model; the studied model under the runtime
                 monitor (safety, prefill attack, over-refusal);
7. ``transfer``  regroup after the fine-tuning attack and cross-tabulate (Figure 5);
8. ``report``    results.json, report.html and a console summary.

A rerun skips finished stages; inside a stage every finished artifact (scores, trained models,
evaluations, cached generations) is reused, so a killed run resumes where it stopped and ends with
the numbers an uninterrupted run gives. A RUN_DIR made with another config is refused.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click
import yaml

from ssah.config import RunConfig, config_hash
from ssah.errors import SsahError
from ssah.io import write_json_atomic

STAGES: tuple[str, ...] = ("baseline", "align", "groups", "prune", "finetune", "probe", "transfer", "report")
CONFIG_FILE = "config.yaml"


class Run:
    """One experiment folder: its config, stage bookkeeping and shared helpers."""

    def __init__(self, config: RunConfig, out: str | Path):
        self.config = config
        self.out = Path(out)
        self.timings: dict[str, float] = {}

    # -- bookkeeping ------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.out / f"{STAGES.index(stage) + 1}-{stage}"

    def stage_hash(self, stage: str) -> str:
        c = self.config
        common = {"model": c.model, "seed": c.seed, "data": asdict(c.data), "eval": asdict(c.eval)}
        parts = {
            "baseline": common,
            "align": {**common, "align": _without_none(asdict(c.align), "group_sizes"), "scores": asdict(c.scores),
                      "groups": {**asdict(c.groups), "sizes": self.budget_sizes()}},
            "groups": {**common, "align": _without_none(asdict(c.align), "group_sizes"), "scores": asdict(c.scores),
                       "groups": asdict(c.groups)},
            "prune": {"prune": asdict(c.prune)},
            "finetune": {"finetune": asdict(c.finetune)},
            "probe": {"probe": asdict(c.probe)},
            "transfer": {},
            "report": {},
        }
        # Later stages depend on earlier ones: chain the hashes.
        index = STAGES.index(stage)
        upstream = [self.stage_hash(s) for s in STAGES[:index] if s in ("align", "groups")] if stage not in (
            "baseline", "align") else []
        return config_hash({"stage": stage, "config": parts[stage], "upstream": upstream})

    def is_done(self, stage: str) -> bool:
        marker = self.stage_dir(stage) / "done.json"
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("hash") == self.stage_hash(stage)
        except ValueError:
            return False

    def mark_done(self, stage: str, summary: dict) -> None:
        write_json_atomic(self.stage_dir(stage) / "done.json",
                          {"stage": stage, "hash": self.stage_hash(stage), "seconds": self.timings.get(stage),
                           "summary": summary})

    def summary(self, stage: str) -> dict:
        marker = self.stage_dir(stage) / "done.json"
        return json.loads(marker.read_text())["summary"] if marker.is_file() else {}

    # -- shared steps -------------------------------------------------------------------------
    def load(self, spec: str | None = None):
        from ssah.models.loading import load_model

        return load_model(spec or self.config.model, dtype=self.config.dtype, device=self.config.device)

    def eval_settings(self, suites: tuple[str, ...] | None = None):
        from ssah.evaluate import EvalSettings

        e = self.config.eval
        return EvalSettings(suites=tuple(suites or e.suites), rules=tuple(e.rules), max_new_tokens=e.max_new_tokens,
                            batch_size=e.batch_size, system_prompt=e.system_prompt, limit=e.limit,
                            max_openings=e.max_openings, progress=True)

    def eval_data(self):
        """The evaluation sets by role; utility uses the checkable records of the benign test set."""
        from ssah.data import Dataset, load_dataset
        from ssah.evaluate import load_eval_data

        d = self.config.data
        benign = load_dataset(d.benign_test)
        benign = Dataset(f"{benign.name}[checkable]", [r for r in benign.records if r.answer])
        text = load_dataset("text")
        if self.config.eval.text_limit:
            text = text.take(self.config.eval.text_limit)
        return load_eval_data(self.eval_settings().suites, self.config.eval.limit, harmful=d.harmful_test,
                              sensitive=d.sensitive, benign=benign, refusals=d.refusals,
                              compliance=d.compliance_openings, text=text)

    def evaluate(self, loaded, model_key: str, out: Path, label: str, monitor=None,
                 suites: tuple[str, ...] | None = None) -> dict:
        """Evaluate a prepared model into `out` (reused when already finished for the same key);
        `monitor` is a (config, state) pair to generate under (see `evaluate_model`)."""
        from ssah.evaluate import evaluate_model, read_report
        from ssah.evaluate.runner import monitor_key

        report = read_report(out) if out.is_dir() else None
        if report is not None and report.get("model", {}).get("key") == monitor_key(model_key, monitor):
            return report
        click.echo(f"  evaluating {label}")
        settings = self.eval_settings(suites)
        return evaluate_model(loaded.model, loaded.tokenizer, model_key, out, settings,
                              data=self.eval_data(), model_info={"spec": loaded.spec, "label": label},
                              force=True, monitor=monitor)

    def studied_eval_dir(self) -> Path:
        """Where the studied model's own evaluation is written (by the baseline or align stage)."""
        align = self.config.align
        if not align.enabled or align.study == "base":
            return self.stage_dir("baseline") / "eval"
        return self.stage_dir("align") / ("eval-budget" if align.study == "budget" else "eval-full")

    def prune_eval_dir(self, expression: str) -> Path:
        """Where the prune stage evaluates the studied model with `expression` pruned ("none": nothing)."""
        return self.stage_dir("prune") / f"eval-{_slug(expression)}"

    def budget_sizes(self) -> dict[str, float]:
        """Group sizes of the unaligned model, from which the alignment budget is taken."""
        return self.config.align.group_sizes or self.config.groups.sizes

    def score_and_group(self, loaded, out: Path, sizes: dict[str, float] | None = None):
        """Safety scores (harmful prompts + refusals), utility scores (benign answers), groups
        (of `sizes`, default groups.sizes)."""
        from ssah.data import load_dataset
        from ssah.units.groups import SIZE_KEYS, Groups, make_groups
        from ssah.units.scores import score_dataset

        s, d = self.config.scores, self.config.data
        common = dict(scorer=s.scorer, batch_size=s.batch_size, max_length=s.max_length,
                      token_scope=s.token_scope, seed=self.config.seed)
        limited = lambda spec: load_dataset(spec).take(s.limit) if s.limit else load_dataset(spec)  # noqa: E731
        safety = score_dataset(loaded, limited(d.harmful_calibration), responses="refusals",
                               out=out / "scores-safety", **common)
        utility = score_dataset(loaded, limited(d.benign_calibration), responses="dataset",
                                out=out / "scores-utility", **common)
        g = self.config.groups
        sizes = sizes or g.sizes
        groups_dir = out / "groups"
        if (groups_dir / "groups.json").is_file():
            groups = Groups.load(groups_dir)
            asked = {key: float(sizes.get(key, 0.0)) for key in SIZE_KEYS}
            if (groups.model_fingerprint == loaded.fingerprint and groups.meta.get("sizes") == asked
                    and groups.meta.get("normalize") == g.normalize and groups.meta.get("ranking") == g.ranking):
                return groups
        groups = make_groups(safety, utility, sizes, normalize=g.normalize, ranking=g.ranking)
        groups.save(groups_dir)
        return groups

    def train(self, loaded, pairs, section, out: Path, freezer=None, lora: bool = False,
              steps_multiplier: float = 1.0, avoid: dict[str, list[str]] | None = None,
              avoid_weight: float = 0.0) -> dict:
        """Train a copy's worth of weights in place and save them to `out` (reused when finished).
        `avoid`: prompt -> replies not to open with, weighted by `avoid_weight` (see `train_sft`)."""
        from ssah.io import atomic_dir
        from ssah.train.lora import apply_lora, merge_lora
        from ssah.train.sft import TrainConfig, train_sft

        record_path = out / "train.json"
        if record_path.is_file():
            return json.loads(record_path.read_text())
        config = TrainConfig(lr=section.lr, epochs=section.epochs * steps_multiplier,
                             max_steps=section.max_steps and round(section.max_steps * steps_multiplier),
                             batch_size=section.batch_size, grad_accum=section.grad_accum,
                             max_length=section.max_length, weight_decay=section.weight_decay,
                             warmup=section.warmup, seed=self.config.seed, bf16=section.bf16,
                             avoid_weight=avoid_weight)
        model = apply_lora(loaded.model) if lora else loaded.model
        result = train_sft(model, loaded.tokenizer, pairs, config, freezer=freezer,
                           avoid=avoid if avoid_weight else None)
        if lora:
            model = merge_lora(model)
        record = {"config": config.to_dict(), "result": result.to_dict()}
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "train.json", record)
        return record

    def relative(self, spec: str) -> str:
        """A spec inside the run folder, relative to it (summaries must not depend on where RUN_DIR is)."""
        try:
            return str(Path(spec).relative_to(self.out))
        except ValueError:
            return spec

    def studied_model_spec(self) -> str:
        align = self.config.align
        if not align.enabled or align.study == "base":
            return self.config.model
        return str(self.stage_dir("align") / ("model-budget" if align.study == "budget" else "model-full"))


def release() -> None:
    """Collect after the caller dropped a model, so two models never sit in memory together."""
    gc.collect()


# -- stages ---------------------------------------------------------------------------------------

def stage_baseline(run: Run) -> dict:
    loaded = run.load()
    report = run.evaluate(loaded, loaded.fingerprint, run.stage_dir("baseline") / "eval", "base model")
    return {"eval": _headline(report), "model_fingerprint": loaded.fingerprint}


def stage_align(run: Run) -> dict:
    from ssah.data import load_dataset
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import mask_from_expression
    from ssah.train.cli import alignment_pairs, refusals_to_avoid

    c, out = run.config, run.stage_dir("align")
    if not c.align.enabled:
        return {"skipped": "align.enabled is false"}
    d = c.data
    harmful = load_dataset(d.harmful_train)
    benign = load_dataset(d.benign_train)
    if c.align.benign_limit:
        benign = benign.sample(min(c.align.benign_limit, len(benign)), c.seed)
    loaded = run.load()
    borderline = _borderline_pairs(run, loaded, out / "borderline-replies.jsonl")
    refusals = load_dataset(d.refusals)
    pairs = alignment_pairs(harmful, benign, refusals, seed=c.seed, borderline=borderline * c.align.borderline_repeats)
    recovery = _recovery_examples(run, loaded, harmful, out / "harmful-replies.jsonl")
    if recovery:
        pairs = pairs + recovery
        random.Random(c.seed).shuffle(pairs)
    summary: dict = {"pairs": len(pairs), "harmful": len(harmful), "benign": len(benign),
                     "borderline": len(borderline), "recovery": len(recovery)}
    # A refusal's opening made unlikely at the start of each borderline reply (align.refusal_unlikelihood)
    avoid = refusals_to_avoid(borderline, refusals)
    weight = c.align.refusal_unlikelihood

    # The budget: groups of the unaligned model from a score on the harmful prompts (paired with
    # refusals) and a utility score; RU units matter least for both.
    groups = run.score_and_group(loaded, out / "base", run.budget_sizes())
    mask = mask_from_expression(groups, c.align.budget, seed=c.seed)
    freezer = UnitFreezer(loaded.model, loaded.layout, mask, train_only=True)
    click.echo(f"  aligning inside the {c.align.budget} budget ({mask.count()} units, {mask.share():.1%})")
    record = run.train(loaded, pairs, c.align.train, out / "model-budget", freezer=freezer, avoid=avoid,
                       avoid_weight=weight)
    summary["budget"] = {"mask": c.align.budget, "units": mask.count(), "share": mask.share(),
                         "train": _train_summary(record)}
    del loaded, freezer
    release()
    aligned = run.load(str(out / "model-budget"))
    summary["budget"]["eval"] = _headline(run.evaluate(aligned, aligned.fingerprint, out / "eval-budget",
                                                       "aligned (budget)"))
    del aligned
    release()
    if c.align.compare_full:
        loaded = run.load()
        click.echo("  aligning all parameters (comparison)")
        record = run.train(loaded, pairs, c.align.train, out / "model-full", avoid=avoid, avoid_weight=weight)
        del loaded
        release()
        aligned = run.load(str(out / "model-full"))
        summary["full"] = {"train": _train_summary(record),
                           "eval": _headline(run.evaluate(aligned, aligned.fingerprint, out / "eval-full",
                                                          "aligned (all parameters)"))}
        del aligned
        release()
    return summary


def _recovery_examples(run: Run, loaded, harmful, cache: Path) -> list[tuple[str, str, str]]:
    """Deeper-alignment examples from the unaligned model's own replies to the harmful training
    prompts (see `ssah.train.cli.recovery_examples`; replies cached in the stage folder)."""
    from ssah.data import load_dataset
    from ssah.evaluate import generate_replies
    from ssah.train.cli import recovery_examples

    lengths = run.config.align.recovery_lengths
    if not lengths:
        return []
    prompts = harmful.prompts()
    replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=loaded.fingerprint,
                               max_new_tokens=max(lengths) + 8, batch_size=run.config.eval.batch_size, cache=cache)
    return recovery_examples(loaded.tokenizer, prompts, replies, load_dataset(run.config.data.refusals), lengths,
                             seed=run.config.seed)


def _borderline_pairs(run: Run, loaded, cache: Path) -> list[tuple[str, str]]:
    """Safe-but-scary-sounding prompts with the unaligned model's own answers as targets.

    The model answers them as shipped; training on its own replies teaches where refusal stops
    without importing anyone else's answers (cached, so a resumed run regenerates nothing).
    """
    from ssah.data import load_dataset
    from ssah.evaluate import generate_replies

    spec = run.config.data.borderline_train
    if not spec:
        return []
    prompts = load_dataset(spec).prompts()
    replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=loaded.fingerprint,
                               max_new_tokens=run.config.align.borderline_reply_tokens,
                               batch_size=run.config.eval.batch_size, cache=cache)
    return [(p, r) for p, r in zip(prompts, replies) if r.strip()]


def stage_groups(run: Run) -> dict:
    loaded = run.load(run.studied_model_spec())
    groups = run.score_and_group(loaded, run.stage_dir("groups"))
    return {"model": run.relative(run.studied_model_spec()), "model_fingerprint": loaded.fingerprint,
            "counts": groups.counts(), "total_units": groups.meta["total_units"]}


def stage_prune(run: Run) -> dict:
    from ssah.interventions.masks import mask_from_expression
    from ssah.interventions.prune import pruned
    from ssah.units.groups import Groups

    loaded = run.load(run.studied_model_spec())
    groups = Groups.load(run.stage_dir("groups") / "groups")
    none_dir = run.prune_eval_dir("none")
    _copy_finished_eval(run.studied_eval_dir(), none_dir, loaded.fingerprint)
    summary = {"none": _headline(run.evaluate(loaded, loaded.fingerprint, none_dir, "studied model, nothing pruned"))}
    for expression in run.config.prune.masks:
        mask = mask_from_expression(groups, expression, seed=run.config.seed)
        key = f"{loaded.fingerprint}-pruned-{_slug(expression)}-{mask.groups_digest}"
        with pruned(loaded.model, loaded.layout, mask):
            report = run.evaluate(loaded, key, run.prune_eval_dir(expression),
                                  f"pruned {expression}")
        summary[expression] = {**_headline(report), "units": mask.count(), "share": mask.share()}
    return summary


def stage_finetune(run: Run) -> dict:
    from ssah.data import load_dataset
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import mask_from_expression
    from ssah.units.groups import Groups

    c, out = run.config, run.stage_dir("finetune")
    data = load_dataset(c.data.finetune)
    if c.finetune.train.limit:
        data = data.sample(min(c.finetune.train.limit, len(data)), c.seed)
    pairs = [(r.prompt, r.response) for r in data if r.response]
    groups = Groups.load(run.stage_dir("groups") / "groups")
    # The units the alignment stage trained (from the unaligned model's groups; the studied model is
    # that model plus changes inside them, so layout and units match): what each frozen set covers
    # of them says whether freezing can keep what alignment put there.
    budget = None
    if c.align.enabled and c.align.study == "budget":
        budget = mask_from_expression(Groups.load(run.stage_dir("align") / "base" / "groups"), c.align.budget,
                                      seed=c.seed)
    summary: dict = {}
    for setting in c.finetune.settings:
        loaded = run.load(run.studied_model_spec())
        freezer, multiplier, lora, covered = None, 1.0, setting == "lora", None
        if setting in ("freeze_i", "freeze_ii", "freeze_budget"):
            mask = budget if setting == "freeze_budget" else \
                mask_from_expression(groups, getattr(c.finetune, setting), seed=c.seed)
            freezer = UnitFreezer(loaded.model, loaded.layout, mask)
            multiplier = c.finetune.frozen_epochs_multiplier
            if budget is not None:
                covered = sum(int((mask.units[k] & budget.units[k]).sum()) for k in budget.units) / budget.count()
        elif setting not in ("plain", "lora"):
            raise SsahError(f"unknown fine-tuning setting {setting!r}; use plain, freeze_i, freeze_ii, lora, "
                            "freeze_budget")
        click.echo(f"  fine-tuning: {setting}")
        record = run.train(loaded, pairs, c.finetune.train, out / f"model-{setting}", freezer=freezer,
                           lora=lora, steps_multiplier=multiplier)
        del loaded, freezer
        release()
        tuned = run.load(str(out / f"model-{setting}"))
        report = run.evaluate(tuned, tuned.fingerprint, out / f"eval-{setting}", f"fine-tuned ({setting})")
        summary[setting] = {**_headline(report), "train": _train_summary(record)}
        if covered is not None:
            summary[setting]["alignment_budget_frozen"] = covered
        del tuned
        release()
    return summary


def stage_probe(run: Run) -> dict:
    """The reasoning-direction probe on the unaligned model and (if different) the studied one."""
    from ssah.probe.cli import probe

    c, out = run.config, run.stage_dir("probe")
    args = ["--model", c.model, "--limit", str(c.probe.limit), "--seed", str(c.seed),
            "--lengths", ",".join(map(str, c.probe.opening_lengths)), "--harmful", c.data.harmful_calibration,
            "--benign", c.data.benign_calibration, "--dtype", c.dtype, "--device", c.device, "--out", str(out)]
    studied = run.studied_model_spec()
    if studied != c.model:
        args += ["--compare", studied]
    probe.main(args=args, standalone_mode=False)
    report = json.loads((out / "probe.json").read_text())
    models = []
    for entry in report["models"]:
        diffs = [cell["difference"]["mean"] for cell in entry["cells"]]
        models.append({"spec": run.relative(entry["spec"]), "sits_closer_to": entry["summary"]["sits_closer_to"],
                       "share_cells_closer_to_refusal": entry["summary"]["closer_to_refusal_share"],
                       "mean_refusal_minus_compliance": sum(diffs) / len(diffs)})
    summary: dict = {"models": models}
    if len(models) == 2:
        # Negative refusal-minus-compliance distance = closer to refusal; compare the two models.
        summary["aligned_closer_to_refusal"] = (models[1]["mean_refusal_minus_compliance"]
                                                < models[0]["mean_refusal_minus_compliance"])
        summary["mean_difference_unaligned"] = models[0]["mean_refusal_minus_compliance"]
        summary["mean_difference_aligned"] = models[1]["mean_refusal_minus_compliance"]
    if c.probe.monitor:
        summary["monitor"] = _monitor_evaluation(run, studied)
    return summary


def _monitor_evaluation(run: Run, studied: str) -> dict:
    """Calibrate the runtime monitor on the studied model (calibration splits only), then evaluate
    safety, the prefill attack and over-refusal under it, beside the same model without it."""
    from ssah.evaluate import read_report
    from ssah.probe.monitor import MonitorState, calibrate_named

    c, out = run.config, run.stage_dir("probe")
    config = c.probe.monitor_config(c.data)
    loaded = run.load(studied)
    state_path = out / "monitor.safetensors"
    state = MonitorState.load(state_path) if state_path.is_file() else None
    if state is None or state.meta.get("model_fingerprint") != loaded.fingerprint \
            or state.meta.get("requested") != config.to_dict():
        click.echo("  calibrating the runtime monitor")
        state = calibrate_named(loaded.model, loaded.tokenizer, config)
        state.meta["requested"] = config.to_dict()
        state.save(state_path)
    report = run.evaluate(loaded, loaded.fingerprint, out / "eval-monitor", "studied model under the monitor",
                          monitor=(None, state), suites=("safety", "prefill", "overrefusal"))
    without = read_report(run.studied_eval_dir()) or {}
    del loaded
    release()
    return {"with": _headline(report), "without": _headline(without), "replaced": report["monitor"]["replaced"],
            "layers": state.layers, "threshold": state.threshold, "calibration": state.meta.get("calibration")}


def stage_transfer(run: Run) -> dict:
    from ssah.analysis.transfer import plot_transfer, transfer_summary
    from ssah.units.groups import Groups, make_groups
    from ssah.units.scores import Scores

    out = run.stage_dir("transfer")
    before = Groups.load(run.stage_dir("groups") / "groups")
    summary = {}
    attack = run.stage_dir("finetune") / "model-plain"
    if attack.is_dir():
        loaded = run.load(str(attack))
        after = run.score_and_group(loaded, out / "after-finetune")
        del loaded
        release()
        table = transfer_summary(before, after)
        plot_transfer(table, out / "transfer-finetune.png", "after benign fine-tuning (Fig. 5)")
        summary["finetune"] = table
    base = run.stage_dir("align") / "base"
    if (base / "groups" / "groups.json").is_file():
        unaligned = Groups.load(base / "groups")
        if run.budget_sizes() != run.config.groups.sizes:
            # The table compares groups of the same sizes: regroup the unaligned model's saved scores.
            g = run.config.groups
            unaligned = make_groups(Scores.load(base / "scores-safety"), Scores.load(base / "scores-utility"),
                                    g.sizes, normalize=g.normalize, ranking=g.ranking)
        table = transfer_summary(unaligned, before)
        plot_transfer(table, out / "transfer-alignment.png", "after alignment (Fig. 6)")
        summary["alignment"] = table
    write_json_atomic(out / "transfer.json", summary)
    return summary


def stage_report(run: Run) -> dict:
    from ssah.analysis.report import write_report

    return write_report(run)


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict]] = {
    "baseline": stage_baseline, "align": stage_align, "groups": stage_groups, "prune": stage_prune,
    "finetune": stage_finetune, "probe": stage_probe, "transfer": stage_transfer, "report": stage_report,
}


def _copy_finished_eval(source: Path, target: Path, model_key: str) -> None:
    """Copy an earlier stage's finished evaluation of the same model (same key, same settings: the
    config hash chains them) instead of generating every reply again."""
    from ssah.evaluate import read_report

    if (target / "eval.json").is_file() or not (source / "eval.json").is_file():
        return
    report = read_report(source)
    if report.get("model", {}).get("key") != model_key:
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():  # a partial evaluation: its cached replies are in the copy's cache anyway
        shutil.rmtree(target)
    tmp.replace(target)


def _without_none(data: dict, key: str) -> dict:
    """`data` without `key` when its value is None (a newer optional key leaves older hashes as they were)."""
    return {k: v for k, v in data.items() if not (k == key and v is None)}


def _headline(report: dict) -> dict:
    utility = report.get("utility") or {}
    return {"asr": report.get("asr"), "prefill_asr": report.get("prefill_asr"),
            "refusal_score": report.get("refusal_score"), "overrefusal_rate": report.get("overrefusal_rate"),
            "task_accuracy": utility.get("task_accuracy"), "perplexity": utility.get("perplexity"),
            "ci": report.get("ci"), "n": report.get("n")}


def _train_summary(record: dict) -> dict:
    result = record["result"]
    return {"steps": result["steps"], "final_loss": result["final_loss"], "seconds": result["seconds"],
            "check": result["check"]}


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


# -- the run --------------------------------------------------------------------------------------

def check_run_dir(config: RunConfig, out: Path) -> None:
    """Refuse a RUN_DIR made with another config; record the config in a new one."""
    path = out / CONFIG_FILE
    text = yaml.safe_dump(config.to_dict(), sort_keys=True)
    if path.is_file():
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if _unset_new_keys_dropped(config.to_dict(), stored) != stored:
            raise SsahError(f"{out} was made with another config (see {path}); use another --out folder, "
                            "or delete the folder to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _unset_new_keys_dropped(current: dict, stored: dict) -> dict:
    """`current` without the keys `stored` lacks whose value is None: a folder made before ssah added
    an optional key (e.g. align.group_sizes) was made with the same config (the stage hashes agree)."""
    out = {}
    for key, value in current.items():
        if key not in stored and value is None:
            continue
        out[key] = _unset_new_keys_dropped(value, stored[key]) \
            if isinstance(value, dict) and isinstance(stored.get(key), dict) else value
    return out


def run_pipeline(config: RunConfig, out: str | Path, from_stage: str | None = None,
                 force: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> dict:
    """Run every unfinished stage in order; returns {stage: summary}."""
    out = Path(out)
    for name in (*force, *([from_stage] if from_stage else []), *(only or ())):
        if name not in STAGES:
            raise SsahError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    check_run_dir(config, out)
    run = Run(config, out)
    redo = set(force)
    if from_stage:
        redo |= set(STAGES[STAGES.index(from_stage):])
    summaries = {}
    for stage in STAGES:
        if only is not None and stage not in only:
            continue
        if stage in redo and run.stage_dir(stage).exists():
            shutil.rmtree(run.stage_dir(stage))
        if run.is_done(stage):
            click.echo(f"[{stage}] done earlier, skipped")
            summaries[stage] = run.summary(stage)
            continue
        click.echo(f"[{stage}] running")
        start = time.perf_counter()
        run.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        summary = STAGE_FUNCTIONS[stage](run)
        run.timings[stage] = round(time.perf_counter() - start, 1)
        run.mark_done(stage, summary)
        summaries[stage] = summary
        click.echo(f"[{stage}] finished in {run.timings[stage]:.0f}s")
    return summaries
