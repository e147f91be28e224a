"""Scoring cost vs a plain forward pass: wall time of `score_batches` over the same batches.

    python benchmarks/bench_scoring.py                      # built-in model, 64 safety + 64 utility pairs
    python benchmarks/bench_scoring.py --scorers variance,snip --samples 32 --model tiny:llama

For each calibration set (harmful:calibration with built-in refusals, benign:calibration with its
answers) the script builds the batches once, then alternates a plain no-grad forward pass
(`model(input_ids, attention_mask, use_cache=False)`, logits included) and each scorer over exactly
those batches, `--repeats` times in the same process, and prints the median wall times, their
spread and the per-repeat ratio as a markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_ratio, fmt_seconds, fmt_target, paired_ratios, script_main, summary, target, timed  # noqa: E402

NAME = "scoring"
TITLE = "Scoring vs a plain forward pass"
PARAMS = {
    "full": dict(samples=64, scorers=("variance",), repeats=3, batch_size=8, max_length=256),
    "quick": dict(samples=8, scorers=("variance",), repeats=1, batch_size=8, max_length=256),
}
TARGET = 1.2
PROSE = """\
Scoring is cheaper than the forward pass it is compared with because it stops after the last
hooked module: the LM head (49,152 x 576 on the built-in model) is never computed. `ssah groups`
on the 63,360 units of the built-in model takes well under a second."""


def forward(model, batches) -> None:
    """Plain no-grad forward over the batches, logits included (what scoring is compared with)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)


def calibration_sets(loaded, samples: int, batch_size: int, max_length: int) -> dict[str, list]:
    """label -> batches of the two calibration sets the paper scores (safety and utility)."""
    from ssah.data import load_dataset
    from ssah.units.scores import calibration_pairs, make_batches

    sets = {
        "harmful:calibration + built-in refusals": (load_dataset("harmful:calibration"), "refusals"),
        "benign:calibration": (load_dataset("benign:calibration"), "dataset"),
    }
    out = {}
    for label, (dataset, responses) in sets.items():
        pairs = calibration_pairs(loaded, dataset.take(samples), responses=responses, seed=0, progress=False)
        out[label] = make_batches(loaded.tokenizer, pairs, batch_size, max_length)
    return out


def run(loaded, samples: int, scorers=("variance",), repeats: int = 3, batch_size: int = 8,
        max_length: int = 256) -> dict:
    from ssah.units.scores import score_batches

    rows = []
    for label, batches in calibration_sets(loaded, samples, batch_size, max_length).items():
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        forward(loaded.model, batches[:1])  # warm-up: first-call allocations and kernel selection
        times: dict[str, list[float]] = {"forward": [], **{name: [] for name in scorers}}
        for _ in range(repeats):
            times["forward"].append(timed(lambda b=batches: forward(loaded.model, b)))
            for name in scorers:
                times[name].append(timed(lambda b=batches, s=name: score_batches(loaded.model, loaded.layout, b, s,
                                                                                 None, progress=False)))
        for name in scorers:
            ratio = paired_ratios(times[name], times["forward"])
            rows.append({"data": label, "records": sum(len(b["input_ids"]) for b in batches), "tokens": tokens,
                         "scorer": name, "forward_s": summary(times["forward"]), "scoring_s": summary(times[name]),
                         "ratio": ratio, "target": target(f"{name} / forward", ratio["median"], "<=", TARGET)})
    return {"name": NAME, "model": loaded.spec, "dtype": str(next(loaded.model.parameters()).dtype),
            "params": dict(samples=samples, scorers=list(scorers), repeats=repeats, batch_size=batch_size,
                           max_length=max_length), "rows": rows}


def render(result: dict) -> list[str]:
    p = result["params"]
    lines = [f"`{result['model']}`, {result['dtype'].removeprefix('torch.')}, batch {p['batch_size']}, max length "
             f"{p['max_length']}, {p['samples']} records per set, median of {p['repeats']} (min-max); the ratio is "
             "taken per repeat (forward and scoring ran back to back) and then summarised.", "",
             "| calibration data | records | tokens | scorer | plain forward | scoring | scoring / forward | target |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['data']} | {row['records']} | {row['tokens']:,} | `{row['scorer']}` | "
                     f"{fmt_seconds(row['forward_s'])} | {fmt_seconds(row['scoring_s'])} | {fmt_ratio(row['ratio'])} | "
                     f"{fmt_target(row['target'])} |")
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
