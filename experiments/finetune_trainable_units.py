"""The demo's benign fine-tuning attack with only some units trainable (everything else frozen,
embeddings and norms included), to see where the attack needs to act.

Question: How much of the plain fine-tuning attack's ASR rise does the attack reach when it may change
only the units of a mask (e.g. UCU+RU)?

Same data, steps and optimizer as the run's finetune stage; the mask is an expression over the studied
model's groups (RUN/3-groups/groups). Each row holds ASR, over-refusal, task accuracy and perplexity of
the attacked model (the run's evaluation settings), and its ASR rise over the studied model as a share
of the rise the run's plain attack gave.

Rule: none; a measurement. The decision's summary is each mask's share of the plain attack's ASR rise.

    make demo                                                   # or: ssah run --preset demo --out runs/demo
    python experiments/finetune_trainable_units.py --run runs/demo --out runs/demo-trainable --units UCU+RU RU

Results: experiments/results/finetune_trainable_units.json (no run recorded yet); summary in
experiments/README.md.
"""

import json
from pathlib import Path

import common


def rise_share(asr: float | None, studied: float | None, plain: float | None) -> float | None:
    """(asr - studied) / (plain - studied): the share of the plain attack's rise; None when it did not rise."""
    if None in (asr, studied, plain) or plain <= studied:
        return None
    return (asr - studied) / (plain - studied)


def main() -> None:
    parser = common.parser(__file__, __doc__)
    parser.add_argument("--run", type=Path, required=True, help="a demo run folder whose groups stage has run")
    parser.add_argument("--out", type=Path, required=True, help="a folder for one model and evaluation per mask")
    parser.add_argument("--units", nargs="+", default=["UCU+RU"], help="mask expressions of the only trainable units")
    args = parser.parse_args()

    from ssah.config import load_config
    from ssah.data import load_dataset
    from ssah.evaluate import read_report
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import mask_from_expression
    from ssah.pipeline import RunLayout
    from ssah.pipeline.context import RunContext, release
    from ssah.pipeline.layout import slug
    from ssah.pipeline.summaries import headline
    from ssah.train.recipes import limited, train_model
    from ssah.train.settings import TrainConfig
    from ssah.units.groups import Groups

    layout = RunLayout(args.run)
    config = load_config(path=layout.config)
    ctx = RunContext(config, args.run)
    if args.smoke:  # whatever the run's sizes: 4 prompts per evaluation set, 2 training steps
        config.eval.limit = min(config.eval.limit or 4, 4)
        config.finetune.train.max_steps = 2
    rule = config.eval.rules[0]
    train = TrainConfig.of(config.finetune.train, seed=config.seed, avoid_weight=0.0)
    data = limited(load_dataset(config.data.finetune), config.finetune.train.limit, config.seed)  # the stage's sample
    pairs = [(r.prompt, r.response) for r in data if r.response]
    groups = Groups.load(ctx.layout.groups)
    studied = headline(read_report(ctx.layout.studied_eval) or {})["asr"] or {}
    plain = headline(read_report(ctx.layout.finetuned_eval("plain")) or {})["asr"] or {}
    rows = []
    for units in args.units:
        out = args.out / f"trainable-{slug(units)}"
        loaded = ctx.load(ctx.studied_model_spec())
        mask = mask_from_expression(groups, units, seed=config.seed)
        identity = {"model": loaded.fingerprint, "data": data.fingerprint, "config": train.to_dict(),
                    "train_only": mask.digest()}
        freezer = UnitFreezer(loaded.model, loaded.layout, mask, train_only=True)
        with freezer:
            record = train_model(loaded, pairs, train, out / "model", identity=identity, freezer=freezer,
                                 record={"kind": "finetune", "data": data.name, "trainable_units": mask.count()},
                                 replace=True)
        del loaded
        release()
        tuned = ctx.load(out / "model")
        report = headline(ctx.evaluate(tuned, out / "eval", f"attack, only {units} trainable"))
        del tuned
        release()
        asr = (report["asr"] or {}).get(rule)
        row = {"units": units, "trainable_share": mask.share(), "asr": asr, "overrefusal": report["overrefusal_rate"],
               "task_accuracy": report["task_accuracy"], "perplexity": report["perplexity"],
               "final_loss": record["result"]["final_loss"], "studied_asr": studied.get(rule),
               "plain_attack_asr": plain.get(rule), "share_of_plain_rise": rise_share(asr, studied.get(rule),
                                                                                      plain.get(rule))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"rule": rule, "share_of_plain_rise": {row["units"]: row["share_of_plain_rise"] for row in rows}}
    model = f"{config.model} (studied: {ctx.relative(ctx.studied_model_spec())})"
    common.record_run(args.results, script=__file__, doc=__doc__, model=model, args=args, rows=rows,
                      decision={"kind": "measurement", "summary": summary})


if __name__ == "__main__":
    main()
