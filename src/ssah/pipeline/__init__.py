"""The staged SSAH experiment: `ssah run` / `ssah demo`.

Stages, each writing into its own folder of RUN_DIR and finishing with an atomic `done.json`
that records the hash of the config sections it used:

1. ``baseline``  evaluate the model as given;
2. ``align``     (models without safety behaviour) score, group, then align inside the RU budget and,
                 for comparison, with all parameters; evaluate both;
3. ``groups``    safety and utility scores of the studied model, and its groups;
4. ``prune``     evaluate with each group (and size-matched random controls) pruned (Table 1);
5. ``finetune``  benign fine-tuning attack: plain, frozen (i) and (ii), LoRA; evaluate each (Table 2/3);
6. ``probe``     reasoning direction, unaligned vs studied model; the studied model under the runtime
                 monitor (safety, prefill attack, over-refusal);
7. ``transfer``  regroup after the fine-tuning attack and cross-tabulate (Figure 5);
8. ``attacks``   (attacks.enabled) every defense under every fine-tuning attack of a strength sweep, worst
                 points picked on calibration prompts and judged on test prompts (`ssah.attacks`);
9. ``report``    results.json, report.html and a console summary.

A rerun skips finished stages; inside a stage every finished artifact (scores, trained models,
evaluations, cached generations) is reused, so a killed run resumes where it stopped and ends with
the numbers an uninterrupted run gives. A changed config redoes only the stages it reaches; a RUN_DIR
made for another model is refused.

Modules: `layout` (every path of a run folder), `context` (what stages share), `registry` (what each
stage reads and needs), `stages/` (one module per stage), `preflight` (the checks before any stage),
`runner` (`run_pipeline`).
"""

from ssah.pipeline.layout import STAGES, RunLayout
from ssah.pipeline.runner import run_pipeline

__all__ = ["STAGES", "RunLayout", "run_pipeline"]
