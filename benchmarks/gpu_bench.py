"""GPU benchmark on a 7B-shaped Llama with random weights (no internet, no downloaded weights).

    bash benchmarks/gpu.sh                              # CUDA machine: 7B shape, bf16
    SSAH_GPU_BENCH_TINY=1 bash benchmarks/gpu.sh        # tiny config; runs on the CPU too (a smoke test)

Measures, in one process with sides alternating:
- forward tokens/s (no grad, logits included) vs `variance` scoring tokens/s through ssah's
  `score_batches` on the same synthetic batches (right-shaped prompt/response masks);
- greedy generation tokens/s of ssah's evaluation engines on the same prompts: `hf` (continuous
  batching) and, where vLLM is installed, `vllm` on the model saved to a temporary folder (the Hugging
  Face model is freed first);
- a plain fine-tuning step vs a step with a `UnitFreezer` (setting (i) ~7.5% and (ii) ~85% of units
  frozen) in `masked` and `copy` mode, AdamW, gradient checkpointing: seconds per step and peak
  allocated memory.
Prints one markdown table headed by the card's name and writes benchmarks/results/gpu.json (tiny
runs: benchmarks/results/quick/gpu-tiny.json) for BENCHMARKS.md. Kept to a few steps so the whole
script stays well under 8 minutes on one recent GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, synthetic_batches, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE_7B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
SHAPE_TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=256)


def build(shape: dict, device: str, dtype):
    """A random Llama built directly on `device` (no CPU copy of 13 GiB of weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of the 7B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _peak_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def throughput(model, layout, batches, repeats: int) -> dict:
    import torch

    from ssah.units.scores import score_batches

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def score():
        score_batches(model, layout, batches, "variance", None, progress=False)

    forward(), score()  # warm-up: kernels, allocator
    times = {"forward": [], "variance": []}
    for _ in range(repeats):
        times["forward"].append(timed(forward))
        times["variance"].append(timed(score))
    return {"tokens": tokens, **{f"{k}_tokens_per_s": tokens / statistics.median(v) for k, v in times.items()},
            "variance_over_forward": statistics.median(v / f for v, f in zip(times["variance"], times["forward"]))}


def train_steps(model, layout, batch, steps: int, repeats: int, device: str) -> list[dict]:
    return [row for copy in (False, True) for row in _train_steps(model, layout, batch, steps, repeats, device, copy)]


def _train_steps(model, layout, batch, steps: int, repeats: int, device: str, copy: bool) -> list[dict]:
    import torch

    from benchmarks.bench_freeze import SETTINGS, _mask
    from ssah.interventions.freeze import UnitFreezer

    # transformers 5 renamed gradient checkpointing to activation checkpointing; older versions lack the new name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    enable()
    model.train()

    def run_side(freezer) -> tuple[float, int | None]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.1)
        if freezer is not None:
            freezer.wrap_optimizer(opt)

        def step():
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        _reset_peak(device)
        step()  # allocates the optimizer state
        seconds = timed(lambda: [step() for _ in range(steps)]) / steps
        return seconds, _peak_bytes(device)  # the optimizer state is freed on return, before the other side

    rows = []
    for label, share in SETTINGS:
        mask = _mask(layout, share, seed=1)
        plain, frozen, peaks = [], [], {}
        try:
            for _ in range(repeats):
                seconds, peaks["plain"] = run_side(None)
                plain.append(seconds)
                freezer = UnitFreezer(model, layout, mask, copy=copy)
                try:
                    seconds, peaks["frozen"] = run_side(freezer)
                finally:
                    freezer.remove()
                frozen.append(seconds)
                del freezer
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            _reset_peak(device)
            rows.append({"setting": label, "mode": "copy" if copy else "masked", "error": "out of GPU memory"})
            continue
        rows.append({"setting": label, "mode": "copy" if copy else "masked", "plain_s": statistics.median(plain),
                     "frozen_s": statistics.median(frozen),
                     "time_ratio": statistics.median(f / p for f, p in zip(frozen, plain)),
                     "plain_peak": peaks["plain"], "frozen_peak": peaks["frozen"]})
    disable()
    model.eval()
    return rows


def generation(model, shape: dict, device: str, prompts: int, new_tokens: int) -> dict:
    """Greedy tokens/s of the hf engine (ssah's continuous batching) on random prompts of 128 tokens."""
    import torch

    from ssah.evaluate.batching import BatchingStats, continuous_generate

    gen = torch.Generator().manual_seed(2)
    encoded = torch.randint(3, shape["vocab_size"], (prompts, 128), generator=gen).tolist()
    model.config.use_cache = True
    run = dict(max_new_tokens=new_tokens, eos_ids=[-1], pad_id=0, batch_size=32)  # no EOS: every row is full
    continuous_generate(model, encoded[:4], **{**run, "max_new_tokens": 4})  # warm-up
    stats = BatchingStats()
    seconds = timed(lambda: continuous_generate(model, encoded, stats=stats, **run))
    model.config.use_cache = False
    return {"prompts": prompts, "new_tokens": new_tokens, "hf_tokens_per_s": stats.tokens / seconds,
            "encoded": encoded}


