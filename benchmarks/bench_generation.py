"""Batched vs one-at-a-time greedy generation: generated tokens per second.

    python benchmarks/bench_generation.py                 # built-in model, 16 prompts x 32 new tokens
    python benchmarks/bench_generation.py --model tiny:llama --prompts 8 --tokens 8

Every side calls `ssah.evaluate.generation.generate_items` (what the evaluation suites use, token ids
kept so tokens are counted exactly) on the same benign:calibration prompts with the same
`max_new_tokens`, without a cache: batch 1 (`model.generate` per prompt, the reference), static
batches of 8 (`model.generate` per batch: rows step until the batch's longest reply ends) and
continuous batching with 8 slots (the default: a finished row's slot goes to the next prompt).
Throughput counts the tokens of each reply up to its end-of-sequence token. A prefill-only pass
(one forward per prompt) shows how much of batch 1's time no batching can share. Sides alternate
per repeat; medians, spreads and per-repeat ratios are reported.
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
TARGET = 4.0
PROSE = """\
Tokens/s counts kept tokens only, so a batched side's ratio is the product of two factors: how many
more row-steps per second a batch decodes (less than 8x: only the per-step part of the cost --
reading the weights, dispatch, the generation loop -- is shared by the rows, while the arithmetic
grows with them), and the share of row-steps that produce kept tokens. Continuous batching brings
the second factor to 100%. transformers' own continuous batching (`generate_batch`, paged attention,
run with its default settings but the same number of slots) is timed on the same prompts: its
scheduling and paged attention cost more than they save on a CPU, which is why ssah runs its own
loop. The prompts' prefill is arithmetic-bound on a CPU, so batching does not share it: its share of
batch 1's time caps what any batching can gain."""


def run(loaded, prompts: int = 16, tokens: int = 32, batch_size: int = 8, repeats: int = 3) -> dict:
    import torch

    from ssah.data import load_dataset
    from ssah.evaluate.generation import _encode_text, generate_items, render_prompts

    texts = [record.prompt for record in load_dataset("benign:calibration").take(prompts)]

    def generate(size: int, batching: str) -> tuple[int, int]:
        """(tokens kept, row-steps): token positions computed per row, the first one by the prefill."""
        static_steps = []

        def count(batch) -> None:  # a static batch steps every row until its longest row ends
            static_steps.append(len(batch) * max(min(tokens, len(item.token_ids) + 1) for item in batch))

        items = generate_items(loaded.model, loaded.tokenizer, texts, model_key="bench", max_new_tokens=tokens,
                               batch_size=size, cache=None, progress=False, on_batch=count, batching=batching)
        steps = sum(static_steps) if batching == "static" else \
            sum(min(tokens, len(item.token_ids) + 1) for item in items)
        return sum(len(item.token_ids) for item in items), steps

    encoded = [_encode_text(loaded.tokenizer, t) for t in render_prompts(loaded.tokenizer, texts)]

    def transformers_batching() -> tuple[int, int]:
        """transformers' own continuous batching (`generate_batch`, paged attention), same slots."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        eos = [e for e in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id) if e is not None]
        config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=eos)
        out = loaded.model.generate_batch(encoded, generation_config=config, warmup=False,
                                          continuous_batching_config=ContinuousBatchingConfig(
                                              max_requests_per_batch=batch_size))
        stops = set(config.eos_token_id)
        kept = [next((i for i, t in enumerate(r.generated_tokens) if t in stops), len(r.generated_tokens))
                for r in out.values()]
        return sum(kept), sum(min(tokens, n + 1) for n in kept)

    @torch.inference_mode()
    def prefill() -> tuple[int, int]:
        for ids in encoded:
            loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=True)
        return 0, 0

    runs = {"batch 1": (1, "static"), f"static {batch_size}": (batch_size, "static"),
            f"continuous {batch_size}": (batch_size, "continuous")}
    extra = {"prefill only": prefill}
    if hasattr(loaded.model, "generate_batch"):
        extra[f"transformers generate_batch, {batch_size} slots"] = transformers_batching
    generate(batch_size, "continuous")  # warm-up
    sides = {name: {"s": [], "tps": [], "row_steps_per_s": []} for name in [*runs, *extra]}
    for _ in range(repeats):
        for name, side in sides.items():
            call = extra[name] if name in extra else (lambda r=runs[name]: generate(*r))
            seconds, (count, row_steps) = timed_call(call)
            side.update(tokens=count, row_steps=row_steps)
            side["s"].append(seconds)
            side["tps"].append(count / seconds)
            side["row_steps_per_s"].append(row_steps / seconds)
    reference = sides["batch 1"]
    ratios = {name: paired_ratios(sides[name]["tps"], reference["tps"])
              for name in [*list(runs)[1:], *list(extra)[1:]]}
    rows = [{"side": name, "batch_size": runs[name][0] if name in runs else 1, "seconds": summary(side["s"]),
             "tokens": side["tokens"], "tokens_per_s": summary(side["tps"]), "row_steps": side["row_steps"],
             "useful_share": side["tokens"] / side["row_steps"] if side["row_steps"] else None,
             "row_steps_per_s": summary(side["row_steps_per_s"])} for name, side in sides.items()]
    continuous = f"continuous {batch_size}"
    return {"name": NAME, "model": loaded.spec,
            "params": dict(prompts=prompts, tokens=tokens, batch_size=batch_size, repeats=repeats),
            "rows": rows, "ratios": ratios, "ratio": ratios[continuous],
            "prefill_share": paired_ratios(sides["prefill only"]["s"], reference["s"]),
            "target": target(f"continuous batching, {batch_size} slots / batch 1 tokens/s",
                             ratios[continuous]["median"], ">=", TARGET)}


def render(result: dict) -> list[str]:
    p = result["params"]
    lines = [f"`{result['model']}`, {p['prompts']} benign:calibration prompts, at most {p['tokens']} new tokens each, "
             f"greedy, median of {p['repeats']} (min-max); ratios are per repeat. Row-steps count the token positions "
             "a side computes for each row (the first from the prompt's prefill), finished rows included; useful "
             "share = tokens kept / row-steps.", "",
             "| side | seconds for all prompts | tokens generated | tokens/s | vs batch 1 | target "
             "| row-steps | useful share | row-steps/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        s, t, r = row["seconds"], row["tokens_per_s"], row["row_steps_per_s"]
        if row["side"] == "prefill only":
            lines.append(f"| prefill only (batch 1, no decoding) | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) "
                         f"| | | {result['prefill_share']['median']:.0%} of batch 1's time | | | | |")
            continue
        ratio = result["ratios"].get(row["side"])
        is_target = row["side"].startswith("continuous")
        lines.append(f"| {row['side']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {row['tokens']} | "
                     f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | "
                     f"{fmt_ratio(ratio) if ratio else '1 (reference)'} | "
                     f"{fmt_target(result['target']) if is_target else ''} | {row['row_steps']} | "
                     f"{row['useful_share']:.0%} | {r['median']:.1f} |")
    share = result["prefill_share"]["median"]
    lines += ["", f"The prefill alone takes {share:.0%} of batch 1's time; were decoding free, tokens/s could grow at "
              f"most {1 / share:.1f}x over batch 1 on this machine."]
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
