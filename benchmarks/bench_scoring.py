"""Scoring cost vs a plain forward pass: wall time of `score_batches` over the same batches.

    python benchmarks/bench_scoring.py                      # built-in model, 128 safety + 128 utility pairs
    python benchmarks/bench_scoring.py --scorers variance,snip --samples 32 --model tiny:llama

For each calibration set (harmful:calibration with built-in refusals, benign:calibration with its
answers) the script builds the batches once, then alternates a plain no-grad forward pass
(`model(input_ids, attention_mask, use_cache=False)`, logits included) and each scorer over exactly
those batches, `--repeats` times in the same process, and prints the median wall times and their
ratio as a markdown table. Alternating keeps slow drifts of a shared machine out of the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _forward(model, batches) -> None:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scorers", default="variance", help="comma-separated, e.g. variance,wanda,snip")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from ssah.data import load_dataset
    from ssah.models.loading import load_model
    from ssah.units.scores import calibration_pairs, make_batches, score_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    sets = {
        "safety (harmful:calibration + refusals)": (load_dataset("harmful:calibration"), "refusals"),
        "utility (benign:calibration)": (load_dataset("benign:calibration"), "dataset"),
    }
    scorers = [name.strip() for name in args.scorers.split(",") if name.strip()]
    rows = []
    for label, (dataset, responses) in sets.items():
        dataset = dataset.take(args.samples)
        pairs = calibration_pairs(loaded, dataset, responses=responses, seed=0)
        batches = make_batches(loaded.tokenizer, pairs, args.batch_size, args.max_length)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        _forward(loaded.model, batches[:1])  # warm-up: first-call allocations and kernel selection
        times: dict[str, list[float]] = {"forward": [], **{name: [] for name in scorers}}
        for _ in range(args.repeats):
            times["forward"].append(_timed(lambda: _forward(loaded.model, batches)))
            for name in scorers:
                times[name].append(_timed(lambda: score_batches(loaded.model, loaded.layout, batches, name,
                                                                None, progress=False)))
        forward = statistics.median(times["forward"])
        for name in scorers:
            score = statistics.median(times[name])
            rows.append((label, len(dataset), tokens, name, forward, score, score / forward))

    device = f"{loaded.device}" + (f", {torch.get_num_threads()} threads" if loaded.device.type == "cpu" else "")
    print(f"model {args.model} ({loaded.fingerprint}), {device}, dtype {next(loaded.model.parameters()).dtype}, "
          f"batch size {args.batch_size}, max length {args.max_length}, median of {args.repeats}")
    print()
    print("| data | records | tokens | scorer | forward (s) | scoring (s) | scoring / forward |")
    print("|---|---|---|---|---|---|---|")
    for label, records, tokens, name, forward, score, ratio in rows:
        print(f"| {label} | {records} | {tokens:,} | {name} | {forward:.2f} | {score:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
