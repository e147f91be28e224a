"""The demo's benign fine-tuning attack with only some units trainable (everything else frozen,
embeddings and norms included), to see where the attack needs to act.

    make demo                                                   # or: ssah run --preset demo --out runs/demo
    python experiments/finetune_trainable_units.py --run runs/demo --units UCU+RU

Same data, steps and optimizer as the run's finetune stage; the mask is an expression over the
studied model's groups (runs/demo/3-groups). Prints ASR, over-refusal, task accuracy and perplexity
of the attacked model (the run's evaluation settings); the model and its evaluation go to
RUN/experiments/trainable-<units>.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a demo run folder whose groups stage has run")
    parser.add_argument("--units", default="UCU+RU", help="mask expression of the only trainable units")
    args = parser.parse_args()

    from ssah.config import load_config
    from ssah.data import load_dataset
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import mask_from_expression
    from ssah.pipeline import Run
    from ssah.units.groups import Groups

    run_dir = Path(args.run)
    run = Run(load_config(path=run_dir / "config.yaml"), run_dir)
    c = run.config
    data = load_dataset(c.data.finetune)
    if c.finetune.train.limit:  # the finetune stage's own sample
        data = data.sample(min(c.finetune.train.limit, len(data)), c.seed)
    pairs = [(r.prompt, r.response) for r in data if r.response]
    loaded = run.load(run.studied_model_spec())
    mask = mask_from_expression(Groups.load(run.stage_dir("groups") / "groups"), args.units, seed=c.seed)
    freezer = UnitFreezer(loaded.model, loaded.layout, mask, train_only=True)
    out = run_dir / "experiments" / f"trainable-{args.units.replace('+', '_').replace(':', '_')}"
    record = run.train(loaded, pairs, c.finetune.train, out / "model", freezer=freezer)
    tuned = run.load(str(out / "model"))
    report = run.evaluate(tuned, tuned.fingerprint, out / "eval", f"attack, only {args.units} trainable")
    print(f"only {args.units} trainable ({mask.share():.1%} of units): ASR {report['asr']}, "
          f"over-refusal {report['overrefusal_rate']}, task accuracy {report['utility']['task_accuracy']}, "
          f"perplexity {report['utility']['perplexity']:.2f}, final loss {record['result']['final_loss']:.3f}")


if __name__ == "__main__":
    main()
