"""RU-budget alignment of the built-in model with its borderline data repeated R times.

Question: How do the refusal rates of the RU-aligned model on harmful and on safe-but-alarming
prompts move with the number of times the borderline pairs repeat in the alignment data?

For each R, the run's unaligned model is aligned inside its RU budget on harmful:train -> refusals,
144 benign:train pairs and sensitive_safe:train answered by the model itself (x R), without recovery
examples or the avoided-opening loss; a row holds the refusal rate (prefix rule, 8 new tokens) on the
first 48 prompts of harmful:test and of sensitive_safe:test (--harmful / --sensitive take other sets).

Rule: none; a measurement (it reads test splits, so no recipe should be chosen on it: align_recipe.py
chooses on validation sets). The decision's summary is each rate per R.

    ssah run --preset demo --out runs/demo --only align        # the RU groups and borderline replies
    python experiments/align_borderline.py --run runs/demo --out runs/borderline --repeats 1 3

Results: experiments/results/align_borderline.json; summary in experiments/README.md.
"""

import json
import shutil
from pathlib import Path

import common

BATCH_SIZE, MAX_LENGTH, NEW_TOKENS = 8, 128, 8


def main() -> None:
    parser = common.parser(__file__, __doc__)
    parser.add_argument("--run", type=Path, required=True, help="a demo run folder whose align stage has run")
    parser.add_argument("--out", type=Path, required=True, help="a folder for one aligned model per R")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3], help="values of R")
    parser.add_argument("--lr", type=float, default=2e-4, help="alignment learning rate")
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps (of 8 pairs each)")
    parser.add_argument("--benign", type=int, default=144, help="benign:train pairs")
    parser.add_argument("--n", type=int, default=48, help="evaluation prompts per set")
    parser.add_argument("--harmful", default="harmful:test", help="harmful prompts to evaluate")
    parser.add_argument("--sensitive", default="sensitive_safe:test", help="safe-but-alarming prompts to evaluate")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.benign, args.n = min(args.steps, 2), min(args.benign, 6), min(args.n, 4)

    from ssah.config import load_config
    from ssah.data import load_dataset
    from ssah.evaluate import generate_replies, is_refusal
    from ssah.interventions.masks import mask_from_expression
    from ssah.pipeline import RunLayout
    from ssah.pipeline.context import RunContext, release
    from ssah.train.recipes import AlignInputs, align, limited
    from ssah.train.settings import TrainSettings
    from ssah.units.groups import Groups

    layout = RunLayout(args.run)
    config = load_config(path=layout.config)
    ctx = RunContext(config, args.run)
    d, seed = config.data, config.seed
    budget = mask_from_expression(Groups.load(layout.unaligned_groups / "groups"), config.align.budget, seed=seed)
    # The unaligned model's replies to the borderline prompts, as the run generated them: copied, so the
    # run folder is only read and nothing is generated twice.
    args.out.mkdir(parents=True, exist_ok=True)
    cached = layout.borderline_replies
    if cached.is_file() and not (args.out / cached.name).exists():
        shutil.copy2(cached, args.out / cached.name)
    borderline = load_dataset(d.borderline_train or "sensitive_safe:train")
    train = TrainSettings(lr=args.lr, max_steps=args.steps, batch_size=BATCH_SIZE, max_length=MAX_LENGTH)

    def refusal_rate(loaded, spec: str) -> float:
        prompts = load_dataset(spec).take(args.n).prompts()
        replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=loaded.fingerprint,
                                   max_new_tokens=NEW_TOKENS, batch_size=16, progress=False)
        return sum(is_refusal(reply) for reply in replies) / len(replies)

    rows = []
    for repeats in args.repeats:
        inputs = AlignInputs(harmful=load_dataset(d.harmful_train),
                             benign=limited(load_dataset(d.benign_train), args.benign, seed),
                             refusals=load_dataset(d.align_refusals), borderline=borderline,
                             borderline_tokens=config.align.borderline_reply_tokens, borderline_repeats=repeats)
        model_dir = args.out / f"model-r{repeats}"
        loaded = ctx.load()  # the unaligned model
        record = align(loaded, inputs, train, model_dir, budget=budget, seed=seed, batch_size=config.eval.batch_size,
                       cache_dir=args.out, replace=True)
        del loaded
        release()
        aligned = ctx.load(model_dir)
        row = {"repeats": repeats, "pairs": record["data"]["pairs"], "borderline": record["data"]["borderline"],
               "final_loss": record["result"]["final_loss"],
               "harmful_refusal": refusal_rate(aligned, args.harmful),
               "sensitive_refusal": refusal_rate(aligned, args.sensitive)}
        del aligned
        release()
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {key: {str(row["repeats"]): row[key] for row in rows} for key in ("harmful_refusal", "sensitive_refusal")}
    common.record_run(args.results, script=__file__, doc=__doc__, model=config.model, args=args, rows=rows,
                      decision={"kind": "measurement", "summary": summary})


if __name__ == "__main__":
    main()
