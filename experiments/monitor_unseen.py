"""The runtime monitor of a finished demo run, on test prompts the demo never evaluates.

    make demo                                                   # or: ssah run --preset demo --out runs/demo
    python experiments/monitor_unseen.py --run runs/demo

The demo evaluates the first 48 prompts of harmful:test and sensitive_safe:test, and those were in
view while the monitor's calibration rule was settled. This script evaluates the studied model with
and without the run's saved monitor (6-probe/monitor.safetensors) on the prompts after them, with the
demo's evaluation settings (prefix rule, 8 new tokens, no system prompt), and prints ASR, prefill
ASR and over-refusal with their Wilson 95% intervals.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUITES = ("safety", "prefill", "overrefusal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a demo run folder whose probe stage has run")
    parser.add_argument("--skip", type=int, default=48, help="leading test prompts to leave out (the demo's)")
    parser.add_argument("--out", default=None, help="evaluation folders (default: RUN/experiments/monitor-unseen)")
    args = parser.parse_args()

    from ssah.config import load_config
    from ssah.data import load_dataset
    from ssah.data.records import Dataset
    from ssah.evaluate.runner import evaluate_model, load_eval_data
    from ssah.pipeline import Run
    from ssah.probe.monitor import MonitorState

    run_dir = Path(args.run)
    run = Run(load_config(path=run_dir / "config.yaml"), run_dir)
    state = MonitorState.load(run.stage_dir("probe") / "monitor.safetensors")
    loaded = run.load(run.studied_model_spec())
    data = {}
    for role, name in (("harmful", run.config.data.harmful_test), ("sensitive", run.config.data.sensitive)):
        full = load_dataset(name)
        data[role] = Dataset(f"{name}[{args.skip}:]", full.records[args.skip:])
    data = load_eval_data(SUITES, **data)
    settings = run.eval_settings(SUITES)
    settings.limit = None  # the slices above are the whole point
    out = Path(args.out) if args.out else run_dir / "experiments" / "monitor-unseen"
    results = {}
    for label, monitor in (("without", None), ("with", (None, state))):
        report = evaluate_model(loaded.model, loaded.tokenizer, loaded.fingerprint, out / label, settings, data,
                                monitor=monitor)
        results[label] = {metric: {"rate": report[metric], "ci": report["ci"].get(metric), "n": report["n"].get(metric)}
                          for metric in ("asr", "prefill_asr", "overrefusal_rate")}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
