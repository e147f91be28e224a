"""The alignment budget's size per model: the largest share of units RU can take before pruning it costs.

Question: What share of a model's units can RU take while pruning it keeps perplexity within x1.10 and
the refusal rate within 5 points, under each group definition, and how does that share change with the
model's size?

For a run folder's studied model and its unit scores (3-groups/scores-*), SCU and UCU keep the run's sizes
and RU takes each share of a grid, largest first (`ssah.units.size_sweep`); each RU is pruned
(reversibly) and measured on calibration records the scores did not read (harmful:calibration and
benign:calibration after the first scores.limit records): the share of greedy 8-token replies that open
with a refusal (prefix rule) and the perplexity of the reference answers, as a ratio to the unpruned
model's. Each definition (normalisation/ranking) is swept on its own.

Rule (fixed before the runs): under each definition RU's share is the largest grid share whose pruning
keeps the perplexity ratio <= 1.10 and the refusal rate within 5 points of the unpruned model's, on
those held-out calibration records; where no share does, the model has no free budget under that
definition (share 0). The model's share is the largest over the definitions swept.

    ssah run --preset maker-aligned --out runs/qwen --only baseline --only align --only groups
    python experiments/ru_share.py --run runs/qwen

Results: experiments/results/ru_share.json; summary in experiments/README.md.
"""

import json
from pathlib import Path

import common

GRID = [0.30, 0.20, 0.148, 0.10, 0.05, 0.02, 0.01, 0.005]
DEFINITIONS = ["rank/global", "rank/per-layer", "zscore-per-layer/global", "zscore-per-layer/per-layer"]
MAX_PERPLEXITY_RATIO = 1.10
MAX_REFUSAL_CHANGE = 0.05


def main() -> None:
    parser = common.parser(__file__, __doc__)
    parser.add_argument("--run", type=Path, required=True, help="a run folder whose groups stage has run")
    parser.add_argument("--definitions", nargs="+", default=DEFINITIONS, help="normalisation/ranking pairs")
    parser.add_argument("--grid", type=float, nargs="+", default=GRID, help="RU shares, largest first")
    args = parser.parse_args()

    from ssah.data import Dataset, load_dataset
    from ssah.pipeline.context import release
    from ssah.units.scores import Scores
    from ssah.units.size_sweep import AttributeProbe, SweepThresholds, sweep_sizes

    ctx = common.run_context(args.run)
    config = ctx.config
    scores = ctx.layout.groups.parent
    safety, utility = Scores.load(scores / "scores-safety"), Scores.load(scores / "scores-utility")
    used = config.scores.limit
    harmful = load_dataset(config.data.harmful_calibration)[used:]
    benign = load_dataset(config.data.benign_calibration)
    benign = benign[used:] if used else benign
    answered = [r for r in benign if r.response]
    held_out = max(1, min(len(harmful), len(answered)) if not args.smoke else 4)
    loaded = ctx.load(ctx.studied_model_spec())
    system = None if config.eval.system_prompt == "none" else config.eval.system
    probe = AttributeProbe.build(loaded, harmful, Dataset(f"{benign.name}[answered]", answered), samples=held_out,
                                 system=system, batch_size=config.eval.batch_size)
    # SCU and UCU at the run's sizes: one candidate each, which the sweep keeps whatever it measures there
    # (hurt thresholds 0: always "hurt"; the sweep's UCU falls back to the paper's size, which the
    # maker-aligned preset uses); only RU's rule decides anything here
    sizes = config.groups.sizes if isinstance(config.groups.sizes, dict) else {}
    thresholds = SweepThresholds(spare_safety=MAX_REFUSAL_CHANGE, spare_utility=MAX_PERPLEXITY_RATIO - 1,
                                 hurt_safety=0.0, hurt_utility=0.0)
    grids = {"scu": (sizes.get("scu", 0.013),), "ucu": (sizes.get("ucu", 0.133),), "ru": tuple(args.grid)}
    rows = []
    for definition in args.definitions:
        normalize, ranking = definition.split("/")
        sweep = sweep_sizes(loaded, safety, utility, probe, normalize=normalize, ranking=ranking,
                            thresholds=thresholds, grids=grids)
        steps = [s for s in sweep.steps if s.group == "RU"]
        kept = [s.fraction for s in steps if s.safety_spared and s.utility_spared]
        row = {"definition": definition, "ru_share": max(kept) if kept else 0.0, "sizes": sweep.sizes,
               "unpruned_refusal_rate": sweep.baseline.refusal_rate, "unpruned_perplexity": sweep.baseline.perplexity,
               "steps": [{"share": s.fraction, "units": s.units, "refusal_rate": s.refusal_rate,
                          "perplexity_ratio": s.perplexity_ratio} for s in steps]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    del loaded
    release()
    best = max(rows, key=lambda r: r["ru_share"])
    common.record_run(args.results, script=__file__, doc=__doc__, model=config.model, args=args, rows=rows,
                      decision={"kind": "choice", "chosen": best["definition"] if best["ru_share"] else None,
                                "ru_share": best["ru_share"], "held_out_records": held_out})


if __name__ == "__main__":
    main()
