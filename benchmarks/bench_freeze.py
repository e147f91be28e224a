"""Frozen-unit fine-tuning step vs a plain step: wall time, the memory the freezer adds, and a profile.

    python benchmarks/bench_freeze.py                         # built-in model, batch 4 x 128 tokens
    python benchmarks/bench_freeze.py --model tiny:llama --steps 5

Each repeat runs `--steps` AdamW steps (weight decay 0.1, clipping) plainly, then the same steps with
a `UnitFreezer` (gradient hooks + restore after each step), alternating so a shared machine's drift
stays out of the ratio; medians and spreads are reported. Memory: a training step holds weights,
gradients and two AdamW moments (4x the weights in fp32); the freezer adds one copy of the frozen
slices, reported both in bytes and as a share of that footprint (on CUDA the peak allocated memory
is measured too). Masks: freeze setting (i) of the paper (about 7.5% of units) and setting (ii)
(SCU + all CU, ~85%).

The profile (setting (ii)) runs torch.profiler over plain and frozen steps (alternating), picks out
the freezer's own operators -- the gradient hooks' out-of-place `index_fill` (a clone of each hooked
gradient, then the fill) and `restore_()`'s `index_copy_` -- and also times those two parts alone.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_ratio, fmt_seconds, fmt_target, paired_ratios, script_main, summary, target, timed  # noqa: E402

NAME = "freeze"
TITLE = "Frozen-unit fine-tuning step vs a plain step"
PARAMS = {
    "full": dict(batch_size=4, length=128, steps=2, repeats=3, profile=True),
    "quick": dict(batch_size=2, length=32, steps=1, repeats=1, profile=True),
}
TIME_TARGET, MEMORY_TARGET = 1.05, 1.05
SETTINGS = (("setting (i): ~7.5% of units", 0.075), ("setting (ii): ~85% of units", 0.85))
# masked: AdamW's default in ssah (no copy, decay taken over); copy: the any-optimizer fallback
MODES = ("masked", "copy")
PROSE = """\
Memory is the accounting of what a step holds (weights + gradients + two AdamW moments, 4x the
weights in fp32) against the same plus the freezer's copy of the frozen entries; on CUDA the GPU
script (below) measures peak allocated memory instead.

Two freezer modes. `masked` (what ssah uses with torch's Adam, AdamW and SGD) keeps no copy: the
gradient hooks zero the frozen entries' gradients, so their Adam moments stay exactly zero and
their update is exactly zero, and the freezer applies AdamW's decoupled decay itself (the
`ssah::freezer_decay` rows: a multiply by 1 - lr * wd that is 1 on frozen positions), replacing
the decay AdamW would have done. Its memory ratio is 1.000x at any frozen share. `copy`, the
fallback for any other optimizer, writes a copy of the frozen entries back after every step; at
~85% of the units that copy is 290 MiB here, which misses the memory target by construction.

