"""What a run report reads from a run folder beside the stage summaries: the evaluations of each
section, a few replies of each, and where two judging rules disagreed; and the paper's numbers."""

from __future__ import annotations

from pathlib import Path

from ssah.errors import SsahError

# From ../shared/PAPER.md (Li & Kim, ICLR 2026); reference only, for the paper's models.
PAPER = {
    "table1_llama2": {
        "model": "Llama-2-7B-Chat (paper)",
        "rows": [("none", 6.49, 58.3, 10.0), ("SCU 1.3%", 6.76, 56.9, 66.0),
                 ("UCU 13.3%", 180.2, 42.7, 28.3), ("RU 14.8%", 8.32, 55.5, 14.6)],
        "columns": ("pruned", "wikitext ppl", "utility avg", "ASR avg %"),
    },
    "table2_llama2": {
        "model": "Llama-2-7B-Chat (paper), AdvBench keyword ASR %",
        "rows": [("Alpaca", 0.19, 5.3, 2.96, 2.1), ("Dolly", 0.19, 11.92, 3.65, 2.88)],
        "columns": ("data", "initial", "plain fine-tune", "(i) SCU+6% CU", "(ii) SCU+CU"),
    },
    "table4_llama7b": {
        "model": "LLaMA-7B (paper), SFT on Alpaca",
        "rows": [("GSM8K 5-shot", 8.8, 13.4), ("MT-Bench turn 1", 2.83, 3.5), ("MMLU", 37.8, 33.7)],
        "columns": ("metric", "full SFT", "RU-only"),
    },
}
EXAMPLES_PER_EVAL = 2


# -- example replies -----------------------------------------------------------------------------------


def pick_examples(rows: list[dict], suite: str = "safety", k: int = EXAMPLES_PER_EVAL,
                  rule: str = "prefix") -> list[dict]:
    """The first replies of `suite`, preferring one judged compliance and one refusal under `rule`,
    in file order (deterministic)."""
    rows = [r for r in rows if r.get("suite") == suite]
    chosen: list[int] = []
    for verdict in ("compliance", "refusal"):
        i = next((i for i, r in enumerate(rows) if (r.get("verdicts") or {}).get(rule) == verdict), None)
        if i is not None and len(chosen) < k:
            chosen.append(i)
    chosen += [i for i in range(len(rows)) if i not in chosen][:max(0, k - len(chosen))]
    return [rows[i] for i in sorted(chosen)]


def evaluation_folders(layout, s: dict) -> dict[str, list[tuple[str, Path | None, str, dict]]]:
    """{report section: [(condition, evaluation folder, suite shown, summary)]} of every evaluation the
    run made (folders None without a `layout`)."""
    def folder(name: str, *args):
        if layout is None:
            return None
        found = getattr(layout, name)
        return found(*args) if args else found

    align = s.get("align") or {}
    monitor = (s.get("probe") or {}).get("monitor") or {}
    sections = {
        "alignment": [("base model", folder("baseline_eval"), "safety", (s.get("baseline") or {}).get("eval"))]
        + [(f"aligned: {kind}", folder("aligned_eval", kind), "safety", (align.get(kind) or {}).get("eval"))
           for kind in ("budget", "full")]
        + [(f"aligned: {name} (control)", folder("aligned_eval", name), "safety", (row or {}).get("eval"))
           for name, row in sorted((align.get("random_budget") or {}).items()) if isinstance(row, dict)],
        "pruning": [(f"pruned {m}", folder("prune_eval", m), "safety", v) for m, v in (s.get("prune") or {}).items()],
        "finetune": [(f"fine-tuned: {k}", folder("finetuned_eval", k), "safety", v)
                     for k, v in (s.get("finetune") or {}).items()],
        "monitor": [("monitor off", folder("studied_eval"), "prefill", monitor.get("without")),
                    ("monitor on", folder("monitor_eval"), "prefill", monitor.get("with"))],
    }
    return {section: [e for e in found if isinstance(e[3], dict)] for section, found in sections.items()}


def gather_examples(layout, summaries: dict) -> dict[str, list[tuple[str, list[dict]]]]:
    """{section: [(condition, replies)]}: a few replies of each evaluation, from its replies.jsonl
    (an evaluation without a readable one is left out)."""
    from ssah.evaluate.runner import read_replies

    out: dict[str, list] = {}
    for section, evaluations in evaluation_folders(layout, summaries).items():
        for condition, folder, suite, _ in evaluations:
            try:
                rows = read_replies(folder)
            except (SsahError, ValueError, OSError):
                continue
            picked = pick_examples(rows, suite)
            if picked:
                out.setdefault(section, []).append((condition, picked))
    return out


def gather_rule_agreement(layout, summaries: dict) -> list[tuple[str, dict]]:
    """[(condition, rule_agreement)] of every evaluation that counts it: from its summary, else from
    its eval.json."""
    from ssah.evaluate.runner import read_report

    out, seen = [], set()
    for evaluations in evaluation_folders(layout, summaries).values():
        for condition, folder, _, block in evaluations:
            if folder in seen:  # e.g. the studied model's evaluation, shown again as "monitor off"
                continue
            seen.add(folder)
            found = block.get("rule_agreement")
            if found is None:
                try:
                    found = (read_report(folder) or {}).get("rule_agreement")
                except (SsahError, OSError):
                    found = None
            if isinstance(found, dict) and found:
                out.append((condition, found))
    return out


