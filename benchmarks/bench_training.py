"""Training steps with logits at response positions only vs the full logits, and each stage's FLOP/s
beside the machine's matmul roofline.

    python benchmarks/bench_training.py --threads 1     # built-in model, batch 8, length 128
    python benchmarks/bench_training.py --quick         # tiny:llama

The batches are the demo's: its alignment data (harmful:train prompts with the alignment refusals, mixed
with benign:train answers: `ssah.train.data.alignment_pairs`) and its fine-tuning data (benign:train),
encoded and padded by `ssah.train.sft` exactly as training does. One step here is the forward and
backward pass (the optimizer step is the same on both sides): the model's own loss over the full
logits, or `ssah.train.sft.response_loss` (the LM head only where a response token is predicted).
The scoring forward is the model body without its head (scoring stops after the last hooked layer)
on the same batches, without gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    fmt_flops,
    fmt_ratio,
    matmul_roofline,
    paired_ratios,
    script_main,
    summary,
    timed,
    weight_counts,
)

NAME = "training"
TITLE = "Training steps (response-only logits vs full logits) and each stage's share of the matmul roofline"
PARAMS = {
    "full": dict(batch_size=8, length=128, batches=2, repeats=2),
    "quick": dict(batch_size=2, length=128, batches=1, repeats=1),
}
PROSE = """\
A step's FLOPs count the weights' multiply-adds (3x the forward's: the backward pass costs two
forwards), attention's score products aside; the full-logits side computes the LM head at every
position, the response-only side where labels are learned. On the built-in model the head
(49,152 x 576) holds a fifth of the weights, and the loss's softmax over 49,152 entries per position
adds memory traffic the FLOP count does not show: computing both only at the learned positions is
what the response-only side saves. The share of the roofline says how much faster the same arithmetic could run
on this machine: small matrices (batch x length rows of 576 features) and the backward's
transposed products run below a large square matmul's rate."""


def _pairs(kind: str) -> list[tuple[str, str]]:
    from ssah.data import load_dataset
    from ssah.train.data import alignment_pairs

    benign = load_dataset("benign:train")
    if kind == "alignment":
        return alignment_pairs(load_dataset("harmful:train"), benign, load_dataset("refusals:align"))
    return [(r.prompt, r.response) for r in benign if r.response]


def run(loaded, batch_size: int = 8, length: int = 128, batches: int = 2, repeats: int = 2) -> dict:
    import torch

    from ssah.train.sft import TrainConfig, _batches, response_loss

    model, tokenizer = loaded.model, loaded.tokenizer
    roofline = matmul_roofline()
    weights = weight_counts(model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    config = TrainConfig(batch_size=batch_size, max_length=length)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # steps here never change weights
    results = []
    for kind in ("alignment", "fine-tuning"):
        loader = _batches(tokenizer, _pairs(kind), config, torch.Generator().manual_seed(0))
        data = [batch for _, batch in zip(range(batches), loader)]
        positions = sum(b["input_ids"].numel() for b in data)
        learned = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)

        def full(data=data):
            for batch in data:
                model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)

        def ours(data=data):
            for batch in data:
                response_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)

        @torch.inference_mode()
        def forward(data=data):
            for batch in data:
                body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        model.train()
        ours()  # warm-up
        sides = {"full": [], "ours": [], "forward": []}
        for _ in range(repeats):
            for name, call in (("full", full), ("ours", ours), ("forward", forward)):
                sides[name].append(timed(call) / len(data))
        model.eval()
        flops = {"full": 6 * (weights["body"] + weights["head"]) * positions / len(data),
                 "ours": 6 * (weights["body"] * positions + weights["head"] * learned) / len(data),
                 "forward": 2 * weights["body"] * positions / len(data)}
        rows = {}
        for name, seconds in sides.items():
            rate = flops[name] / summary(seconds)["median"]
            rows[name] = {"seconds": summary(seconds), "flops_per_s": rate,
                          "roofline_share": rate / roofline["flops_per_s"]}
        results.append({"data": kind, "batches": len(data), "positions_per_batch": positions / len(data),
                        "learned_share": learned / positions, "rows": rows,
                        "speedup": paired_ratios(sides["full"], sides["ours"])})
    model.load_state_dict(state)
    return {"name": NAME, "model": loaded.spec, "roofline": roofline, "weights": weights,
            "params": dict(batch_size=batch_size, length=length, batches=batches, repeats=repeats), "data": results}


def render(result: dict) -> list[str]:
    p, roof = result["params"], result["roofline"]
    lines = [f"`{result['model']}`, float32, batch {p['batch_size']}, at most {p['length']} tokens, {p['batches']} "
             f"batches per side, median of {p['repeats']} (min-max) seconds per batch; the speedup is taken per "
             f"repeat. Roofline: a {roof['size']}x{roof['size']} fp32 matmul at {roof['threads']} thread(s) reaches "
             f"{fmt_flops(roof['flops_per_s'])}.", "",
             "| data | positions per batch | learned | stage | seconds per batch | achieved FLOP/s | share of roofline "
             "| full / response-only |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"full": "training step, full logits", "ours": "training step, response-only logits",
             "forward": "scoring forward (body, no head)"}
    for entry in result["data"]:
        for key, label in names.items():
            row, s = entry["rows"][key], entry["rows"][key]["seconds"]
            lines.append(f"| {entry['data']} | {entry['positions_per_batch']:.0f} | {entry['learned_share']:.0%} | "
                         f"{label} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                         f"{fmt_flops(row['flops_per_s'])} | {row['roofline_share']:.0%} | "
                         f"{fmt_ratio(entry['speedup']) if key == 'ours' else ''} |")
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
