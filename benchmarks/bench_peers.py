"""ssah's unit scores against two peer methods, reimplemented from the papers' descriptions.

    python benchmarks/bench_peers.py                      # built-in model, 16 harmful prompts + refusals
    python benchmarks/bench_peers.py --model tiny:llama --samples 8

(a) Per-layer SNIP attribution as described by Wei et al. 2024 ("Assessing the brittleness of safety
    alignment via pruning and low-rank modifications"): for each transformer layer separately, one
    forward and one backward pass over the calibration set with gradients enabled only on that
    layer's linear weights, keeping the per-weight score |W * dL/dW| (loss: next-token NLL of the
    response tokens). Autograd stops below the layer, so deeper layers cost less backward work.
(b) A Wanda-style per-weight score dump: |W_ij| * ||X_j||_2 for every weight of every linear layer of
    the transformer blocks, stored as a safetensors file.

Ours: the `variance` scorer (one truncated no-grad forward) and the one-backward `snip` scorer (all
layers at once, gradients reduced to per-unit sums as they arrive), both through `score_batches` on
the same batches, stored as a unit-level `scores.safetensors`.

Timing alternates: each repeat runs ours (variance, snip) and then (a) on every `repeats`-th layer, so
after all repeats every layer of (a) was timed exactly once, interleaved with our repeats.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_seconds, fmt_target, script_main, summary, target, timed, timed_call  # noqa: E402

NAME = "peers"
TITLE = "Against peer methods: per-layer SNIP (Wei et al. 2024) and a Wanda-style per-weight dump"
PARAMS = {
    "full": dict(samples=16, repeats=3, batch_size=8, max_length=256, snip_layers=None),
    "quick": dict(samples=8, repeats=1, batch_size=8, max_length=256, snip_layers=None),
}
TIME_TARGET, BYTES_TARGET = 10.0, 1000.0
PROSE = """\
Both peers are written here from the papers' descriptions (no code copied). (a) is timed the way it
is meant to run: one separate forward and backward per layer, gradients only on that layer's linear
weights, the per-weight scores kept; our `snip` gets the same |W * dL/dW| for all layers from one
backward per batch, because each parameter's gradient is reduced to per-unit sums as soon as it is
complete. (b) stores one float per weight of every linear layer of the blocks (the LM head and the
embeddings excluded); ours stores one float32 per unit (accumulated in float64, rounded once)."""


def _layers(model, spec_layers: str):
    return model.get_submodule(spec_layers)


def _response_loss(model, batch):
    import torch.nn.functional as F

    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    # Position t predicts token t + 1: the loss covers the response tokens after the first position.
    mask = batch["response_mask"][:, 1:].to(device)
    return F.cross_entropy(logits[:, :-1][mask].float(), ids[:, 1:][mask])


def per_layer_snip(model, layers_path: str, batches, layer: int) -> dict:
    """Peer (a) for one layer: per-weight |W * dL/dW| of that layer's linear weights, summed over batches."""
    import torch
    from torch import nn

    block = _layers(model, layers_path)[layer]
    weights = {name: m.weight for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    scores = {name: torch.zeros_like(w) for name, w in weights.items()}
    try:
        for batch in batches:
            _response_loss(model, batch).backward()
            with torch.no_grad():
                for name, w in weights.items():
                    scores[name] += (w * w.grad).abs()
                    w.grad = None
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return scores


def wanda_dump(model, layers_path: str, batches, path: Path) -> int:
    """Peer (b): |W_ij| * ||X_j||_2 for every linear weight of the blocks, written to `path`; returns bytes."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    linears = {name: m for name, m in _layers(model, layers_path).named_modules() if isinstance(m, nn.Linear)}
    sq_norms = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    state = {"mask": None}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[state["mask"]]
            sq_norms[name] += x.double().square().sum(0).cpu()
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch["attention_mask"].reshape(-1).bool().to(device)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        tensors = {f"{layers_path}.{name}.weight": (m.weight.abs() * sq_norms[name].sqrt().to(m.weight)).contiguous()
                   for name, m in linears.items()}
    save_file(tensors, str(path))
    return path.stat().st_size


def run(loaded, samples: int = 16, repeats: int = 3, batch_size: int = 8, max_length: int = 256,
        snip_layers: int | None = None) -> dict:
    """`snip_layers` None times (a) on every layer; an int times that many evenly spaced layers and
    extrapolates linearly to all of them (labelled as such in the result)."""
    from ssah.data import load_dataset
    from ssah.models.adapters import adapter_for
    from ssah.units.scores import Scores, calibration_pairs, make_batches, score_batches

    model, layout = loaded.model, loaded.layout
    layers_path = adapter_for(model.config.model_type).layers
    pairs = calibration_pairs(loaded, load_dataset("harmful:calibration").take(samples), responses="refusals",
                              seed=0, progress=False)
    batches = make_batches(loaded.tokenizer, pairs, batch_size, max_length)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    num_layers = layout.num_layers
    if snip_layers is None or snip_layers >= num_layers:
        timed_layers = list(range(num_layers))
    else:  # evenly spaced from first to last, so the backward depth is sampled across the stack
        timed_layers = sorted({round(i * (num_layers - 1) / max(1, snip_layers - 1)) for i in range(snip_layers)})

    score_batches(model, layout, batches[:1], "variance", None, progress=False)  # warm-up
    ours: dict[str, list[float]] = {"variance": [], "snip": []}
    layer_times: dict[int, float] = {}
    variance_values = None
    for r in range(repeats):
        for name in ours:
            seconds, (values, _) = timed_call(lambda name=name: score_batches(model, layout, batches, name, None,
                                                                              progress=False))
            ours[name].append(seconds)
            if name == "variance":
                variance_values = values
        for layer in timed_layers[r::repeats]:
            layer_times[layer] = timed(lambda layer=layer: per_layer_snip(model, layers_path, batches, layer))
    model.zero_grad(set_to_none=True)

    measured = sum(layer_times.values())
    total_a = measured * num_layers / len(timed_layers)
    extrapolated = len(timed_layers) < num_layers
    with tempfile.TemporaryDirectory(prefix="ssah-bench-") as tmp:
        ours_dir = Scores(variance_values, {"format": "ssah.scores/1", "scorer": "variance"}).save(Path(tmp) / "ours")
        ours_bytes = (ours_dir / "scores.safetensors").stat().st_size
        wanda_s, wanda_bytes = timed_call(lambda: wanda_dump(model, layers_path, batches,
                                                             Path(tmp) / "wanda_scores.safetensors"))

    rows = []
    for name, values_s in ours.items():
        s = summary(values_s)
        ratio = {"median": total_a / s["median"], "min": total_a / s["max"], "max": total_a / s["min"]}
        rows.append({"ours": name, "ours_s": s, "ratio": ratio,
                     "target": target(f"(a) per-layer SNIP / ours {name}", ratio["median"], ">=", TIME_TARGET)})
    weights = sum(m.numel() for n, m in model.named_parameters() if n.startswith(layers_path) and m.dim() == 2)
    return {"name": NAME, "model": loaded.spec, "records": len(pairs), "tokens": tokens, "num_layers": num_layers,
            "params": dict(samples=samples, repeats=repeats, batch_size=batch_size, max_length=max_length,
                           snip_layers=snip_layers),
            "per_layer_snip": {"timed_layers": timed_layers,
                               "layer_s": {str(k): v for k, v in sorted(layer_times.items())},
                               "per_layer": summary(list(layer_times.values())), "total_s": total_a,
                               "extrapolated": extrapolated},
            "time_rows": rows,
            "storage": {"ours_bytes": ours_bytes, "units": layout.total_units, "wanda_bytes": wanda_bytes,
                        "weights": weights, "wanda_s": wanda_s, "ratio": wanda_bytes / ours_bytes,
                        "target": target("(b) Wanda dump bytes / ours", wanda_bytes / ours_bytes, ">=", BYTES_TARGET)}}


def render(result: dict) -> list[str]:
    p, a, st = result["params"], result["per_layer_snip"], result["storage"]
    first, last = (a["layer_s"][str(layer)] for layer in (a["timed_layers"][0], a["timed_layers"][-1]))
    how = (f"timed on {len(a['timed_layers'])} of {result['num_layers']} layers (evenly spaced) and **extrapolated** "
           f"linearly to all {result['num_layers']}" if a["extrapolated"]
           else f"every one of the {result['num_layers']} layers timed once")
    lines = [f"`{result['model']}`, fp32, {result['records']} harmful:calibration prompts with built-in refusals "
             f"({result['tokens']:,} tokens), batch {p['batch_size']}. Ours: median of {p['repeats']} (min-max). "
             f"(a): {how}, interleaved with our repeats; its per-layer time is "
             f"{fmt_seconds(a['per_layer'])} (first timed layer {first:.2f} s, last {last:.2f} s: deeper layers need a "
             "shorter backward). The ratio's range is (a)'s total over our slowest and fastest repeat.",
             "", "| ours | our time | (a) per-layer SNIP, all layers | (a) / ours | target |", "|---|---|---|---|---|"]
    for row in result["time_rows"]:
        r = row["ratio"]
        lines.append(f"| `{row['ours']}` | {fmt_seconds(row['ours_s'])} | {a['total_s']:.1f} s"
                     f"{' (extrapolated)' if a['extrapolated'] else ''} | "
                     f"{r['median']:.1f}x ({r['min']:.1f}-{r['max']:.1f})"
                     f" | {fmt_target(row['target'])} |")
    lines += ["", "| stored scores | entries | bytes on disk | ratio | target |", "|---|---|---|---|---|",
              f"| ours: `scores.safetensors` (float32 per unit) | {st['units']:,} units | {st['ours_bytes']:,} | 1 | |",
              f"| (b) Wanda-style per-weight dump (float per weight; written in {st['wanda_s']:.1f} s) | "
              f"{st['weights']:,} weights | {st['wanda_bytes']:,} | {st['ratio']:.0f}x | {fmt_target(st['target'])} |"]
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
