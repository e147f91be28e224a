"""The attack grid's verdicts as a markdown table (`attacks.md` beside `attacks.json`), one row per judged
defense and one column per attack family, and the plain answer the grid exists for: which defenses, if
any, held in every family.

A cell reads `worst ASR, rise: parts, verdict`: the defense's test ASR at its own worst point (picked on
calibration prompts), its rise over the studied model's ASR in points (left out once the rise part is
not held), then each part of the rule as H (held), N (not held), I (inconclusive) or "-" (not evaluated:
the rise part was already not held), in the order rise / task gain / over-refusal / against same-size
random units ("rand", claims about chosen units only). An inconclusive rise shows its Holm-adjusted p; a
task, over-refusal or random part that is not held shows its estimate in points.
"""

from __future__ import annotations

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
_CODES = {HELD: "H", NOT_HELD: "N", INCONCLUSIVE: "I"}
_THREATS = {"fine-tuning-as-a-service": "service", "open-weights": "open weights"}
_NOT_EVALUATED = "not evaluated"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _part(test: dict, kind: str) -> str:
    """One part of a verdict in the table's short form."""
    if (test.get("reason") or "").startswith(_NOT_EVALUATED):
        return "-"
    code = _CODES[test["result"]]
    if kind == "rise":
        return f"I (p = {test['p_value']:.2g})" if test["result"] == INCONCLUSIVE else code
    estimate = test.get("estimate")
    shown = kind == "rand" or test["result"] != HELD
    text = f"{code} ({100 * estimate:+.1f})" if shown and estimate is not None else code
    return f"rand {text}" if kind == "rand" else text


def verdict_cell(verdict: dict) -> str:
    """One (defense, family) verdict as `worst ASR, rise: parts, verdict`."""
    numbers, word = verdict.get("numbers") or {}, verdict["verdict"]
    word = f"**{word}**" if word in (HELD, NOT_HELD) else word
    worst = _pct(numbers.get("worst_asr"))
    if not verdict["tests"]:  # a gate: nothing could be judged
        gate = verdict.get("reason") or "not judged"
        if "did not raise test ASR" in gate:
            gate = "nothing to defend" + (f" ({gate[gate.index('p = '):].rstrip(')')})" if "p = " in gate else "")
        return f"{worst}: {gate}, {word}"
    kinds = ["rise", "task", "overrefusal", "rand"]
    parts = [_part(test, kind) for test, kind in zip(verdict["tests"], kinds)]
    rise = "" if verdict["tests"][0]["result"] == NOT_HELD or numbers.get("rise") is None \
        else f", {100 * numbers['rise']:+.1f}"
    return f"{worst}{rise}: {' / '.join(parts)}, {word}"


def markdown_table(summary: dict) -> str:
    """The verdict table of `attacks.json`'s summary, the baselines' worst points first (no defense; the LoRA
    attack, Safe LoRA's baseline), then the answer."""
    verdicts = summary["verdicts"]
    families = list(verdicts)
    defenses = list(dict.fromkeys(d for by in verdicts.values() for d in by))
    chosen = (summary.get("combination") or {}).get("chosen")
    header = ["defense", "threat model", "trainable", *families]
    rule = ["---", "---", "---:", *["---"] * len(families)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    baselines = [b for b in dict.fromkeys((v.get("numbers") or {}).get("baseline") for by in verdicts.values()
                                          for v in by.values()) if b is not None] or ["none"]
    for baseline in baselines:  # no defense of each training modality: what the defenses are measured against
        lines.append(f"| {baseline} | - | {_share(summary, baseline)} | "
                     + " | ".join(_baseline_cell(summary, baseline, f) for f in families) + " |")
    for defense in defenses:
        trainable = "-" if defense.startswith("monitor") else _share(summary, defense)
        threat = _THREATS.get(summary.get("threat_model", {}).get(defense), "-")
        name = f"{defense} (chosen)" if defense == chosen else defense
        cells = [verdict_cell(verdicts[f][defense]) if defense in verdicts[f] else "-" for f in families]
        lines.append(f"| {name} | {threat} | {trainable} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + answer(summary) + "\n"


def _share(summary: dict, arm: str) -> str:
    share = summary.get("trainable_share", {}).get(arm)
    return "-" if share is None else "100%" if share == 1 else f"{100 * share:.1f}%"


def _baseline_cell(summary: dict, baseline: str, family: str) -> str:
    """A baseline's worst point in one family: its test ASR, rise over the studied model's and where."""
    numbers = next((v.get("numbers") or {} for v in summary["verdicts"][family].values()
                    if (v.get("numbers") or {}).get("baseline") == baseline
                    and (v.get("numbers") or {}).get("worst_asr_none") is not None), None)
    point = summary["worst_case"].get(baseline, {}).get(family)
    if point is None:
        return "no attack kept the model useful"
    if numbers is None:
        return f"{_pct(point.get('asr'))} (lr {point['lr']:g})"
    return (f"{_pct(numbers['worst_asr_none'])}, {100 * numbers['rise_none']:+.1f} "
            f"(lr {point['lr']:g}, before {_pct(numbers['asr_before'])})")


def answer(summary: dict) -> str:
    """Which defenses held in every family (the rule of `ssah.attacks.matrix`), said plainly."""
    verdicts = summary["verdicts"]
    defenses = list(dict.fromkeys(d for by in verdicts.values() for d in by))
    everywhere = [d for d in defenses if all(by.get(d, {}).get("verdict") == HELD for by in verdicts.values())]
    anywhere = {d: [f for f, by in verdicts.items() if by.get(d, {}).get("verdict") == HELD] for d in defenses}
    anywhere = {d: fams for d, fams in anywhere.items() if fams and d not in everywhere}
    if everywhere:
        text = f"Held in every family ({', '.join(verdicts)}): {', '.join(everywhere)}."
    else:
        text = f"No defense held in every family ({', '.join(verdicts)})."
    if anywhere:
        text += " Held in some: " + "; ".join(f"{d} ({', '.join(f)})" for d, f in anywhere.items()) + "."
    return text
