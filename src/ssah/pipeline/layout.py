"""`RunLayout`: every path of a run folder, in one place.

    RUN_DIR/
      config.yaml  results.json  report.html       the config of the latest run; every number; the report
      1-baseline/  eval/                            the model as given
      2-align/     base/ borderline-replies.jsonl harmful-replies.jsonl model-budget/ eval-budget/
                   model-full/ eval-full/           the unaligned model's groups, the aligned models
      3-groups/    scores-safety/ scores-utility/ groups/
      4-prune/     eval-none/ eval-SCU/ ...         one evaluation per pruned mask
      5-finetune/  model-plain/ eval-plain/ ...     one model and evaluation per setting
      6-probe/     probe.json directions*.safetensors *.png monitor.safetensors eval-monitor/
      7-transfer/  after-finetune/ transfer.json transfer-*.png restore/   (restore.enabled)
      8-attacks/   cells/ATTACK/lrLR-sSTEPS/DEFENSE/{cell,test}.json eval-calibration/ eval/  before-*/ rsn/
                   monitor/ attacks.json attack_*.png   (attacks.enabled)
      9-report/
    Each stage folder ends with done.json (the stage's identity and summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssah.outputs import OutputKind
from ssah.train.data import BORDERLINE_CACHE, HARMFUL_CACHE

STAGES: tuple[str, ...] = ("baseline", "align", "groups", "prune", "finetune", "probe", "transfer", "attacks",
                           "report")
CONFIG_FILE, RESULTS_FILE, REPORT_FILE, DONE_FILE = "config.yaml", "results.json", "report.html", "done.json"
# numbered stage folders of this version and of earlier ones (whose stages were numbered otherwise)
RUN = OutputKind("run", (CONFIG_FILE, RESULTS_FILE, REPORT_FILE, "[1-9]-*"), record=CONFIG_FILE)


def slug(text: str) -> str:
    """A folder-name-safe form of a mask expression (random:like=SCU -> random_like_SCU)."""
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. `study` is align.study ("base" when alignment is off)."""

    root: Path
    study: str = "base"

    def stage(self, name: str) -> Path:
        return self.root / f"{STAGES.index(name) + 1}-{name}"

    def done(self, name: str) -> Path:
        return self.stage(name) / DONE_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    # baseline and align
    @property
    def baseline_eval(self) -> Path:
        return self.stage("baseline") / "eval"

    @property
    def unaligned_groups(self) -> Path:
        """Scores and groups of the unaligned model, from which the alignment budget is taken."""
        return self.stage("align") / "base"

    @property
    def alignment_cache(self) -> Path:
        """Where the unaligned model's own replies used by alignment are cached."""
        return self.stage("align")

    @property
    def borderline_replies(self) -> Path:
        return self.alignment_cache / BORDERLINE_CACHE

    @property
    def harmful_replies(self) -> Path:
        return self.alignment_cache / HARMFUL_CACHE

    def aligned_model(self, kind: str) -> Path:
        return self.stage("align") / f"model-{kind}"

    def aligned_eval(self, kind: str) -> Path:
        return self.stage("align") / f"eval-{kind}"

    @property
    def studied_model(self) -> Path | None:
        """The folder of the model stages 3-7 study; None when it is the model as given."""
        return None if self.study == "base" else self.aligned_model(self.study)

    @property
    def studied_eval(self) -> Path:
        """Where the studied model's own evaluation is (written by the baseline or align stage)."""
        return self.baseline_eval if self.study == "base" else self.aligned_eval(self.study)

    # groups, prune, finetune
    @property
    def groups(self) -> Path:
        return self.stage("groups") / "groups"

    def prune_eval(self, expression: str) -> Path:
        """Where the prune stage evaluates the studied model with `expression` pruned ("none": nothing)."""
        return self.stage("prune") / f"eval-{slug(expression)}"

    def finetuned_model(self, setting: str) -> Path:
        return self.stage("finetune") / f"model-{setting}"

    def finetuned_eval(self, setting: str) -> Path:
        return self.stage("finetune") / f"eval-{setting}"

    # probe and transfer
    @property
    def monitor_state(self) -> Path:
        return self.stage("probe") / "monitor.safetensors"

    @property
    def monitor_eval(self) -> Path:
        return self.stage("probe") / "eval-monitor"

    @property
    def probe_study(self) -> Path:
        return self.stage("probe")

    @property
    def regrouped_after_finetune(self) -> Path:
        return self.stage("transfer") / "after-finetune"

    @property
    def attack_grid(self) -> Path:
        return self.stage("attacks")

    @property
    def restore(self) -> Path:
        """The restore table's folder (restore.json and one evaluation per state)."""
        return self.stage("transfer") / "restore"

    @property
    def transfer_record(self) -> Path:
        return self.stage("transfer") / "transfer.json"

    def transfer_plot(self, kind: str) -> Path:
        """kind: finetune (Figure 5) or alignment (Figure 6)."""
        return self.stage("transfer") / f"transfer-{kind}.png"
