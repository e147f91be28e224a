r"""How many calibration prompts the runtime monitor needs, judged on calibration prompts only.

Question: With how many prompts per calibration set (harmful, benign, borderline) should the demo's
runtime monitor be calibrated?

`--preset maker-aligned --model PATH` asks the same of a maker-aligned model with that preset's
monitor settings.

For each `calibration_limit` and each threshold set, the monitor is calibrated on the given model with
the preset's monitor settings (demo by default); a row holds the layer, the threshold and the share of each
calibration set flagged at it ("borderline_flag_rate" is the threshold set's when there is one). No
test prompt is read.

Rule (written down after the 2026-11-28 runs, as the demo preset's choice of 128 follows it): per
threshold set, among the limits whose benign and borderline flag rates stay within the monitor's
target_fpr, the one that flags the most harmful calibration prompts; ties go to the smaller limit.

    python experiments/monitor_calibration_size.py --model runs/demo/2-align/model-budget --limits 64 128
    python experiments/monitor_calibration_size.py --model runs/demo/2-align/model-budget --limits 128 \
        --threshold-sets none sensitive_safe:calibration

Results: experiments/results/monitor_calibration_size.json; summary in experiments/README.md.
"""

import json

import common


def choose(rows: list[dict], target_fpr: float) -> dict:
    chosen = {}
    for threshold_set in dict.fromkeys(row["threshold_set"] for row in rows):
        within = [row for row in rows if row["threshold_set"] == threshold_set
                  and row["benign_flag_rate"] <= target_fpr
                  and (row["borderline_flag_rate"] is None or row["borderline_flag_rate"] <= target_fpr)]
        best = min(within, key=lambda row: (-row["harmful_flag_rate"], row["calibration_limit"]), default=None)
        chosen[threshold_set] = best["calibration_limit"] if best else None
    return {"kind": "choice", "chosen": chosen,
            "reason": f"per threshold set, the limit flagging the most harmful calibration prompts with benign and "
                      f"borderline flag rates <= target_fpr ({target_fpr:g})"}


def main() -> None:
    parser = common.parser(__file__, __doc__)
    parser.add_argument("--model", help="the aligned model (a folder or any model SPEC); required unless --smoke, "
                        f"which defaults to {common.SMOKE_MODEL}")
    parser.add_argument("--limits", type=int, nargs="+", default=[64, 128], help="calibration_limit values")
    parser.add_argument("--threshold-sets", nargs="+", default=["preset"],
                        help="threshold_calibration values to try: a dataset spec, 'none' (half of the borderline "
                        "prompts set the threshold) or 'preset' (the preset's)")
    parser.add_argument("--preset", default="demo", help="the preset whose monitor settings and data are used")
    args = parser.parse_args()
    if args.model is None and not args.smoke:
        parser.error("--model is required (unless --smoke)")
    if args.smoke:
        args.model = args.model or common.SMOKE_MODEL
        args.limits = [min(limit, 4 + i) for i, limit in enumerate(args.limits)]

    from ssah.config import load_config
    from ssah.models.loading import load_model
    from ssah.probe.monitor import calibrate_named

    run_config = load_config(args.preset)
    if args.smoke:
        run_config.probe.monitor_settings = common.merged(run_config.probe.monitor_settings,
                                                          common.SMOKE_CONFIG["probe"]["monitor_settings"])
    loaded = load_model(args.model, device=run_config.device, dtype=run_config.dtype)
    rows, target_fpr = [], None
    for threshold_set in args.threshold_sets:
        for limit in args.limits:
            settings = {**run_config.probe.monitor_settings, "calibration_limit": limit}
            if threshold_set != "preset":
                settings["threshold_calibration"] = None if threshold_set == "none" else threshold_set
            probe = run_config.probe.model_copy(update={"monitor_settings": settings})
            config = probe.monitor_config(run_config.data)
            target_fpr = config.target_fpr
            state = calibrate_named(loaded.model, loaded.tokenizer, config)
            calibration = state.meta.get("calibration", {})
            row = {"threshold_set": threshold_set, "threshold_calibration": config.threshold_calibration,
                   "calibration_limit": limit, "layers": state.layers, "threshold": float(state.threshold),
                   **{key: calibration.get(key) for key in ("harmful_flag_rate", "benign_flag_rate",
                                                            "borderline_flag_rate", "tokens")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    common.record_run(args.results, script=__file__, doc=__doc__, model=args.model, args=args, rows=rows,
                      decision=choose(rows, target_fpr))


if __name__ == "__main__":
    main()
