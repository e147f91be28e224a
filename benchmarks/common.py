"""Helpers shared by the benchmarks: timing, summaries of repeated runs, synthetic batches, machine facts.

Every benchmark alternates its sides inside one process and reports medians with their spread;
a ratio is taken per repeat (the two sides ran back to back) and then summarised, so a shared
machine's slow drifts stay out of it.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
QUICK_MODEL = "tiny:llama"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn(), with CUDA work finished on both ends."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def timed_call(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, return value) of fn()."""
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def summary(values: Sequence[float]) -> dict:
    """Median, min, max and quartiles of repeated measurements (all values kept for the JSON)."""
    values = [float(v) for v in values]
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "n": len(ordered), "values": values}


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict:
    """Summary of per-repeat ratios: each pair was measured side by side."""
    return summary([n / d for n, d in zip(numerators, denominators)])


def target(what: str, value: float, op: str, limit: float, unit: str = "x") -> dict:
    """A target check; op is '<=' or '>='."""
    met = value <= limit if op == "<=" else value >= limit
    return {"what": what, "value": value, "op": op, "limit": limit, "unit": unit, "met": bool(met)}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least-squares y = a + b x and its R^2."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    return {"intercept": intercept, "slope": slope, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def synthetic_batches(vocab_size: int, batches: int, batch_size: int, length: int, seed: int = 0,
                      device=None) -> list[dict]:
    """Random-token batches shaped like `ssah.units.scores.make_batches` output (no padding).

    The first half of each row is the prompt, the second half the response, so scorers with a
    response token scope (snip) have tokens to work on.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, vocab_size, (batch_size, length), generator=gen)
        prompt = torch.zeros(batch_size, length, dtype=torch.bool)
        prompt[:, : length // 2] = True
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": prompt,
                 "response_mask": ~prompt}
        out.append({k: v.to(device) for k, v in batch.items()} if device is not None else batch)
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except (OSError, ValueError, AttributeError):
        pass
    return info


def fmt_seconds(stats: dict) -> str:
    """'median s (min-max)' of a summary."""
    return f"{stats['median']:.2f} s ({stats['min']:.2f}-{stats['max']:.2f})"


def fmt_ratio(stats: dict, digits: int = 2) -> str:
    return f"{stats['median']:.{digits}f}x ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def fmt_target(check: dict) -> str:
    verdict = "met" if check["met"] else "**missed**"
    return f"{verdict} ({check['op']} {check['limit']:g}{check['unit']})"


def load(spec: str, dtype: str = "fp32"):
    from ssah.models.loading import load_model

    return load_model(spec, dtype=dtype, device="cpu" if spec.startswith("tiny:") else "auto")


def script_main(module) -> None:
    """Run one benchmark module as a script: `python benchmarks/bench_NAME.py [--quick] [--model SPEC]
    [--dtype fp32] [--threads N] [--PARAM VALUE ...]`, one flag per key of its PARAMS (sequences as
    comma lists, booleans as --x/--no-x; defaults from PARAMS["full"], or PARAMS["quick"] with --quick),
    and print its table. The harness (`python -m benchmarks --only NAME`) runs the same `run`."""
    import argparse
    import inspect
    from pathlib import Path

    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--quick", action="store_true")
    is_quick = mode.parse_known_args()[0].quick
    defaults = module.PARAMS["quick" if is_quick else "full"]
    parser = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the harness's quick sizes and model as defaults")
    parser.add_argument("--model", default=QUICK_MODEL if is_quick else DEFAULT_MODEL)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, (tuple, list)):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, default=value, help="comma-separated",
                                type=lambda text, kind=kind: tuple(kind(item) for item in text.split(",") if item))
        else:
            parser.add_argument(flag, type=int if value is None else type(value), default=value)
    wants_out = "out_dir" in inspect.signature(module.run).parameters
    if wants_out:
        parser.add_argument("--out", default=str(Path(module.__file__).resolve().parent / "results"),
                            help="folder for the plot")
    args = parser.parse_args()
    set_threads(args.threads)
    params = {key: getattr(args, key) for key in defaults}
    if wants_out:
        params["out_dir"] = Path(args.out)
    print("\n".join(module.render(module.run(load(args.model, args.dtype), **params))))


def matmul_roofline(size: int = 2048, repeats: int = 3) -> dict:
    """The machine's measured fp32 matmul throughput at torch's current thread count: the best of
    `repeats` [size x size] @ [size x size] products, in FLOP/s. No model stage can run faster."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    if torch.cuda.is_available():
        a, b = a.cuda(), b.cuda()
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return {"flops_per_s": 2 * size ** 3 / best, "size": size, "threads": torch.get_num_threads()}


def weight_counts(model) -> dict:
    """Multiply-add weights per token: the body's linear layers and the LM head (embedding lookups are
    no arithmetic). A forward over n positions costs about 2 x body x n + 2 x head x (positions whose
    logits are computed) FLOPs, attention's score products aside; a training step about 3x that."""
    import torch

    head = model.get_output_embeddings()
    body = sum(module.weight.numel() for module in model.modules()
               if isinstance(module, torch.nn.Linear) and module is not head)
    # GPT-2 style Conv1D layers hold their weights as 2-D parameters too
    body += sum(module.weight.numel() for module in model.modules()
                if type(module).__name__ == "Conv1D")
    return {"body": body, "head": head.weight.numel() if head is not None else 0}


def fmt_flops(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e9:.1f} GFLOP/s"
