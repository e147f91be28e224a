"""Generation throughput at 1 to 64 slots: generated tokens per second against batch 1, and the FLOP/s
each side reaches beside the machine's matmul roofline.

    python benchmarks/bench_generation.py --threads 1           # built-in model, then Qwen2.5-Coder-0.5B
    python benchmarks/bench_generation.py --quick               # tiny:llama, 8 prompts x 8 tokens

Every batched side runs `ssah.evaluate.batching.continuous_generate` (what `ssah eval` runs on the hf
engine) on the same harmful:test prompts, rendered with the chat template and sorted longest first as
the evaluation does, greedy, at most `tokens` new tokens. Batch 1 is `model.generate` per prompt (the
reference); on a subset of the prompts (`batch1_prompts`), since its tokens/s does not depend on how
many prompts it runs (on the second model, slot counts under 32 also run on a subset:
`second_small_prompts`). `auto` is the slot count `choose_slots` picks (measured once per model and
machine, then cached). The second model (`second`: a GGUF path, Qwen2.5-Coder-0.5B-Instruct by
default) runs the same sides; it is skipped with a line when the file is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_flops, matmul_roofline, script_main, target, timed_call, weight_counts  # noqa: E402

NAME = "generation"
TITLE = "Generation throughput at 1 to 64 slots, against batch 1 and the matmul roofline"
QWEN = "~/.cache/ssah-models/qwen2.5-coder-0.5b-instruct.gguf"
PARAMS = {
    "full": dict(prompts=128, tokens=32, slots=(8, 32, 64), batch1_prompts=16, second=QWEN, second_batch1_prompts=8,
                 second_small_prompts=32),
    "quick": dict(prompts=8, tokens=8, slots=(4, 8), batch1_prompts=4, second="", second_batch1_prompts=2,
                  second_small_prompts=4),
}
TARGETS = {"first": 10.0, "second": 6.0}
PROSE = """\
A decoding step reads every weight once whatever the number of rows, so on a CPU rows share that
cost until the arithmetic dominates: tokens/s grows with the slot count while the achieved FLOP/s
climbs toward the roofline (a large fp32 matmul at the same thread count). FLOPs count the weights'
multiply-adds of every position computed (prompt positions with their padding, then one per decoding
row-step; attention's score products are left out), so a side near the roofline has little left to
gain from more slots. The prompts' prefill is arithmetic-bound already at batch 1, which caps what
batching can gain over batch 1 on prompts long against their replies. The ratio to batch 1 is
therefore bounded by the roofline over batch 1's achieved FLOP/s: on an idle machine batch 1 runs at a
larger share of the roofline than on a busy one, and the fp32 ratio is lower there, however many slots.
The bf16 side casts the weights for generation (`eval.generation_dtype: bf16`): bf16 matmuls on a CPU
with bf16 instructions run past the fp32 roofline, so they have no share of it; their "vs batch 1" is
to the same fp32 batch 1, what a user running `model.generate` on the model as loaded gets, and the
line under each table gives the like-for-like ratio, bf16 slots against bf16 batch 1."""


def _generation_flops(weights: dict, prompt_positions: int, prompt_rows: int, row_steps: int) -> float:
    """Weights' multiply-adds: every prompt position through the body, the head at each prompt's last
    position, and body plus head for each decoding row-step."""
    return 2 * weights["body"] * (prompt_positions + row_steps) + 2 * weights["head"] * (prompt_rows + row_steps)


def _spread(encoded: list, count: int) -> list:
    """`count` of the prompts (sorted by length), spread over all lengths."""
    return encoded[::max(1, len(encoded) // count)][:count]


def measure(loaded, prompts: int, tokens: int, slots, batch1_prompts: int, roofline: float,
            small_prompts: int | None = None) -> dict:
    import torch

    from ssah.data import load_dataset
    from ssah.evaluate.batching import BatchingStats, choose_slots, continuous_generate
    from ssah.evaluate.generation import _encode_text, _eos_ids, _pad_id, render_prompts, weights_cast

    model, tokenizer = loaded.model, loaded.tokenizer
    texts = [record.prompt for record in load_dataset("harmful:test").take(prompts)]
    encoded = sorted((_encode_text(tokenizer, t) for t in render_prompts(tokenizer, texts)), key=len, reverse=True)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    weights = weight_counts(model)
    choice = choose_slots(model)
    stops = set(eos_ids)

    @torch.inference_mode()
    def batch_one() -> dict:
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=tokens, pad_token_id=pad_id,
                                  eos_token_id=eos_ids)
        kept = positions = steps = 0
        subset = _spread(encoded, batch1_prompts)
        for ids in subset:
            out = model.generate(input_ids=torch.tensor([ids], device=loaded.device), generation_config=config)
            new = out[0, len(ids):].tolist()
            n = next((i for i, t in enumerate(new) if t in stops), len(new))
            kept, positions, steps = kept + n, positions + len(ids), steps + min(tokens, n + 1) - 1
        return {"tokens": kept, "flops": _generation_flops(weights, positions, len(subset), steps),
                "prompts": len(subset)}

    def continuous(width: int, count: int | None = None) -> dict:
        chosen = _spread(encoded, count) if count else encoded
        stats = BatchingStats()
        replies = continuous_generate(model, chosen, max_new_tokens=tokens, eos_ids=eos_ids, pad_id=pad_id,
                                      batch_size=width, stats=stats)
        return {"tokens": sum(len(r) for r in replies), "prompts": len(chosen), "prefills": stats.prefills,
                "flops": _generation_flops(weights, stats.prefill_tokens, len(chosen), stats.row_steps)}

    continuous(min(slots), min(slots))  # warm-up
    sides = [("batch 1 (model.generate)", 1, batch_one)]
    widths = sorted(set(slots) | {choice.slots})
    sides += [(f"continuous, {w} slots" + (" (auto)" if w == choice.slots else ""), w,
               lambda w=w: continuous(w, small_prompts if small_prompts and w < 32 else None)) for w in widths]

    def in_bf16(call, *args) -> dict:
        with weights_cast(model, "bf16"):
            return call(*args)

    # eval.generation_dtype: bf16, beside the fp32 sides (not candidates for "best", whose target compares
    # fp32 with fp32 batch 1): batch 1 and the auto slot count, so the bf16 ratio is like for like too
    sides.append(("batch 1 (model.generate), weights in bf16", 1, lambda: in_bf16(batch_one)))
    sides.append((f"continuous, {choice.slots} slots (auto), weights in bf16", choice.slots,
                  lambda: in_bf16(continuous, choice.slots)))
    rows = []
    for name, width, call in sides:
        seconds, row = timed_call(call)
        row.update(side=name, slots=width, seconds=seconds, tokens_per_s=row["tokens"] / seconds,
                   flops_per_s=row["flops"] / seconds)
        # the roofline is an fp32 matmul's: a bf16 side has no share of it
        row["roofline_share"] = None if "bf16" in name else row["flops_per_s"] / roofline
        rows.append(row)
        print(f"  {loaded.spec}: {name}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
    reference = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_batch1"] = row["tokens_per_s"] / reference
    fp32_auto = next(row for row in rows if row["slots"] == choice.slots and "bf16" not in row["side"])
    rows[-1]["vs_fp32_same_slots"] = rows[-1]["tokens_per_s"] / fp32_auto["tokens_per_s"]
    rows[-1]["vs_bf16_batch1"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
    best = max((row for row in rows[1:] if "bf16" not in row["side"]), key=lambda r: r["tokens_per_s"])
    return {"model": loaded.spec, "run": loaded.spec, "weights": weights, "rows": rows, "best": best["side"],
            "best_ratio": best["vs_batch1"],
            "auto": {"slots": choice.slots, "rows_per_s": choice.rows_per_s, "reason": choice.reason,
                     "measured_now": choice.measured}}


def run(loaded, prompts: int = 128, tokens: int = 32, slots=(8, 32, 64), batch1_prompts: int = 16,
        second: str = QWEN, second_batch1_prompts: int = 8, second_small_prompts: int = 32) -> dict:
    import os

    from benchmarks.common import load

    roofline = matmul_roofline()
    models = [measure(loaded, prompts, tokens, slots, batch1_prompts, roofline["flops_per_s"])]
    models[0]["target"] = target(f"{models[0]['model']}: best slot count / batch 1 tokens/s",
                                 models[0]["best_ratio"], ">=", TARGETS["first"])
    skipped = None
    path = os.path.expanduser(second) if second else ""
    if path and os.path.isfile(path):
        other = load(path)
        result = measure(other, prompts, tokens, slots, second_batch1_prompts, roofline["flops_per_s"],
                         second_small_prompts)
        result["model"] = result["run"] = os.path.basename(path)
        result["target"] = target(f"{result['model']}: best slot count / batch 1 tokens/s", result["best_ratio"],
                                  ">=", TARGETS["second"])
        models.append(result)
        del other
    elif second:
        skipped = f"{second} is absent (`bash ../shared/models/qwen2.5-coder-0.5b.sh` assembles it): not measured"
    return {"name": NAME, "params": dict(prompts=prompts, tokens=tokens, slots=list(slots),
                                         batch1_prompts=batch1_prompts, second=second,
                                         second_batch1_prompts=second_batch1_prompts,
                                         second_small_prompts=second_small_prompts),
            "roofline": roofline, "models": models, "skipped": skipped}


def render(result: dict) -> list[str]:
    p, roof = result["params"], result["roofline"]
    lines = [f"{p['prompts']} harmful:test prompts (chat template, longest first), at most {p['tokens']} new tokens "
             f"each, greedy, float32, one run per side. Roofline: a {roof['size']}x{roof['size']} fp32 matmul at "
             f"{roof['threads']} thread(s) reaches {fmt_flops(roof['flops_per_s'])}.", ""]
    for model in result["models"]:
        auto = model["auto"]
        rates = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(auto["rows_per_s"].items(), key=lambda kv: int(kv[0])))
        lines += [f"**`{model['model']}`** ({model['weights']['body'] / 1e6:.1f}M body + "
                  f"{model['weights']['head'] / 1e6:.1f}M head weights). `auto` chose "
                  f"{auto['slots']} slots (decoding row-steps/s measured per slot count: {rates}; stopped: "
                  f"{auto['reason']}). Sides on fewer prompts take them spread over all lengths.", "",
                  "| side | prompts | seconds | tokens | tokens/s | vs batch 1 | achieved FLOP/s | share of roofline |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            share = "n/a (bf16)" if row.get("roofline_share") is None else f"{row['roofline_share']:.0%}"
            lines.append(f"| {row['side']} | {row['prompts']} | {row['seconds']:.1f} | {row['tokens']} | "
                         f"{row['tokens_per_s']:.1f} | "
                         f"{row['vs_batch1']:.2f}x | {fmt_flops(row['flops_per_s'])} | {share} |")
        check = model["target"]
        verdict = "met" if check["met"] else "**missed**"
        lines += ["", f"Best: {model['best']}, {model['best_ratio']:.2f}x batch 1 (target >= {check['limit']:g}x: "
                  f"{verdict})."]
        cast = next((row for row in model["rows"] if "vs_fp32_same_slots" in row), None)
        if cast is not None:  # results of runs before the bf16 side have none
            lines += [f"With the weights cast to bf16 for generation (`eval.generation_dtype: bf16`): "
                      f"{cast['vs_fp32_same_slots']:.2f}x the fp32 side at the same slot count"
                      + (f", {cast['vs_bf16_batch1']:.2f}x batch 1 in bf16." if "vs_bf16_batch1" in cast else ".")]
        lines += [""]
    if result.get("skipped"):
        lines += [result["skipped"], ""]
    return lines[:-1] if lines and lines[-1] == "" else lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
