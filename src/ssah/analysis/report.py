"""The run report: results.json (every stage summary and the verdicts) and a self-contained
report.html; the verdicts come from `ssah.analysis.verdicts`.

`render_report` takes the summaries of the finished stages (`ssah.pipeline.stages.report.finished_summaries`,
an explicit list of stages), computes the verdicts from them and the evaluations' replies, gathers a few
replies of each evaluation and writes both files; the report stage and `ssah report`
(`ssah.pipeline.stages.report.rerender`) both call it. The HTML shows every rate with its Wilson 95%
interval, every test with its p-value, bar charts with interval error bars, and the paper's numbers
beside ours (labelled with the paper's model, which is not ours).
"""

import logging
from pathlib import Path

from ssah.analysis.report_data import PAPER, gather_examples, gather_rule_agreement
from ssah.analysis.report_html import report_html
from ssah.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


# -- entry points --------------------------------------------------------------------------------------


def study_kind(config) -> dict:
    """Whose safety the study measures: "self-aligned" when ssah trained it into a chosen unit budget (the
    align stage), "maker-aligned" when the model came aligned by its makers (align.enabled: false)."""
    align = config.align
    if align.enabled:
        where = f"into the {align.budget} budget" if align.study == "budget" else "with all parameters"
        return {"kind": "self-aligned", "note": f"safety trained by ssah {where} of an unaligned model; its verdicts "
                                                "speak of that training, not of a model aligned by its makers"}
    return {"kind": "maker-aligned", "note": "the model as its makers aligned it (align.enabled: false)"}


def render_report(config, layout, summaries: dict, html_path: Path | None = None, write_results: bool = True) -> dict:
    """Write the report of the run in `layout` (a `RunLayout`) made with `config` (a `RunConfig`) from
    its finished stages' `summaries` ({stage: summary}): results.json and report.html at the run
    folder's top, or the HTML alone at `html_path` when `write_results` is False. Returns the report
    stage's summary ({"verdicts": {claim: verdict}})."""
    from ssah.analysis.verdicts import compute_verdicts

    rule = getattr(config.eval, "verdict_rule", None) or "prefix"
    verdicts = compute_verdicts(summaries, layout, rule=rule, seed=config.seed)
    images = {"groups": [layout.groups / "groups_per_layer.png"],
              "probe": sorted(layout.probe_study.glob("*.png")),
              "transfer": sorted(layout.stage("transfer").glob("*.png")),
              "attacks": sorted(layout.attack_grid.glob("*.png"))}
    settings = config.to_dict()
    study = study_kind(config)
    results = {"model": settings["model"], "config": settings, "study": study, "verdict_rule": rule,
               "stages": summaries, "verdicts": verdicts, "paper": PAPER,
               "rule": f"{rule} (the verdicts' rule); rates with Wilson 95% intervals"}
    if write_results:
        write_json_atomic(layout.results, results)
    html_path = html_path or layout.report
    page = report_html(settings, summaries, verdicts, images, gather_examples(layout, summaries),
                       gather_rule_agreement(layout, summaries), study=study, rule=rule)
    write_text_atomic(html_path, page)
    log.info("\nverdicts (%s study, %s rule):", study["kind"], rule)
    for v in verdicts.values():
        log.info(f"  {v['verdict']:<13} {v['claim']}")
    log.info("report: %s", html_path)
    return {"verdicts": {k: v["verdict"] for k, v in verdicts.items()}}
