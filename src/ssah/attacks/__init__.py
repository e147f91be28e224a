"""Fine-tuning attacks and peer defenses, side by side (the `attacks` stage of a run).

- `data`: the attack families (benign, harmful-k, mixed-p, identity shift after Qi et al.);
- `defenses`: none, SSAH's frozen settings (freeze_i, freeze_ii, freeze_ii_strict, freeze_budget), the
  controls of freeze_ii, freeze_ii_strict and the combinations (freeze_random, freeze_random_strict and
  their draws under the constrained objective: same-size random units), RSN-Tune (`rsn`), Safe LoRA
  (`safe_lora`, a defense of the LoRA attack), safety-data mixing,
  Qi et al.'s token-wise constrained objective and the SSAH-native combinations of freezing with it,
  each with its threat model;
- `apply`: one attack under one defense on a model, without a run folder (`attack_model`);
- `grid`: every defense under every attack of its training modality's (full, LoRA) learning-rate x
  steps sweep, evaluated on calibration prompts, the picked cells again on the test sets;
- `monitored`: the runtime monitor as a defense, on the attacked models;
- `matrix`: the matrix, worst points picked on calibration prompts, verdicts per family tested on test
  prompts (Holm's correction within a family);
- `plots`: a heatmap and a worst-case bar chart for the report.
"""

from ssah.attacks.apply import Attacked, attack_model
from ssah.attacks.data import AttackData
from ssah.attacks.defenses import DefenseContext

__all__ = ["AttackData", "Attacked", "DefenseContext", "attack_model"]
