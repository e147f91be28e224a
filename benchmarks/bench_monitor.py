"""Per-token cost of generation under the runtime monitor vs plain `model.generate`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_monitor.py [--model SPEC] [--batch 8] [--tokens 32] [--threads 1]

Every run generates exactly --tokens new tokens per row (min_new_tokens), greedy, from the same
left-padded batch of harmful calibration prompts. The monitor's threshold is set to +inf so it never
acts and the token sequences are identical: what is timed is the monitoring itself (hooks, one dot
product per row and layer, on-device flag updates). Runs are interleaved (plain, then each monitor
variant, per repeat) so machine load drifts hit all of them alike; the table shows medians, spreads
and per-repeat ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_ratio, fmt_target, paired_ratios, script_main, summary, target, timed  # noqa: E402

NAME = "monitor"
TITLE = "Monitor cost per generated token"
PARAMS = {
    "full": dict(batch=8, tokens=32, repeats=3),
    "quick": dict(batch=4, tokens=8, repeats=1),
}
TARGET = 1.10
PROSE = """\
The monitor adds one dot product per row and monitored layer per step and never synchronises with
the host during generation, so its cost is within the machine's noise."""


def run(loaded, batch: int = 8, tokens: int = 32, repeats: int = 3) -> dict:
    import torch

    from ssah.data import load_dataset
    from ssah.data.chat import encode_prompts
    from ssah.probe.directions import compute_directions
    from ssah.probe.hidden import last_token_states
    from ssah.probe.monitor import Monitor, MonitorConfig, MonitorState

    model, tok = loaded.model, loaded.tokenizer
    harmful = load_dataset("harmful:calibration").prompts()
    benign = load_dataset("benign:calibration").prompts()
    # Directions from 16 + 16 calibration prompts: enough for a realistic monitor; cost does not depend on them.
    states_h, states_b = last_token_states(model, tok, harmful[:16]), last_token_states(model, tok, benign[:16])
    depth = states_h.shape[1]
    directions = compute_directions(states_h, states_b, list(range(depth)))
    middle = depth // 2
    never = 1e30  # a threshold no score reaches (settings take finite numbers only): the monitor's cost alone
    variants = {
        "1 layer, stop": MonitorConfig(layers=[middle], threshold=never),
        "1 layer, steer": MonitorConfig(layers=[middle], threshold=never, action="steer"),
        "3 layers, stop": MonitorConfig(layers=sorted({max(0, middle - 4), middle, min(depth - 1, middle + 4)}),
                                        threshold=never),
    }
    states = {name: MonitorState.from_directions(directions, config, depth) for name, config in variants.items()}
    inputs = {k: v.to(loaded.device) for k, v in encode_prompts(tok, harmful[16:16 + batch]).items()}

    def generate(call=model.generate) -> None:
        with torch.no_grad():
            out = call(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens

    def once(name: str) -> float:
        if name == "plain generate":
            return timed(generate)
        with Monitor(model, variants[name], states[name], tok) as mon:
            elapsed = timed(lambda: generate(mon.generate))
        assert not any(mon.flags)
        return elapsed

    times: dict[str, list[float]] = {"plain generate": [], **{name: [] for name in variants}}
    for name in times:  # warm-up: first calls pay one-off allocation and dispatch costs
        once(name)
    for _ in range(repeats):
        for name in times:
            times[name].append(once(name))
    rows = []
    for name, values in times.items():
        row = {"run": name, "call_s": summary(values), "ms_per_token_step": 1000 * summary(values)["median"] / tokens}
        if name != "plain generate":
            row["ratio"] = paired_ratios(values, times["plain generate"])
            row["target"] = target(f"monitor {name} / plain", row["ratio"]["median"], "<=", TARGET)
        rows.append(row)
    return {"name": NAME, "model": loaded.spec, "params": dict(batch=batch, tokens=tokens, repeats=repeats),
            "rows": rows}


def render(result: dict) -> list[str]:
    p = result["params"]
    lines = [f"`{result['model']}`, batch {p['batch']}, exactly {p['tokens']} new tokens per row, greedy, median of "
             f"{p['repeats']} (min-max); ratios per repeat against the plain call run just before.", "",
             "| run | seconds per call | ms per token step | vs plain generate | target |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        s = row["call_s"]
        ratio = fmt_ratio(row["ratio"], 3) if "ratio" in row else "1 (reference)"
        check = fmt_target(row["target"]) if "target" in row else ""
        lines.append(f"| {row['run']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                     f"{row['ms_per_token_step']:.1f} | {ratio} | {check} |")
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
