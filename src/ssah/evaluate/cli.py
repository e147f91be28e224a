"""`ssah eval`: safety, prefill attacks, over-refusal and utility of one model, into an output folder."""

from __future__ import annotations

from pathlib import Path

import click

from ssah.cli_common import SEED, check_model_spec, load_from_options, model_options, output_folder
from ssah.defaults import ENGINES, GENERATION_DTYPES, SYSTEM_PROMPT_MODES
from ssah.errors import SsahError
from ssah.evaluate.settings import EvalSettings

_DEFAULTS = {name: field.get_default(call_default_factory=True) for name, field in EvalSettings.model_fields.items()}


def _slots(_ctx, _param, value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number nor auto") from None


@click.command("eval")
@model_options
@click.option("--suite", "suites", default=",".join(_DEFAULTS["suites"]), show_default=True,
              help="comma-separated: safety (ASR), refusal_score (no generation), prefill, "
                   "overrefusal, utility")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="output folder")
@click.option("--harmful", default=None, metavar="DATA", help="harmful prompts (default harmful:test)")
@click.option("--sensitive", default=None, metavar="DATA",
              help="safe-but-sensitive prompts for over-refusal (default sensitive_safe:test; e.g. xstest-safe:PATH)")
@click.option("--benign", default=None, metavar="DATA", help="checkable tasks for accuracy (default benign:test)")
@click.option("--text", "text_data", default=None, metavar="DATA", help="text for perplexity (default text)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="use the first N items of each set")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=_DEFAULTS["max_new_tokens"], show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULTS["batch_size"], show_default=True)
@click.option("--slots", default=str(_DEFAULTS["slots"]), show_default=True, metavar="N|auto", callback=_slots,
              help="rows the hf engine generates at once; auto: measured once per model and machine, then cached")
@click.option("--system", "system_text", default=None, metavar="TEXT",
              help="system prompt text of the 'default' condition (default: Llama-2-Chat's)")
@click.option("--system-prompt", "system_mode", default=_DEFAULTS["system_prompt"], show_default=True,
              type=click.Choice(SYSTEM_PROMPT_MODES),
              help="evaluate without a system prompt, with it, or both (rates pooled, and reported per condition)")
@click.option("--rules", default=",".join(_DEFAULTS["rules"]), show_default=True,
              help="refusal rules: prefix, keywords")
@click.option("--judge", "judge_folder", default=None, metavar="FOLDER",
              help="judge model: a local folder or a hub id (e.g. Llama-Guard-3-1B); runs after the model is freed")
@click.option("--judge-kind", default="llama-guard", show_default=True, help="judge kind from the judge registry")
@click.option("--lm-eval-tasks", default=None, metavar="TASKS",
              help="lm-evaluation-harness tasks, e.g. arc_easy,hellaswag (needs: pip install lm-eval)")
@click.option("--lm-eval-include", default=None, metavar="DIR", help="folder of extra lm-eval task YAML files")
@click.option("--lm-eval-limit", type=click.IntRange(min=1), default=None, help="at most N documents per lm-eval task")
@click.option("--prune", "prune_spec", default=None, metavar="GROUPS_DIR:MASK",
              help="evaluate with these units zeroed (reversibly), e.g. runs/x/groups:SCU or g:random:like=SCU")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of random masks (--prune)")
@click.option("--monitor", "monitor_path", default=None, metavar="FILE",
              help="generate under the runtime monitor: a monitor config (.yaml/.json, calibrated now on its "
              "calibration splits, before any --prune) or a calibrated state (.safetensors, "
              "calibrate_monitor(...).save(PATH))")
@click.option("--engine", type=click.Choice(ENGINES), default=_DEFAULTS["engine"], show_default=True,
              help="what generates the replies: hf (the loaded model, continuous batching) or vllm "
                   "(pip install 'ssah[vllm]'; from the model folder, or a copy saved once under OUT)")
@click.option("--generation-dtype", type=click.Choice(GENERATION_DTYPES), default=_DEFAULTS["generation_dtype"],
              show_default=True, help="the weights' dtype while replies are generated (model: as loaded; e.g. "
                                      "bf16 on a CPU with bf16 instructions); scores and perplexity read the model")
@click.option("--force", is_flag=True, help="replace an output folder that holds another model's evaluation")
def eval_command(model_args, suites, out_dir, harmful, sensitive, benign, text_data, limit, max_new_tokens,
                 batch_size, slots, system_text, system_mode, rules, judge_folder, judge_kind, lm_eval_tasks,
                 lm_eval_include, lm_eval_limit, prune_spec, seed, monitor_path, engine, generation_dtype, force):
    """Evaluate safety (ASR per rule, refusal score), prefill attacks, over-refusal and utility.

    Writes OUT/eval.json (rates with Wilson 95% intervals, n, rule and data names, model fingerprint),
    OUT/replies.jsonl (every reply with its verdicts) and OUT/generations.jsonl (the cache that makes
    a rerun free and an interrupted run resume).
    """
    from ssah.evaluate.runner import EVALUATION, load_eval_data
    from ssah.models.loading import free_memory

    if system_text is not None and system_mode == "none":
        raise SsahError("--system has no effect with --system-prompt none; drop one of them")
    settings = EvalSettings.from_dict(
        {"suites": _names(suites), "rules": _names(rules), "max_new_tokens": max_new_tokens,
         "batch_size": batch_size, "slots": slots,
         "system_prompt": system_mode, "limit": limit,
         "lm_eval_tasks": list(_names(lm_eval_tasks or "")), "lm_eval_limit": lm_eval_limit,
         "lm_eval_include": lm_eval_include, "engine": engine, "generation_dtype": generation_dtype,
         **({} if system_text is None else {"system": system_text})})
    # Everything a user can get wrong is checked before the (possibly long) model load and run.
    _check_extras(settings, lm_eval_tasks, judge_folder, judge_kind)
    if settings.engine != "hf":
        from ssah.evaluate.runner import check_engine

        if monitor_path is not None:
            raise SsahError("the monitor runs inside the Hugging Face generation loop; use --engine hf")
        check_engine(settings)
    data = load_eval_data(settings.suites, settings.limit, harmful=harmful, sensitive=sensitive,
                          benign=benign, text=text_data)
    mask = _prune_mask(prune_spec, seed)
    if monitor_path is not None and not Path(monitor_path).exists():
        raise SsahError(f"monitor file {monitor_path} does not exist; give a monitor state (.safetensors) "
                        "or a monitor config (.yaml/.json)")
    source = check_model_spec(model_args)
    if monitor_path is not None:
        _check_monitor(monitor_path, source)
    inputs = [spec.partition(":")[2] for spec in (harmful, sensitive, benign, text_data) if spec]
    folder = output_folder(out_dir, EVALUATION, force=force,
                           inputs=[*inputs, model_args["spec"], monitor_path, prune_spec and prune_spec.rsplit(":")[0]])
    loaded = load_from_options(model_args)
    with folder:
        report = _evaluate(loaded, out_dir, settings, data, mask, monitor_path, force)
        if judge_folder is not None:
            # Free the evaluated model first: the judge and the model never sit in memory together.
            del loaded
            free_memory()
            report = _judge(out_dir, model_args, judge_folder, judge_kind, batch_size)
    click.echo(summary(report, out_dir))


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_extras(settings: EvalSettings, lm_eval_tasks, judge_folder, judge_kind) -> None:
    from ssah.evaluate.judges import JUDGES, check_judge_folder

    if lm_eval_tasks is not None:
        from ssah.evaluate.lm_eval_bridge import require_lm_eval

        if not settings.lm_eval_tasks:
            raise SsahError("--lm-eval-tasks got no task name; e.g. --lm-eval-tasks arc_easy,hellaswag")
        if "utility" not in settings.suites:
            raise SsahError("--lm-eval-tasks runs with the utility suite; add utility to --suite")
        require_lm_eval()
    if judge_folder is not None:
        if judge_kind not in JUDGES:
            raise SsahError(f"unknown judge kind {judge_kind!r}; known: {', '.join(JUDGES)}")
        if not {"safety", "prefill"} & set(settings.suites):
            raise SsahError("--judge judges safety and prefill replies; add safety or prefill to --suite")
        check_judge_folder(judge_folder)


def _check_monitor(path: str, source) -> None:
    """The monitor file read and checked against the model's depth before the model loads."""
    from ssah.models.spec import check_layers, model_depth
    from ssah.probe.monitor.config import MonitorConfig

    if Path(path).suffix == ".safetensors":
        from ssah.probe.monitor.state import MonitorState

        state = MonitorState.load(path)
        depth = model_depth(source)
        if depth is not None and state.num_layers != depth:
            raise SsahError(f"monitor state {path} was calibrated on a model of {state.num_layers} layers; "
                            f"{source.spec} has {depth}: calibrate it on this model")
        return
    check_layers(MonitorConfig.load(path).layers, source, f"monitor config {path}: layers")


def _prune_mask(prune_spec: str | None, seed: int):
    if prune_spec is None:
        return None
    from ssah.interventions.masks import load_mask, split_mask_spec

    return load_mask(*split_mask_spec(prune_spec), seed=seed)


def _evaluate(loaded, out_dir: str, settings: EvalSettings, data: dict, mask, monitor_path, force: bool) -> dict:
    """The evaluation under the interventions the options ask for: the monitor (calibrated on the
    unpruned model) and a reversible prune."""
    from ssah.evaluate.engines import folder_of
    from ssah.evaluate.runner import evaluate_model

    info = {"spec": loaded.spec, "fingerprint": loaded.fingerprint}
    interventions = []
    if monitor_path is not None:
        from ssah.probe.monitor.calibration import monitor_from_file
        from ssah.probe.monitor.runtime import Monitor

        config, state = monitor_from_file(loaded.model, loaded.tokenizer, monitor_path)
        interventions.append(Monitor(loaded.model, config, state, loaded.tokenizer))
        info["monitor"] = str(monitor_path)
    if mask is not None:
        from ssah.interventions.prune import pruned

        interventions.insert(0, pruned(loaded.model, loaded.layout, mask))
    return evaluate_model(loaded.model, loaded.tokenizer, loaded.fingerprint, out_dir, settings, data,
                          model_info=info, force=force, interventions=interventions,
                          model_folder=folder_of(loaded.spec))


def _judge(out_dir: str, model_args: dict, judge_folder: str, judge_kind: str, batch_size: int) -> dict:
    """Judge the replies saved in `out_dir` (see `apply_judge`)."""
    from ssah.evaluate.judges import apply_judge, load_judge

    judge = load_judge(judge_folder, judge_kind, dtype=model_args["dtype"], device=model_args["device"],
                       batch_size=batch_size)
    try:
        return apply_judge(out_dir, judge)
    finally:
        judge.close()


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary(report: dict, out_dir: str) -> str:
    """A few human-readable lines of the report."""
    lines = [f"model {report['model'].get('spec', report['model']['key'])} "
             f"(fingerprint {report['model'].get('fingerprint', report['model']['key'])})"]
    n, ci = report["n"], report["ci"]
    for key, label in (("asr", "ASR"), ("prefill_asr", "prefill ASR")):
        if report.get(key):
            for rule, value in report[key].items():
                if rule == "judge":  # unknown answers are counted apart
                    judge = report["judge"]
                    lo, hi = ci[key][rule] or (None, None)
                    lines.append(f"{label} [judge]: {_pct(value)} (95% CI {_pct(lo)}-{_pct(hi)}, "
                                 f"n={judge['decided'][key]}, {judge['unknown_by_metric'][key]} unknown apart)")
                    continue
                lo, hi = ci[key][rule]
                lines.append(f"{label} [{rule}]: {_pct(value)} (95% CI {_pct(lo)}-{_pct(hi)}, n={n[key]})")
    if report.get("refusal_score") is not None:
        lines.append(f"refusal score: {report['refusal_score']:+.3f} nats (n={n['refusal_score']})")
    if report.get("overrefusal_rate") is not None:
        lo, hi = ci["overrefusal_rate"]
        lines.append(f"over-refusal [{report['overrefusal_rule']}]: {_pct(report['overrefusal_rate'])} "
                     f"(95% CI {_pct(lo)}-{_pct(hi)}, n={n['overrefusal_rate']})")
    utility = report.get("utility")
    if utility:
        lo, hi = ci["task_accuracy"]
        lines.append(f"task accuracy: {_pct(utility['task_accuracy'])} (95% CI {_pct(lo)}-{_pct(hi)}, "
                     f"n={n['task_accuracy']})")
        lines.append(f"perplexity: {utility['perplexity']:.2f} ({n['perplexity_tokens']} tokens)")
        for task, metrics in (utility.get("lm_eval") or {}).items():
            shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            lines.append(f"lm-eval {task}: {shown}")
    monitor = report.get("monitor")
    if monitor:
        replaced = ", ".join(f"{suite} {_pct(e['share'])}" for suite, e in (monitor["replaced"] or {}).items())
        lines.append(f"monitor {monitor['action']} at layers {monitor['layers']} (threshold {monitor['threshold']:.3g})"
                     + (f"; replies replaced: {replaced}" if replaced else ""))
    if report.get("judge"):
        judge = report["judge"]
        lines.append(f"judge {judge['kind']}: {judge['model']} (fingerprint {judge['fingerprint']}, "
                     f"{judge['unknown']} of {judge['n']} answers unknown)")
    lines.append(f"wrote {out_dir}/eval.json and {out_dir}/replies.jsonl")
    return "\n".join(lines)