def vllm_generation(folder: str, encoded: list[list[int]], new_tokens: int) -> dict:
    """The same prompts through the vllm engine (model loaded from `folder`)."""
    try:
        from ssah.evaluate.engines import VllmEngine

        engine = VllmEngine(folder, dtype="bfloat16", gpu_memory=0.85)
    except Exception as err:  # not installed, or it cannot start here: the table says so
        return {"vllm_error": f"vLLM did not start ({type(err).__name__}: {str(err).splitlines()[0][:80]})"}
    engine.generate(encoded[:4], max_new_tokens=4, eos_ids=[-1])  # warm-up
    out: list = []
    seconds = timed(lambda: out.extend(engine.generate(encoded, max_new_tokens=new_tokens, eos_ids=[-1])))
    engine.close()
    return {"vllm_tokens_per_s": sum(len(r) for r in out) / seconds}


def render(result: dict) -> list[str]:
    t = result["throughput"]
    shape = result["shape"]
    gib = 2**30
    lines = [f"**{result['device_name']}**, {result['dtype']}, Llama {shape['hidden_size']} hidden x "
             f"{shape['num_hidden_layers']} layers (intermediate {shape['intermediate_size']}, "
             f"{shape['num_attention_heads']} heads), random weights; torch {result['torch']}; "
             f"run {result['date']} in {result['elapsed_s']:.0f} s.", "",
             "| measurement | plain | ssah | ratio |", "|---|---|---|---|",
             f"| forward vs `variance` scoring, tokens/s ({t['tokens']:,} tokens) | {t['forward_tokens_per_s']:,.0f} | "
             f"{t['variance_tokens_per_s']:,.0f} | {t['variance_over_forward']:.2f}x time |"]
    g = result.get("generation")
    if g:
        vllm = g.get("vllm_tokens_per_s")
        lines.append(f"| greedy generation tokens/s, {g['prompts']} prompts x {g['new_tokens']} new tokens: hf vs vllm "
                     f"| {g['hf_tokens_per_s']:,.0f} | " + (f"{vllm:,.0f} | {vllm / g['hf_tokens_per_s']:.2f}x |"
                                                            if vllm else f"{g.get('vllm_error', 'not run')} | |"))
    for row in result["train"]:
        mode = row.get("mode", "masked")
        if "error" in row:
            lines.append(f"| training step, {row['setting']} frozen, {mode} | {row['error']} | | |")
            continue
        mem = ""
        if row["plain_peak"]:
            mem = (f"; peak {row['plain_peak'] / gib:.1f} vs {row['frozen_peak'] / gib:.1f} GiB "
                   f"({row['frozen_peak'] / row['plain_peak']:.2f}x)")
        lines.append(f"| training step, {row['setting']} frozen, {mode} (grad. checkpointing) | "
                     f"{row['plain_s']:.3f} s | {row['frozen_s']:.3f} s | {row['time_ratio']:.2f}x time{mem} |")
    return lines


def _vllm_side(model, encoded: list[list[int]], new_tokens: int) -> dict:
    """Save the model for vLLM, free the Hugging Face copy, then time vLLM."""
    import gc
    import importlib.util
    import tempfile

    import torch

    if importlib.util.find_spec("vllm") is None:
        return {"vllm_error": "vLLM not installed"}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        _tokenizer(model.config.vocab_size).save_pretrained(folder)
        model.to("meta")
        gc.collect()
        torch.cuda.empty_cache()
        return vllm_generation(folder, encoded, new_tokens)


def _tokenizer(vocab_size: int):
    """A word-level tokenizer with `vocab_size` entries (random-weight models need no real one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0", eos_token="t2")


def main() -> None:
    import torch

    from ssah.units.layout import UnitLayout

    tiny = os.environ.get("SSAH_GPU_BENCH_TINY") == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        sys.exit("no CUDA device: this benchmark needs a GPU (or SSAH_GPU_BENCH_TINY=1 for a CPU smoke run)")
    shape = SHAPE_TINY if tiny else SHAPE_7B
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    model = build(shape, device, dtype)
    layout = UnitLayout.from_model(model)
    # Scoring: 4 batches of 8 x 512 tokens; training: 4 x 512 tokens per step, 3 timed steps, 2 repeats.
    batches = synthetic_batches(shape["vocab_size"], 4, 8, 64 if tiny else 512, device=device)
    result = {"tiny": tiny, "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny smoke run)",
              "dtype": str(dtype).removeprefix("torch."), "shape": shape, "torch": torch.__version__,
              "date": machine_info()["date"]}
    result["throughput"] = throughput(model, layout, batches, repeats=3)
    batch = synthetic_batches(shape["vocab_size"], 1, 4, 64 if tiny else 512, seed=1, device=device)[0]
    result["train"] = train_steps(model, layout, {k: batch[k] for k in ("input_ids", "attention_mask")},
                                  steps=3, repeats=2, device=device)
    result["generation"] = generation(model, shape, device, prompts=16 if tiny else 128, new_tokens=8 if tiny else 128)
    encoded = result["generation"].pop("encoded")
    if not tiny:
        result["generation"].update(_vllm_side(model, encoded, 128))
    result["elapsed_s"] = time.perf_counter() - started
    print("\n".join(render(result)))
    out = RESULTS / "quick" / "gpu-tiny.json" if tiny else RESULTS / "gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
