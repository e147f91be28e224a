"""Where fine-tuning breaks safety: the share of the ASR rise each parameter group's aligned weights undo.

    from ssah.analysis.restore import restore_table
    table = restore_table(aligned, attacked, Groups.load("runs/x/groups"), ["SCU", "CU", "embeddings"], "out")

`aligned` and `attacked` are two versions of one model (`LoadedModel`s with the same layout), e.g. a
model before and after a plain fine-tuning attack. Each part (`ssah.interventions.restore`: unit groups,
embeddings, norms, qk, other, and unions such as SCU+CU) is put back to its aligned values in the
attacked model (`restored`, reversibly) and the safety suite is run on the same harmful prompts as
the two models themselves (`evaluate_model`, one folder per state). Per part:

- `asr`: its attack success rate under `rule`, with its Wilson 95% interval;
- `share`: (ASR attacked - ASR restored) / (ASR attacked - ASR aligned), the share of the rise the part
  takes back (1: all of it, 0: none, below 0: the part makes things worse), with a paired percentile
  bootstrap 95% interval over prompts (`paired_share_bootstrap`); None, with `share_reason`, when the
  attack raised no ASR.

Only prompts the rule decides in every state are paired; `undecided` counts the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ssah.errors import SsahError
from ssah.outputs import OutputKind

RESTORE_FILE = "restore.json"
FORMAT = "ssah.restore/1"
RESTORE = OutputKind("restore", (RESTORE_FILE, "aligned", "attacked", "restored-*"), record=RESTORE_FILE)
DEFAULT_PARTS = ("SCU", "CU", "UCU", "RU", "embeddings", "norms", "qk", "SCU+CU")


def check_parts(parts: Sequence[str]) -> list[str]:
    """The parts, each checked (`parse_part`) and none twice; one SsahError otherwise."""
    from ssah.interventions.expressions import parse_part

    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise SsahError("no part to restore; e.g. SCU,CU,UCU,RU,embeddings,norms,qk,SCU+CU")
    for part in parts:
        parse_part(part)
    folders = [part_folder(p) for p in parts]
    repeated = sorted({p for p, f in zip(parts, folders) if folders.count(f) > 1})
    if repeated:
        raise SsahError(f"part {repeated[0]!r} is listed twice (parts are compared by name, case ignored)")
    return parts


def part_folder(part: str) -> str:
    """The evaluation folder of a part: restored-<part>, characters outside [A-Za-z0-9+.=-] as _."""
    return "restored-" + re.sub(r"[^A-Za-z0-9+.=-]", "_", part).lower()


def _safety_settings(settings, rule: str | None):
    from ssah.evaluate.settings import EvalSettings

    settings = settings or EvalSettings(suites=["safety"])
    if "safety" not in settings.suites:
        raise SsahError("restoring measures ASR; the evaluation settings need the safety suite")
    rule = rule or settings.rules[0]
    if rule not in settings.rules:
        raise SsahError(f"rule {rule!r} is not among the evaluated rules ({', '.join(settings.rules)})")
    return settings, rule


def restore_table(aligned, attacked, groups, parts: Sequence[str], out: str | Path, settings=None, data=None,
                  rule: str | None = None, resamples: int = 2000, seed: int = 0, force: bool = False) -> dict:
    """Evaluate `aligned`, `attacked` and `attacked` with each part restored (see the module docstring);
    writes OUT/restore.json and returns it. `settings`: `EvalSettings` with the safety suite (default:
    safety only); `data`: datasets by role (default: the built-in harmful test prompts); `rule`: the
    refusal rule the shares use (default: the settings' first)."""
    from ssah.evaluate.runner import load_eval_data
    from ssah.interventions.restore import restored
    from ssah.io import write_json_atomic
    from ssah.ownership import make_dirs

    parts = check_parts(parts)
    settings, rule = _safety_settings(settings, rule)
    interventions = [restored(attacked.model, attacked.layout, aligned.model, part, groups) for part in parts]
    data = data if data is not None else load_eval_data(settings.suites, settings.limit)
    out = make_dirs(out)
    folders = [out / "aligned", out / "attacked", *(out / part_folder(p) for p in parts)]
    _evaluate(aligned, folders[0], settings, data, force)
    _evaluate(attacked, folders[1], settings, data, force)
    for folder, intervention in zip(folders[2:], interventions):
        _evaluate(attacked, folder, settings, data, force, intervention)
    table = _table(folders, parts, interventions, rule, resamples, seed)
    table["models"] = {"aligned": {"spec": aligned.spec, "fingerprint": aligned.fingerprint},
                       "attacked": {"spec": attacked.spec, "fingerprint": attacked.fingerprint}}
    table["settings"] = settings.identity()
    write_json_atomic(out / RESTORE_FILE, table)
    return table


def _evaluate(loaded, folder: Path, settings, data, force: bool, intervention=None) -> None:
    from ssah.evaluate.runner import evaluate_model

    evaluate_model(loaded.model, loaded.tokenizer, loaded.fingerprint, folder, settings, data,
                   model_info={"spec": loaded.spec, "fingerprint": loaded.fingerprint}, force=force,
                   interventions=[intervention] if intervention is not None else ())


def _table(folders: list[Path], parts: list[str], interventions: list, rule: str, resamples: int,
           seed: int) -> dict:
    """The restore table from the evaluations' replies: each part's ASR and share of the rise."""
    from ssah.analysis.verdicts import aligned_outcomes
    from ssah.evaluate.stats import Rate, paired_share_bootstrap

    found = aligned_outcomes(folders, "safety", rule)
    if found is None:
        raise SsahError(f"the evaluations in {folders[0].parent} do not share decided safety prompts under "
                        f"the {rule} rule; nothing to pair")
    (aligned, attacked, *restored_flags), undecided = found

    def asr(flags: list[bool]) -> dict:
        rate = Rate.of(flags)
        return {"asr": rate.rate, "asr_ci": list(rate.ci)}

    rows = []
    for part, folder, intervention, flags in zip(parts, folders[2:], interventions, restored_flags):
        share = paired_share_bootstrap([float(f) for f in aligned], [float(f) for f in attacked],
                                       [float(f) for f in flags], resamples=resamples, seed=seed)
        report = intervention.report_block([])
        rows.append({"part": part, "folder": folder.name, "entries": report["entries"],
                     "share_of_entries": report["share_of_entries"], **asr(flags), "share": share["share"],
                     "share_ci": share["ci"], "share_reason": share["reason"],
                     "resamples_used": share["resamples_used"]})
    rise = Rate.of(attacked).k - Rate.of(aligned).k
    return {"format": FORMAT, "rule": rule, "n": len(aligned), "undecided": undecided,
            "aligned": asr(aligned), "attacked": asr(attacked), "asr_rise": rise / len(aligned),
            "resamples": resamples, "seed": seed, "level": 0.95, "parts": rows}
