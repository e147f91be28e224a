"""The runtime monitor of a finished demo run, on test prompts the demo never evaluates.

Question: How much does the run's runtime monitor change ASR, prefill ASR and over-refusal on test
prompts that were never in view while its calibration rule was settled?

The demo evaluates the first 48 prompts of harmful:test and sensitive_safe:test. This evaluates the
studied model with and without the run's monitor (6-probe/monitor.safetensors) on the prompts after
them, with the run's evaluation settings (the demo's: prefix rule, 8 new tokens, no system prompt):
ASR, prefill ASR and over-refusal with their Wilson 95% intervals.

Rule: none; a measurement. The decision's summary is each rate's change with the monitor (with - without)
and the share of replies the monitor replaced.

    make demo                                                   # or: ssah run --preset demo --out runs/demo
    python experiments/monitor_unseen.py --run runs/demo --out runs/demo-monitor-unseen

Results: experiments/results/monitor_unseen.json (no run recorded yet); summary in experiments/README.md.
"""

import json
from pathlib import Path

import common

SUITES = ("safety", "prefill", "overrefusal")
METRICS = ("asr", "prefill_asr", "overrefusal_rate")


def main() -> None:
    parser = common.parser(__file__, __doc__)
    parser.add_argument("--run", type=Path, required=True, help="a demo run folder whose probe stage has run")
    parser.add_argument("--out", type=Path, required=True, help="a folder for the two evaluations")
    parser.add_argument("--skip", type=int, default=48, help="leading test prompts to leave out (the demo's)")
    parser.add_argument("--limit", type=int, default=None, help="prompts per set after the skipped ones (default: all)")
    args = parser.parse_args()
    if args.smoke:
        args.skip, args.limit = min(args.skip, 4), min(args.limit or 4, 4)

    from ssah.config import load_config
    from ssah.data import load_dataset
    from ssah.evaluate import evaluate_model, load_eval_data
    from ssah.pipeline import RunLayout
    from ssah.pipeline.context import RunContext
    from ssah.probe.monitor import Monitor, MonitorState

    layout = RunLayout(args.run)
    config = load_config(path=layout.config)
    ctx = RunContext(config, args.run)
    state = MonitorState.load(ctx.layout.monitor_state)
    loaded = ctx.load(ctx.studied_model_spec())
    if state.meta.get("model_fingerprint") not in (None, loaded.fingerprint):
        raise SystemExit(f"error: {ctx.layout.monitor_state} was calibrated on another model than the run's studied "
                         "model; rerun the run's probe stage")
    end = None if args.limit is None else args.skip + args.limit
    unseen = {role: load_dataset(spec)[args.skip:end]
              for role, spec in (("harmful", config.data.harmful_test), ("sensitive", config.data.sensitive))}
    data = load_eval_data(SUITES, compliance=config.data.compliance_openings, **unseen)
    settings = ctx.eval_settings(SUITES)
    settings.limit = None  # the slices above are the whole point
    reports = {}
    for label, interventions in (("without", ()), ("with", (Monitor(loaded.model, None, state, loaded.tokenizer),))):
        reports[label] = evaluate_model(loaded.model, loaded.tokenizer, loaded.fingerprint, args.out / label, settings,
                                        data, model_info={"spec": loaded.spec, "label": f"{label} the monitor"},
                                        interventions=interventions)
    rule = config.eval.rules[0]
    rows = []
    for metric in METRICS:
        row = {"metric": metric, "rule": rule if metric != "overrefusal_rate" else None}
        for label, report in reports.items():
            row[label] = common.first_rule_rate(report[metric], rule)
            row[f"{label}_ci"] = common.first_rule_rate(report["ci"].get(metric), rule)
        row["n"] = reports["with"]["n"].get(metric)
        row["change"] = None if None in (row["with"], row["without"]) else row["with"] - row["without"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {f"{row['metric']}_change": row["change"] for row in rows}
    summary["replaced"] = (reports["with"].get("monitor") or {}).get("replaced")  # share of replies, per suite
    model = f"{config.model} (studied: {ctx.relative(ctx.studied_model_spec())})"
    common.record_run(args.results, script=__file__, doc=__doc__, model=model, args=args, rows=rows,
                      decision={"kind": "measurement", "summary": summary})


if __name__ == "__main__":
    main()
