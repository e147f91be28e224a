"""Batched vs one-at-a-time greedy generation: generated tokens per second.

    python benchmarks/bench_generation.py                 # built-in model, 16 prompts x 32 new tokens
    python benchmarks/bench_generation.py --model tiny:llama --prompts 8 --tokens 8

Both sides call `ssah.evaluate.generation.generate_items` (what `generate_replies` uses, with the
token ids kept so tokens are counted exactly) on the same benign:calibration prompts with the same
`max_new_tokens`, without a cache; only `batch_size` differs. Throughput counts the tokens of each
reply up to its end-of-sequence token, so a batch that keeps stepping for its longest row pays for
that. Sides alternate per repeat; medians, spreads and per-repeat ratios are reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_ratio, fmt_target, paired_ratios, script_main, summary, target, timed_call  # noqa: E402

NAME = "generation"
TITLE = "Batched vs batch-1 generation throughput"
PARAMS = {
    "full": dict(prompts=16, tokens=32, batch_size=8, repeats=3),
    "quick": dict(prompts=8, tokens=8, batch_size=4, repeats=1),
}
TARGET = 3.0
PROSE = """\
Tokens/s counts kept tokens only, so the ratio is the product of two factors shown above: how many
more row-steps per second a batch decodes (less than 8x: only the per-step part of the cost --
reading the weights, dispatch, the generation loop -- is shared by the rows, while the arithmetic
grows with them), and the share of row-steps that still produce kept tokens. The second factor depends on
how unevenly long the replies are; it is a property of `generate_texts` batching (rows are not
replaced when they finish), not of the model."""


def run(loaded, prompts: int = 16, tokens: int = 32, batch_size: int = 8, repeats: int = 3) -> dict:
    from ssah.data import load_dataset
    from ssah.evaluate.generation import generate_items

    texts = [record.prompt for record in load_dataset("benign:calibration").take(prompts)]

    def generate(size: int) -> tuple[int, int]:
        """(tokens generated, row-steps): a batch decodes every row until its longest row stops."""
        row_steps = []

        def count(batch) -> None:
            # A row that stopped early took one step for its end-of-sequence token, which is not kept.
            steps = max(min(tokens, len(item.token_ids) + 1) for item in batch)
            row_steps.append(len(batch) * steps)

        items = generate_items(loaded.model, loaded.tokenizer, texts, model_key="bench", max_new_tokens=tokens,
                               batch_size=size, cache=None, progress=False, on_batch=count)
        return sum(len(item.token_ids) for item in items), sum(row_steps)

    generate(batch_size)  # warm-up
    sides = {size: {"s": [], "tps": [], "row_steps_per_s": []} for size in (1, batch_size)}
    for _ in range(repeats):
        for size, side in sides.items():
            seconds, (count, row_steps) = timed_call(lambda size=size: generate(size))
            side.update(tokens=count, row_steps=row_steps)
            side["s"].append(seconds)
            side["tps"].append(count / seconds)
            side["row_steps_per_s"].append(row_steps / seconds)
    ratio = paired_ratios(sides[batch_size]["tps"], sides[1]["tps"])
    rows = [{"batch_size": size, "seconds": summary(side["s"]), "tokens": side["tokens"],
             "tokens_per_s": summary(side["tps"]), "row_steps": side["row_steps"],
             "useful_share": side["tokens"] / side["row_steps"], "row_steps_per_s": summary(side["row_steps_per_s"])}
            for size, side in sides.items()]
    return {"name": NAME, "model": loaded.spec,
            "params": dict(prompts=prompts, tokens=tokens, batch_size=batch_size, repeats=repeats),
            "rows": rows, "ratio": ratio,
            "row_step_ratio": paired_ratios(sides[batch_size]["row_steps_per_s"], sides[1]["row_steps_per_s"]),
            "target": target(f"batch {batch_size} / batch 1 tokens/s", ratio["median"], ">=", TARGET)}


def render(result: dict) -> list[str]:
    p = result["params"]
    lines = [f"`{result['model']}`, {p['prompts']} benign:calibration prompts, at most {p['tokens']} new tokens each, "
             f"greedy, median of {p['repeats']} (min-max); the ratio is per repeat. Row-steps count every row of a "
             "batch at every decoding step, finished or not; useful share = tokens kept / row-steps.", "",
             "| batch size | seconds for all prompts | tokens generated | tokens/s | vs batch 1 | target "
             "| row-steps | useful share | row-steps/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        s, t, r = row["seconds"], row["tokens_per_s"], row["row_steps_per_s"]
        batched = row["batch_size"] != 1
        lines.append(f"| {row['batch_size']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {row['tokens']} | "
                     f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | "
                     f"{fmt_ratio(result['ratio']) if batched else '1 (reference)'} | "
                     f"{fmt_target(result['target']) if batched else ''} | {row['row_steps']} | "
                     f"{row['useful_share']:.0%} | {r['median']:.1f} |")
    batch1, batched = result["rows"]
    lines += ["", f"Where the batched side's gain goes: a batch of {batched['batch_size']} decodes "
              f"{fmt_ratio(result['row_step_ratio'])} as many row-steps per second as batch 1 (the hardware gain of "
              f"batching), but only {batched['useful_share']:.0%} of its row-steps produce kept tokens "
              f"(batch 1: {batch1['useful_share']:.0%}), because rows that reached their end-of-sequence token keep "
              "stepping until the longest row of their batch ends: "
              f"{result['row_step_ratio']['median']:.2f} x "
              f"({batched['useful_share']:.0%} / {batch1['useful_share']:.0%}) = "
              f"{result['row_step_ratio']['median'] * batched['useful_share'] / batch1['useful_share']:.2f}x."]
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
