"""RU-budget alignment of the built-in model with borderline data repeated R times.

    ssah run --preset demo --out runs/demo --only align        # makes the RU groups and borderline replies
    python experiments/align_borderline.py --run runs/demo --lr 2e-4 --steps 36 --repeats 3

Trains the built-in model inside its RU budget on harmful:train -> refusals, 144 benign:train pairs and
sensitive_safe:train answered by the model itself (x repeats), then reports the refusal rate (prefix
rule, 8 new tokens) on the first 48 prompts of harmful:test and of sensitive_safe:test.
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a demo run folder whose align stage has run")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--benign", type=int, default=144)
    parser.add_argument("--n", type=int, default=48, help="test prompts per set")
    args = parser.parse_args()

    from ssah.config import load_config
    from ssah.data import load_dataset
    from ssah.evaluate import generate_replies, is_refusal
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import load_mask
    from ssah.pipeline import Run, _borderline_pairs
    from ssah.train.cli import alignment_pairs
    from ssah.train.sft import TrainConfig, train_sft

    run = Run(load_config("demo"), args.run)
    loaded = run.load()
    align_dir = run.stage_dir("align")
    borderline = _borderline_pairs(run, loaded, align_dir / "borderline-replies.jsonl")
    pairs = alignment_pairs(load_dataset("harmful:train"), load_dataset("benign:train").sample(args.benign, 0),
                            load_dataset("refusals"), 0, borderline * args.repeats)
    freezer = UnitFreezer(loaded.model, loaded.layout, load_mask(str(align_dir / "base" / "groups"), "RU"),
                          train_only=True)
    result = train_sft(loaded.model, loaded.tokenizer, pairs,
                       TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=8, max_length=128), freezer=freezer)

    def refusal_rate(spec: str) -> float:
        prompts = load_dataset(spec).take(args.n).prompts()
        replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key="experiment",
                                   max_new_tokens=8, batch_size=16, progress=False)
        return sum(is_refusal(reply) for reply in replies) / len(replies)

    print(json.dumps({**vars(args), "pairs": len(pairs), "final_loss": result.final_loss,
                      "harmful_test_refusal": refusal_rate("harmful:test"),
                      "sensitive_test_refusal": refusal_rate("sensitive_safe:test")}))


if __name__ == "__main__":
    main()
