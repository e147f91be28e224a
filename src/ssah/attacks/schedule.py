"""The order the attack grid runs its cells (`run_grid`): arm by arm, family by family (`arm_groups`), each
arm's calibration cells then its tests, so that the tests evaluate the very models the calibration trained
(at most two held per arm); the monitors after no defense's arm; the combination's choice, and the tests
that wait for it, last. What a cell is and how it is trained and evaluated: `ssah.attacks.grid`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ssah.attacks import matrix
from ssah.attacks.data import build_attacks
from ssah.attacks.defenses import BASELINES, DefenseContext, claim_of
from ssah.attacks.grid import Cell, before_attack, cell_evaluation, cells, defense_context, not_calibrated, run_cell
from ssah.attacks.monitored import MONITOR_ARMS
from ssah.pipeline.context import release


@dataclass
class GridResult:
    cells: list[Cell]
    calibration: list[dict]  # every cell's record, evaluated on calibration prompts
    tests: list[dict | None]  # the test record of the cells the matrix picked (None elsewhere)
    before: dict  # the studied model's test headlines, by system prompt
    table: list[dict]  # matrix rows
    combination: dict | None  # the SSAH-native combination chosen on calibration prompts


def arm_groups(planned: list[Cell]) -> list[list[int]]:
    """The cells' indices by (family, modality, arm), family by family, each modality's attack under no
    defense first: the arms after it are tested at its worst point."""
    groups: dict = {}
    for i, cell in enumerate(planned):
        groups.setdefault((cell.attack.family, cell.modality, cell.arm), []).append(i)
    families = list(dict.fromkeys(cell.attack.family for cell in planned))
    return [group for _, group in sorted(groups.items(), key=lambda item: (
        families.index(item[0][0]), item[0][2] != BASELINES[item[0][1]]))]


class _Grid:
    """One grid's records as they are made: each cell's calibration record ({} until it runs) and test
    record (None until it runs), and the trained models an arm's tests still need."""

    def __init__(self, ctx, stage: Path, planned: list[Cell], before: dict, defenses: DefenseContext):
        a = ctx.config.attacks
        self.ctx, self.stage, self.planned, self.before, self.defenses = ctx, stage, planned, before, defenses
        self.rule = ctx.config.eval.verdict_rule
        self.calibration = [not_calibrated(cell) if a.skip_decided and matrix.is_control(cell.defense) else {}
                            for cell in planned]
        self.tests: list[dict | None] = [None] * len(planned)
        self.studied: dict | None = None  # the studied model's monitor states, made for the first monitor

    def table(self) -> list[dict]:
        a = self.ctx.config.attacks
        return matrix.rows(self.planned, self.calibration, self.tests, self.before, a.utility_drop, self.rule)

    def calibrate(self, group: list[int], keep: bool = True) -> dict:
        """The group's cells on calibration prompts; returns {folder: trained model} of the cells its tests
        may still need (its own worst point so far, the cell at no defense's worst point), none when not
        `keep` (its tests come later)."""
        a, kept = self.ctx.config.attacks, {}
        first = self.planned[group[0]]
        arm, family = first.arm, first.attack.family
        for i in group:
            if self.calibration[i]:
                continue
            cell = self.planned[i]
            limit = matrix.useful_limit(self.before, cell.attack.system is not None, a.utility_drop)
            self.calibration[i] = run_cell(self.ctx, cell, self.defenses, self.stage / "cells" / cell.folder,
                                           useful_limit=limit if a.skip_decided else None,
                                           kept=kept if keep else None)
            if not kept:
                continue
            table = self.table()
            worst = matrix.worst_points(table)
            own, none = worst.get((arm, family)), worst.get((BASELINES[first.modality], family))
            wanted = {row["folder"] for row in (own, none and matrix.same_point(table, arm, none)) if row}
            for folder in set(kept) - wanted:
                del kept[folder]
        return kept

    def test(self, rejected: set[str], waiting: set[str] = frozenset(), kept: dict | None = None) -> None:
        """Every planned test not yet run (`matrix.test_plan`), in `matrix.test_order`, but those of the
        `rejected` and `waiting` candidates and their controls; a trained model in `kept` is evaluated as
        it is. While candidates wait to be chosen, each counts as a claim: a larger family, a safe bound."""
        a, table = self.ctx.config.attacks, self.table()
        plan = {i: scope for i, scope in matrix.test_plan(table, rejected | waiting).items() if self.tests[i] is None}
        extra = len(MONITOR_ARMS) if a.monitor else 0
        for i in matrix.test_order(table, plan):
            settle, row = None, table[i]
            if a.skip_decided and plan[i] == "full" and row["defense"] != row["baseline"]:
                claims = matrix.claims_in_family(table, row["family"], rejected, extra)
                settle = partial(matrix.rise_settled, table, row, self.stage, claims, self.rule, self.ctx.config.seed)
            cell = self.planned[i]
            self.tests[i] = run_cell(self.ctx, cell, self.defenses, self.stage / "cells" / cell.folder, plan[i],
                                     settle=settle, kept=kept)

    def monitor_rows(self, rejected: set[str], family: str | None = None, kept: dict | None = None) -> list[dict]:
        """The runtime monitors' rows (`ssah.attacks.monitored`) at no defense's worst point of each family
        (or of `family`), on the trained model in `kept` where it is there; each evaluated only as far as
        its verdict needs, as the claims' tests (`rejected`: the candidates left out of the count)."""
        from ssah.attacks.monitored import monitored_cells, studied_states

        a, table = self.ctx.config.attacks, self.table()
        worst, out = matrix.worst_points(table), []
        for cell, row in zip(self.planned, table):
            if cell.modality != "full" or cell.defense != "none" or worst.get(("none", row["family"])) is not row \
                    or family not in (None, row["family"]):
                continue
            self.studied = self.studied or studied_states(self.ctx, self.stage)
            evaluation = cell_evaluation(self.ctx, cell, "full")
            records = monitored_cells(self.ctx, self.stage, cell, self.defenses, evaluation, self.studied,
                                      attacked=(kept or {}).get(cell.folder),
                                      settle=partial(self._monitor_settled, table, row, rejected) if a.skip_decided
                                      else None)
            out += matrix.monitor_rows(row, records, self.rule)
        return out

    def _monitor_settled(self, table: list[dict], none: dict, rejected: set[str], arm: str) -> dict | None:
        """`matrix.rise_settled` for a monitor's arm, whose worst point is no defense's `none`."""
        row = matrix.monitor_rows(none, {arm: {"eval": None}}, self.rule)[0]
        claims = matrix.claims_in_family(table, none["family"], rejected, len(MONITOR_ARMS))
        return matrix.rise_settled(table + [row], row, self.stage, claims, self.rule, self.ctx.config.seed)