What is left of the time at ~85%: the hooks' out-of-place `index_fill` (a clone of every hooked
gradient, then the fill). AdamW's `sqrt`, `add` and `fill_` also grow in the frozen step although
the freezer never calls them; the likeliest reason is allocator pressure from those clones, not
confirmed. Masking in place where the gradient is not shared would remove the clones."""


def _mask(layout, share: float, seed: int):
    from ssah.interventions.masks import random_mask

    return random_mask(layout, share, seed)


def _one_step(model, batch, params, opt) -> None:
    import torch

    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _optimizer(model, freezer=None):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    if freezer is not None:
        freezer.wrap_optimizer(opt)
    return params, opt


def _steps(model, batch, steps: int, freezer=None) -> float:
    """Seconds per step, after one untimed step that allocates the optimizer state."""
    params, opt = _optimizer(model, freezer)
    model.train()
    _one_step(model, batch, params, opt)
    return timed(lambda: [_one_step(model, batch, params, opt) for _ in range(steps)]) / steps


def _batch(model, batch_size: int, length: int):
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 1, (batch_size, length), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _freezer_time(prof) -> dict[str, float]:
    """Self CPU seconds of the operators the freezer runs, found through each event's parent chain:
    the gradient hooks run `index_fill` (a clone, then `index_fill_`), `restore_` runs `index_copy_`
    (copy mode), the decay the freezer takes over from AdamW runs under `ssah::freezer_decay`
    (masked mode); the model and AdamW call none of them."""
    parts: dict[str, float] = {}
    for event in prof.events():
        node, part = event, None
        while node is not None and part is None:
            part = {"aten::index_fill": "hooks", "aten::index_copy_": "restore",
                    "ssah::freezer_decay": "decay"}.get(node.name)
            node = node.cpu_parent
        if part:
            key = f"{part}: {event.name}"
            parts[key] = parts.get(key, 0.0) + event.self_cpu_time_total / 1e6
    return parts


def profile_freezer(loaded, batch, state, share: float, repeats: int = 2, top: int = 6) -> dict:
    """Where the frozen step's extra time goes: torch.profiler over plain and frozen steps (alternating),
    the freezer's operators picked out by their parents, and the freezer's two parts timed alone."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ssah.interventions.freeze import UnitFreezer

    model, layout = loaded.model, loaded.layout
    mask = _mask(layout, share, seed=1)

    def profiled_step(frozen: bool) -> tuple[dict, dict, int]:
        model.load_state_dict(state)
        freezer = UnitFreezer(model, layout, mask) if frozen else None  # made on the starting weights
        params, opt = _optimizer(model, freezer)
        model.train()
        _one_step(model, batch, params, opt)  # optimizer state allocated outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _one_step(model, batch, params, opt)
        copy_bytes = 0
        if freezer is not None:
            copy_bytes = freezer.copy_bytes()
            freezer.remove()
        return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}, _freezer_time(prof), copy_bytes

    ops = {"plain": {}, "frozen": {}}
    freezer_parts: dict[str, float] = {}
    for _ in range(repeats):
        frozen_ops, parts, freezer_copy_bytes = profiled_step(True)
        plain_ops, _, _ = profiled_step(False)
        for side, found in (("frozen", frozen_ops), ("plain", plain_ops)):
            for name, seconds in found.items():
                ops[side][name] = ops[side].get(name, 0.0) + seconds / repeats
        for name, seconds in parts.items():
            freezer_parts[name] = freezer_parts.get(name, 0.0) + seconds / repeats

    # The freezer's two parts on their own, outside a training step.
    model.load_state_dict(state)
    freezer = UnitFreezer(model, layout, mask, copy=True)  # restore_ has work only in copy mode
    _optimizer(model, freezer)
    slices = freezer._slices
    restore_alone = statistics.median(timed(freezer.restore_) for _ in range(5))
    grads = [torch.ones_like(s.param) for s in slices]
    hooks_alone = statistics.median(timed(lambda: [g.index_fill(s.dim, s.positions, 0) for s, g in zip(slices, grads)])
                                    for _ in range(5))
    freezer.remove()

    names = set(ops["plain"]) | set(ops["frozen"])
    grown = sorted(((n, ops["frozen"].get(n, 0.0) - ops["plain"].get(n, 0.0), ops["frozen"].get(n, 0.0))
                    for n in names),
                   key=lambda item: -item[1])
    return {"share": share, "repeats": repeats, "hooked_parameters": len(slices),
            "frozen_copy_bytes": freezer_copy_bytes, "mode": "masked",
            "plain_step_s": sum(ops["plain"].values()), "frozen_step_s": sum(ops["frozen"].values()),
            "freezer_ops_s": dict(sorted(freezer_parts.items(), key=lambda item: -item[1])),
            "restore_alone_s": restore_alone, "hooks_alone_s": hooks_alone,
            "top_grown_ops": [{"op": n, "extra_s": extra, "frozen_s": total} for n, extra, total in grown[:top]]}


