"""Stage 9, report: results.json (every stage summary and a verdict per claim) and report.html, by
`ssah.analysis.report.render_report` (which `ssah report RUN_DIR` calls too)."""

from __future__ import annotations

from pathlib import Path

from ssah.config import RunConfig
from ssah.errors import SsahError
from ssah.pipeline.registry import Stage, register, stage_summary

# the stages whose summaries the report reads, in pipeline order
REPORTED = ("baseline", "align", "groups", "prune", "finetune", "probe", "transfer", "attacks")


def reads(config: RunConfig) -> dict:
    return {}


def finished_summaries(config: RunConfig, layout) -> dict:
    """{stage: summary} of each reported stage ({} for one that has not finished with this config)."""
    return {stage: stage_summary(stage, config, layout) for stage in REPORTED}


def run(ctx) -> dict:
    from ssah.analysis.report import render_report

    # `ssah report` renders through the same function
    return render_report(ctx.config, ctx.layout, finished_summaries(ctx.config, ctx.layout))


def rerender(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """`ssah report`: render a run folder's report again from the stages that finished, running none.
    Writes RUN_DIR/report.html and results.json, only into a run folder ssah made (locked meanwhile),
    or with `out` only the HTML there (an existing file is replaced only when ssah wrote it there and
    it has not changed since: `ssah.outputs.check_file`). Returns the paths written."""
    from ssah.analysis.report import render_report
    from ssah.config import load_config
    from ssah.outputs import OutputFolder, check_file, read_marker, record_file
    from ssah.pipeline.context import study_of
    from ssah.pipeline.layout import CONFIG_FILE, RUN, RunLayout

    root = Path(run_dir)
    marker = read_marker(root) if root.is_dir() else None
    if not (root / CONFIG_FILE).is_file() or marker is None or marker.get("kind") != RUN.name:
        raise SsahError(f"{root} is not a run folder ssah made (no {CONFIG_FILE} with a run marker); give the "
                        "--out folder of ssah run")
    config = load_config(path=root / CONFIG_FILE)
    layout = RunLayout(root, study_of(config))
    summaries = finished_summaries(config, layout)
    if out is None:
        with OutputFolder(root, RUN, command="ssah report"):
            render_report(config, layout, summaries)
        return [layout.results, layout.report]
    target = Path(out)
    check_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    render_report(config, layout, summaries, html_path=target, write_results=False)
    record_file(target)
    return [target]


STAGE = register(Stage("report", run, reads=reads, needs=REPORTED, needs_done=False))
