"""How many calibration prompts the runtime monitor needs, judged on calibration prompts only.

    python experiments/monitor_calibration_size.py --model runs/demo/2-align/model-budget --limits 64 128
    python experiments/monitor_calibration_size.py --model runs/demo/2-align/model-budget --limits 128 \
        --threshold-sets none sensitive_safe:calibration

Calibrates the demo's monitor on the given model with each `calibration_limit` (prompts per set:
harmful, benign, borderline) and each threshold set, and prints the layer, the threshold and the
share of each calibration set flagged at it ("borderline_flag_rate" is the threshold set's when
there is one). No test prompt is read.

Measured on 2026-11-28 on the demo's final aligned model: 64 prompts flag 42% of the harmful set
(benign 0%, borderline 3.1%; layer 27); 128 flag 73% (benign 0%, borderline 4.7%; layer 28).
The demo preset took 128.
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the aligned model (a folder or any model SPEC)")
    parser.add_argument("--limits", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threshold-sets", nargs="+", default=["preset"],
                        help="threshold_calibration values to try: a dataset spec, 'none' (half of the borderline "
                        "prompts set the threshold) or 'preset' (the demo preset's)")
    args = parser.parse_args()

    from ssah.config import load_config
    from ssah.models.loading import load_model
    from ssah.probe.monitor import calibrate_named

    run_config = load_config("demo")
    loaded = load_model(args.model, device="cpu", dtype="fp32")
    for threshold_set in args.threshold_sets:
        for limit in args.limits:
            settings = run_config.probe.monitor_settings
            settings["calibration_limit"] = limit
            if threshold_set != "preset":
                settings["threshold_calibration"] = None if threshold_set == "none" else threshold_set
            config = run_config.probe.monitor_config(run_config.data)
            state = calibrate_named(loaded.model, loaded.tokenizer, config)
            print(json.dumps({"calibration_limit": limit, "threshold_calibration": config.threshold_calibration,
                              "layers": state.layers, "threshold": float(state.threshold),
                              **state.meta.get("calibration", {})}), flush=True)


if __name__ == "__main__":
    main()
