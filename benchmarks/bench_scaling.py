"""How `variance` scoring time scales with calibration tokens, model width and model depth.

    python benchmarks/bench_scaling.py                     # built-in model for tokens, tiny Llamas for shape
    python benchmarks/bench_scaling.py --quick

Tokens: the built-in model scores the first N records of harmful:calibration (with refusals) for
several N; sizes alternate within each repeat; a least-squares line time = a + b * tokens and its R^2
are reported. Width and depth: Llama models built from `transformers.LlamaConfig` with random weights
(tiny byte vocabulary, so the LM head is negligible), scored on the same synthetic batches; width
grows hidden size (intermediate = 8/3 hidden, head dim 64) at fixed depth, depth grows the layer count
at fixed width. Per-token work grows with the non-embedding parameter count, so time is fitted
against it (width) and against the layer count (depth). A PNG plot is written next to the JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import linear_fit, script_main, summary, synthetic_batches, target, timed  # noqa: E402

NAME = "scaling"
TITLE = "Scaling of `variance` scoring with calibration tokens, width and depth"
PARAMS = {
    "full": dict(samples=(8, 16, 32, 64), widths=(128, 256, 384, 512, 768), depths=(2, 4, 8, 12, 16),
                 shape_batches=(4, 8, 128), repeats=3),
    "quick": dict(samples=(4, 8, 12), widths=(64, 128), depths=(2, 4), shape_batches=(2, 4, 32), repeats=1),
}
R2_TARGET = 0.95  # the harness's own bar for "linear"
PLOT_FILE = "scaling.png"
PROSE = """\
The activation scorers do a fixed amount of work per token and per hooked channel (one float64
update of running statistics per B module), on top of a truncated forward pass, so time should be
linear in tokens and in depth, and linear in the non-embedding parameter count as width grows."""


def llama(hidden: int, layers: int, vocab: int = 256):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ssah.units.layout import UnitLayout

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(8 * hidden) // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, UnitLayout.from_model(model)


def _non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def _shape_series(key: str, sizes, fixed: int, batches, repeats: int) -> list[dict]:
    from ssah.units.scores import score_batches

    models = {size: llama(size, fixed) if key == "hidden" else llama(fixed, size) for size in sizes}
    for model, layout in models.values():  # warm-up
        score_batches(model, layout, batches[:1], "variance", None, progress=False)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(repeats):
        for size, (model, layout) in models.items():
            times[size].append(timed(lambda m=model, lay=layout: score_batches(m, lay, batches, "variance", None,
                                                                                progress=False)))
    return [{key: size, "layers" if key == "hidden" else "hidden": fixed,
             "non_embedding_params": _non_embedding_params(models[size][0]), "seconds": summary(times[size])}
            for size in sizes]


def run(loaded, samples=(8, 16, 32, 64), widths=(128, 256, 384, 512), depths=(2, 4, 8, 16),
        shape_batches=(4, 8, 128), repeats: int = 3, out_dir: Path | None = None) -> dict:
    from ssah.data import load_dataset
    from ssah.units.scores import calibration_pairs, make_batches, score_batches

    pairs = calibration_pairs(loaded, load_dataset("harmful:calibration").take(max(samples)), responses="refusals",
                              seed=0, progress=False)
    batch_sets = {n: make_batches(loaded.tokenizer, pairs[:n], 8, 256) for n in samples}
    score_batches(loaded.model, loaded.layout, batch_sets[samples[0]], "variance", None, progress=False)  # warm-up
    times: dict[int, list[float]] = {n: [] for n in samples}
    for _ in range(repeats):
        for n, batches in batch_sets.items():
            times[n].append(timed(lambda b=batches: score_batches(loaded.model, loaded.layout, b, "variance", None,
                                                                  progress=False)))
    token_rows = [{"records": n, "tokens": sum(int(b["attention_mask"].sum()) for b in batch_sets[n]),
                   "seconds": summary(times[n])} for n in samples]

    count, size, length = shape_batches
    batches = synthetic_batches(256, count, size, length)
    width_rows = _shape_series("hidden", widths, 4, batches, repeats)
    depth_rows = _shape_series("layers", depths, 256, batches, repeats)

    fits = {
        "tokens": linear_fit([r["tokens"] for r in token_rows], [r["seconds"]["median"] for r in token_rows]),
        "width": linear_fit([r["non_embedding_params"] for r in width_rows],
                            [r["seconds"]["median"] for r in width_rows]),
        "depth": linear_fit([r["layers"] for r in depth_rows], [r["seconds"]["median"] for r in depth_rows]),
    }
    targets = {key: target(f"R^2 of time vs {key}", fit["r2"], ">=", R2_TARGET, unit="") for key, fit in fits.items()}
    result = {"name": NAME, "model": loaded.spec,
              "params": dict(samples=list(samples), widths=list(widths), depths=list(depths),
                             shape_batches=list(shape_batches), repeats=repeats),
              "tokens": token_rows, "width": width_rows, "depth": depth_rows, "fits": fits, "targets": targets}
    if out_dir is not None:
        result["plot"] = plot(result, Path(out_dir) / PLOT_FILE).name
    return result


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (key, rows, x field, axis label, display scale of x)
    series = [("tokens", result["tokens"], "tokens", f"calibration tokens ({result['model']})", 1),
              ("width", result["width"], "non_embedding_params",
               "non-embedding parameters, millions (hidden size grows)", 1e-6),
              ("depth", result["depth"], "layers", "layers (hidden 256)", 1)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, rows, x_key, label, scale) in zip(axes, series):
        xs = [r[x_key] for r in rows]
        med = [r["seconds"]["median"] for r in rows]
        err = [[m - r["seconds"]["min"] for m, r in zip(med, rows)],
               [r["seconds"]["max"] - m for m, r in zip(med, rows)]]
        ax.errorbar([x * scale for x in xs], med, yerr=err, fmt="o", capsize=3, label="median (min-max)")
        fit = result["fits"][key]
        ends = [min(xs), max(xs)]
        ax.plot([x * scale for x in ends], [fit["intercept"] + fit["slope"] * x for x in ends], "--",
                label=f"linear fit, R² = {fit['r2']:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("variance scoring (s)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("ssah variance scorer: time vs calibration tokens, width and depth")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(result: dict) -> list[str]:
    p = result["params"]
    count, size, length = p["shape_batches"]

    def cell(s):
        return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    def verdict(key):
        t = result["targets"][key]
        return f"R^2 = {result['fits'][key]['r2']:.4f}: {'met' if t['met'] else '**missed**'} (>= {t['limit']:g})"

    lines = [f"Median of {p['repeats']} (min-max) seconds of `variance` scoring, sizes alternating within each repeat.",
             "", f"Tokens (`{result['model']}`, harmful:calibration + refusals, batch 8); "
                 f"linear fit {verdict('tokens')}, "
             f"{1e3 * result['fits']['tokens']['slope']:.3f} s per 1,000 tokens:", "",
             "| records | tokens | seconds |", "|---|---|---|"]
    lines += [f"| {r['records']} | {r['tokens']:,} | {cell(r['seconds'])} |" for r in result["tokens"]]
    lines += ["", f"Width (random Llama, 4 layers, {count} synthetic batches of {size} x {length} tokens); time vs "
              f"non-embedding parameters, linear fit {verdict('width')}:", "",
              "| hidden size | non-embedding parameters | seconds |", "|---|---|---|"]
    lines += [f"| {r['hidden']} | {r['non_embedding_params']:,} | {cell(r['seconds'])} |" for r in result["width"]]
    lines += ["", f"Depth (random Llama, hidden 256, same batches); time vs layers, linear fit {verdict('depth')}:", "",
              "| layers | non-embedding parameters | seconds |", "|---|---|---|"]
    lines += [f"| {r['layers']} | {r['non_embedding_params']:,} | {cell(r['seconds'])} |" for r in result["depth"]]
    if result.get("plot"):
        link = result.get("plot_link", result["plot"])
        lines += ["", f"![variance scoring time vs tokens, width and depth]({link})"]
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
