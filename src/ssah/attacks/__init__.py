"""Fine-tuning attacks and peer defenses, side by side (the `attacks` stage of a run).

- `data`: the attack families (benign, harmful-k, mixed-p, identity shift);
- `defenses`: none, SSAH's frozen settings (freeze_i, freeze_ii, freeze_ii_strict, freeze_budget), the
  control of freeze_ii (freeze_random: same-size random units), RSN-Tune (`rsn`), Safe LoRA
  (`safe_lora`, a defense of the LoRA attack) and safety-data mixing, each with its threat model;
- `grid`: every defense under every attack of its training modality's (full, LoRA) learning-rate x
  steps sweep;
- `matrix`: the matrix, TamperBench-style worst cases (utility kept) and verdicts per family (Holm's
  correction within a family);
- `plots`: a heatmap and a worst-case bar chart for the report.
"""