def run(loaded, batch_size: int = 4, length: int = 128, steps: int = 2, repeats: int = 3,
        profile: bool = True) -> dict:
    from ssah.interventions.freeze import UnitFreezer

    model, layout = loaded.model, loaded.layout
    batch = _batch(model, batch_size, length)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    footprint = 4 * weights  # weights + grads + 2 AdamW moments

    rows = []
    for label, share in SETTINGS:
        mask = _mask(layout, share, seed=1)
        for mode in MODES:
            plain_times, frozen_times, extra = [], [], 0
            for _ in range(repeats):
                model.load_state_dict(state)
                plain_times.append(_steps(model, batch, steps))
                model.load_state_dict(state)
                freezer = UnitFreezer(model, layout, mask, copy=mode == "copy")
                frozen_times.append(_steps(model, batch, steps, freezer))
                assert freezer.mode == mode and freezer.check()["max_abs_change_frozen"] == 0.0
                extra = freezer.copy_bytes()  # taken when the freezer attaches to the optimizer
                freezer.remove()
            ratio = paired_ratios(frozen_times, plain_times)
            memory = (footprint + extra) / footprint
            rows.append({"setting": label, "mode": mode, "share": share, "plain_s": summary(plain_times),
                         "frozen_s": summary(frozen_times), "ratio": ratio, "frozen_copy_bytes": extra,
                         "memory_ratio": memory,
                         "targets": [target(f"time, {mode}", ratio["median"], "<=", TIME_TARGET),
                                     target(f"memory, {mode}", memory, "<=", MEMORY_TARGET)]})
    model.load_state_dict(state)
    result = {"name": NAME, "model": loaded.spec, "footprint_bytes": footprint,
              "params": dict(batch_size=batch_size, length=length, steps=steps, repeats=repeats, profile=profile),
              "rows": rows}
    if profile:
        result["profile"] = profile_freezer(loaded, batch, state, SETTINGS[1][1])
        model.load_state_dict(state)
    model.eval()
    return result


def render(result: dict) -> list[str]:
    p = result["params"]
    lines = [f"`{result['model']}`, fp32, batch {p['batch_size']} x {p['length']} tokens, AdamW with weight decay "
             f"and clipping, {p['steps']} timed steps per side per repeat, median of {p['repeats']} (min-max); "
             "ratios are per repeat, plain and frozen back to back.", "",
             "| frozen units | freezer mode | plain step | frozen step | time ratio | time target | frozen copy "
             "| memory ratio | memory target |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        time_check, memory_check = row["targets"]
        lines.append(f"| {row['setting']} | {row.get('mode', 'copy')} | {fmt_seconds(row['plain_s'])} | "
                     f"{fmt_seconds(row['frozen_s'])} | "
                     f"{fmt_ratio(row['ratio'])} | {fmt_target(time_check)} | "
                     f"{row['frozen_copy_bytes'] / 2**20:.1f} MiB"
                     f" | {row['memory_ratio']:.3f}x | {fmt_target(memory_check)} |")
    prof = result.get("profile")
    if prof:
        growth = prof["frozen_step_s"] - prof["plain_step_s"]
        freezer_total = sum(prof["freezer_ops_s"].values())
        lines += ["", f"**Profile of setting (ii)** (torch.profiler, self CPU time per step, mean of {prof['repeats']} "
                  f"profiled steps per side, plain and frozen alternating; {prof['hooked_parameters']} hooked "
                  f"parameters, {prof.get('mode', 'copy')} mode, {prof['frozen_copy_bytes'] / 2**20:.0f} MiB copied): "
                  "a profiled step "
                  f"takes {prof['plain_step_s']:.2f} s plain and {prof['frozen_step_s']:.2f} s frozen "
                  f"({growth:+.2f} s). The freezer's own operators, found through their parent operator:", "",
                  "| freezer part: operator | seconds per step | share of the growth |", "|---|---|---|"]
        parts = list(prof["freezer_ops_s"].items())
        shown, rest = parts[:4], sum(seconds for _, seconds in parts[4:])  # the small remainder in one row
        for name, seconds in shown + ([("other freezer operators", rest)] if rest else []):
            share = f"{seconds / growth:.0%}" if growth > 0 else "-"
            lines.append(f"| {name} | {seconds:.3f} | {share} |")
        lines += [f"| all freezer operators | {freezer_total:.3f} | "
                  f"{f'{freezer_total / growth:.0%}' if growth > 0 else '-'} |", "",
                  "Timed alone, outside a step (median of 5): copy mode's `restore_()` "
                  f"{prof['restore_alone_s']:.3f} s, the hooks' `index_fill` on every hooked gradient "
                  f"{prof['hooks_alone_s']:.3f} s. Operators whose self time grows most in the frozen step:", "",
                  "| operator | frozen step | growth vs plain |", "|---|---|---|"]
        for op in prof["top_grown_ops"]:
            lines.append(f"| `{op['op']}` | {op['frozen_s']:.3f} s | {op['extra_s']:+.3f} s |")
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