def run_grid(ctx, stage: Path) -> GridResult:
    """Every cell on calibration prompts, the worst points picked there and the picked cells evaluated on
    the test sets (`ssah.attacks.matrix`), arm by arm (`arm_groups`): an arm's tests follow its calibration
    and evaluate the models it trained, so no test trains again, except those of the combination's
    candidates and their controls, which wait for the choice (there are two or more candidates)."""
    a = ctx.config.attacks
    attacks = build_attacks(a, stage, ctx.config.seed)
    before = before_attack(ctx, stage, attacks)
    planned = cells(attacks, a)
    grid = _Grid(ctx, stage, planned, before, defense_context(ctx, stage))
    # the candidates' tests wait for the choice, which reads every family's calibration; one has no rival
    waiting = set(a.combination_candidates) if len(a.combination_candidates) > 1 else set()
    for group in arm_groups(planned):
        cell = planned[group[0]]
        waits = cell.arm in waiting or claim_of(cell.defense) in waiting
        kept = grid.calibrate(group, keep=not waits)
        if waits:
            continue
        grid.test(set(), waiting, kept)
        if a.monitor and cell.defense == "none" and cell.modality == "full":
            grid.monitor_rows(set(), cell.attack.family, kept)
        del kept
        release()
    combination = matrix.choose_combination(grid.table(), a.combination_candidates)
    rejected = set((combination or {}).get("candidates", {})) - {(combination or {}).get("chosen")}
    grid.test(rejected)
    table = grid.table() + (grid.monitor_rows(rejected) if a.monitor else [])
    return GridResult(planned, grid.calibration, grid.tests, before, table, combination)
