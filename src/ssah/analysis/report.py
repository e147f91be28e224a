"""The run report: results.json (every stage summary and the verdicts) and a self-contained
report.html; the verdicts come from `ssah.analysis.verdicts`.

`render_report` gathers what a run folder holds (the summaries of its finished stages, the verdicts,
a few replies of each evaluation) and writes both files; the report stage and `ssah report`
(`rerender`) both call it. The HTML shows every rate with its Wilson 95% interval, every test with its
p-value, bar charts with interval error bars, and the paper's numbers beside ours (labelled with the
paper's model, which is not ours).
"""

import logging
from pathlib import Path

from ssah.analysis.report_data import PAPER, gather_examples, gather_rule_agreement
from ssah.analysis.report_html import REPORT_TITLE, report_html
from ssah.errors import SsahError
from ssah.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


# -- entry points --------------------------------------------------------------------------------------


def render_report(config, layout, html_path: Path | None = None, write_results: bool = True) -> dict:
    """Write the report of the run in `layout` (a `RunLayout`) made with `config` (a `RunConfig`):
    results.json and report.html at the run folder's top, or the HTML alone at `html_path` when
    `write_results` is False. Reads only what the finished stages left; returns the report stage's
    summary ({"verdicts": {claim: verdict}})."""
    import ssah.pipeline.stages  # noqa: F401  (registers every stage: their identities name each other)
    from ssah.analysis.verdicts import compute_verdicts, paired_tests
    from ssah.pipeline.layout import STAGES
    from ssah.pipeline.registry import stage_summary

    summaries = {stage: stage_summary(stage, config, layout) for stage in STAGES if stage != "report"}
    verdicts = compute_verdicts(summaries, paired_tests(paired_claims(layout, summaries), seed=config.seed))
    images = {"groups": [layout.groups / "groups_per_layer.png"],
              "probe": sorted(layout.probe_study.glob("*.png")),
              "transfer": sorted(layout.stage("transfer").glob("*.png")),
              "attacks": sorted(layout.attack_grid.glob("*.png"))}
    settings = config.to_dict()
    results = {"model": settings["model"], "config": settings, "stages": summaries, "verdicts": verdicts,
               "paper": PAPER, "rule": "prefix (the reply opens with a refusal); rates with Wilson 95% intervals"}
    if write_results:
        write_json_atomic(layout.results, results)
    html_path = html_path or layout.report
    page = report_html(settings, summaries, verdicts, images, gather_examples(layout, summaries),
                       gather_rule_agreement(layout, summaries))
    write_text_atomic(html_path, page)
    log.info("\nverdicts:")
    for v in verdicts.values():
        log.info(f"  {v['verdict']:<13} {v['claim']}")
    log.info("report: %s", html_path)
    return {"verdicts": {k: v["verdict"] for k, v in verdicts.items()}}


def rerender(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """`ssah report`: render a run folder's report again from the stages that finished, running none.
    Writes RUN_DIR/report.html and results.json, or with `out` only the HTML there (an existing file
    is replaced only when it is an ssah report). Returns the paths written."""
    from ssah.config import load_config
    from ssah.pipeline.context import study_of
    from ssah.pipeline.layout import CONFIG_FILE, RunLayout

    root = Path(run_dir)
    if not (root / CONFIG_FILE).is_file():
        raise SsahError(f"{root} is not a run folder (no {CONFIG_FILE}); give the --out folder of ssah run")
    config = load_config(path=root / CONFIG_FILE)
    layout = RunLayout(root, study_of(config))
    if out is None:
        render_report(config, layout)
        return [layout.results, layout.report]
    target = Path(out)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    render_report(config, layout, html_path=target, write_results=False)
    return [target]


def _check_replaceable(path: Path) -> None:
    if path.is_dir():
        raise SsahError(f"--out {path} is a folder; give the name of the HTML file to write")
    if path.exists():
        try:
            with path.open("rb") as file:
                head = file.read(512).decode("utf-8", "replace")
        except OSError:
            head = ""
        if f"<title>{REPORT_TITLE}</title>" not in head:
            raise SsahError(f"{path} exists and is not an ssah report; it is left as it is, choose another --out")


def paired_claims(layout, summaries: dict | None = None) -> dict:
    """The claims that compare two evaluations of the same prompts: (before, after, suite). With the
    stage summaries, UCU's utility is paired with the next-costliest pruned mask's."""
    from ssah.analysis.verdicts import next_costliest

    claims = {
        "ru_alignment_lowers_asr": (layout.baseline_eval, layout.aligned_eval("budget"), "safety"),
        "prune_scu_breaks_safety_spares_utility": (layout.prune_eval("none"), layout.prune_eval("SCU"), "safety"),
        "finetune_attack_raises_asr": (layout.prune_eval("none"), layout.finetuned_eval("plain"), "safety"),
        "freeze_ii_keeps_rise_to_half": (layout.finetuned_eval("plain"), layout.finetuned_eval("freeze_ii"), "safety"),
        "freeze_budget_keeps_rise_to_half": (layout.finetuned_eval("plain"), layout.finetuned_eval("freeze_budget"),
                                             "safety"),
        "monitor_halves_prefill_asr": (layout.studied_eval, layout.monitor_eval, "prefill"),
        "monitor_overrefusal_cost": (layout.studied_eval, layout.monitor_eval, "overrefusal"),
    }
    rival = next_costliest((summaries or {}).get("prune") or {})
    if rival is not None:
        claims["prune_ucu_costs_most_utility"] = (layout.prune_eval(rival), layout.prune_eval("UCU"), "utility")
    return claims
