"""Per-token cost of generation under the runtime monitor vs plain `model.generate`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_monitor.py [--model SPEC] [--batch 8] [--tokens 32] [--threads 1]

Every run generates exactly --tokens new tokens per row (min_new_tokens), greedy, from the same
left-padded batch of harmful calibration prompts. The monitor's threshold is set to +inf so it never
acts and the token sequences are identical: what is timed is the monitoring itself (hooks, one dot
product per row and layer, on-device flag updates). Runs are interleaved (plain, then each monitor
variant, per repeat) so machine load drifts hit all of them alike; the table shows medians.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ssah.data import load_dataset  # noqa: E402
from ssah.data.chat import encode_prompts  # noqa: E402
from ssah.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from ssah.probe.directions import compute_directions  # noqa: E402
from ssah.probe.hidden import last_token_states  # noqa: E402
from ssah.probe.monitor import Monitor, MonitorConfig, MonitorState  # noqa: E402


def _time_generate(model, inputs: dict, tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if out.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared machine); default: torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    harmful = load_dataset("harmful:calibration").prompts()
    benign = load_dataset("benign:calibration").prompts()
    # Directions from 16 + 16 calibration prompts: enough for a realistic monitor; cost does not depend on them.
    states_h, states_b = last_token_states(model, tok, harmful[:16]), last_token_states(model, tok, benign[:16])
    depth = states_h.shape[1]
    directions = compute_directions(states_h, states_b, list(range(depth)))
    middle = depth // 2
    variants = {
        "monitor, 1 layer, stop": MonitorConfig(layers=[middle], threshold=math.inf),
        "monitor, 1 layer, steer": MonitorConfig(layers=[middle], threshold=math.inf, action="steer"),
        "monitor, 3 layers, stop": MonitorConfig(layers=[middle - 4, middle, middle + 4], threshold=math.inf),
    }
    states = {name: MonitorState.from_directions(directions, config, depth) for name, config in variants.items()}

    device = loaded.device
    inputs = {k: v.to(device) for k, v in encode_prompts(tok, harmful[16:16 + args.batch]).items()}
    times: dict[str, list[float]] = {"plain generate": []}
    times.update({name: [] for name in variants})

    def run(name: str) -> float:
        if name == "plain generate":
            return _time_generate(model, inputs, args.tokens)
        with Monitor(model, variants[name], states[name]) as mon:
            elapsed = _time_generate(model, inputs, args.tokens)
        assert not any(mon.flags)
        return elapsed

    for name in times:  # warm-up: first calls pay one-off allocation and dispatch costs
        run(name)
    for _ in range(args.repeats):
        for name in times:
            times[name].append(run(name))

    base = statistics.median(times["plain generate"])
    print(f"model {args.model} on {device} ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"{args.tokens} new tokens, median of {args.repeats}\n")
    print("| run | median s / call | ms / token step | vs plain |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {1000 * median / args.tokens:.2f} | {median / base:.3f}x |")


if __name__ == "__main__":
    main()
