"""Frozen-unit fine-tuning step vs a plain step: wall time and the memory the freezer adds.

    python benchmarks/bench_freeze.py                         # built-in model, batch 4 x 128 tokens
    python benchmarks/bench_freeze.py --model tiny:llama --steps 5

Each repeat runs `--steps` AdamW steps (weight decay 0.1, clipping) plainly, then the same steps with
a `UnitFreezer` (gradient hooks + restore after each step), alternating so a shared machine's drift
stays out of the ratio; medians are printed. Memory: a training step holds weights, gradients and two
AdamW moments (4x the weights in fp32); the freezer adds one copy of the frozen slices, reported
both in bytes and as a share of that footprint (on CUDA the peak allocated memory is measured too).
Masks: freeze setting (i) of the paper (about 7.5% of units) and setting (ii) (SCU + all CU, ~85%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _mask(layout, share: float, seed: int):
    import torch

    from ssah.interventions.masks import UnitMask

    gen = torch.Generator().manual_seed(seed)
    units = {k: torch.rand(layout.num_layers, layout.units_per_layer[k], generator=gen) < share for k in layout.kinds}
    return UnitMask(units, f"random {share:.3f}")


def _steps(model, batch, steps: int, freezer=None) -> float:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    if freezer is not None:
        freezer.wrap_optimizer(opt)
    model.train()
    # One untimed step allocates the optimizer state.
    for timed in (False, True):
        start = time.perf_counter()
        for _ in range(steps if timed else 1):
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from ssah.interventions.freeze import UnitFreezer
    from ssah.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="fp32")
    model, layout = loaded.model, loaded.layout
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 1, (args.batch_size, args.length), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    footprint = 4 * weights  # weights + grads + 2 AdamW moments

    rows = []
    for label, share in (("setting (i): ~7.5% of units", 0.075), ("setting (ii): ~85% of units", 0.85)):
        mask = _mask(layout, share, seed=1)
        plain_times, frozen_times, extra = [], [], 0
        for _ in range(args.repeats):
            model.load_state_dict(state)
            plain_times.append(_steps(model, batch, args.steps))
            model.load_state_dict(state)
            freezer = UnitFreezer(model, layout, mask)
            extra = sum(s.values.numel() * s.values.element_size() for s in freezer._slices)
            frozen_times.append(_steps(model, batch, args.steps, freezer))
            freezer.remove()
        plain, frozen = statistics.median(plain_times), statistics.median(frozen_times)
        rows.append((label, plain, frozen, frozen / plain, extra, (footprint + extra) / footprint))

    print(f"model {args.model}, batch {args.batch_size} x {args.length} tokens, {args.steps} AdamW steps, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}, device {device}")
    print("| frozen units | plain step s | frozen step s | time ratio | frozen copy MiB | memory ratio |")
    print("|---|---|---|---|---|---|")
    for label, plain, frozen, ratio, extra, mem in rows:
        print(f"| {label} | {plain:.3f} | {frozen:.3f} | {ratio:.3f}x | {extra / 2**20:.1f} | {mem:.3f}x |")


if __name__ == "__main__":
    main()
