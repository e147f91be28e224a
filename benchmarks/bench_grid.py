"""The reduced attack grid's time on this machine: `attack-grid-quick` from scratch on the demo's model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_grid.py [--quick]

Needs a finished `make demo` (runs/demo, or SSAH_BENCH_DEMO=PATH): its folder is copied, without any
grid it holds, and the grid runs there in its own process (`ssah run --preset
attack-grid-quick --only align --only groups --only attacks`), with torch's default threads, as a
user runs it, not the harness's --threads. The table reads the stage's own records: `done.json`'s
seconds (the whole stage, wall clock) and `attacks.json`'s `compute` (the cells' seconds by phase).
Not in the harness's default run (it takes as long as the grid): `python -m benchmarks --only grid`.
SSAH_BENCH_GRID_RUN=RUN_DIR reads a grid already run that way instead (`ssah run --preset
attack-grid-quick --out RUN_DIR` in a copy of the demo's folder), refusing one whose stage reused
cells: its wall time must cover the seconds its cells took.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import fmt_target, script_main, target  # noqa: E402

NAME = "grid"
TITLE = "The reduced attack grid, from scratch"
DEFAULT = False  # only with --only grid: it runs the whole reduced grid
PARAMS = {"full": dict(preset="attack-grid-quick"), "quick": dict(preset="attack-grid-quick")}
TARGET_MIN = 40.0
ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = ("8-attacks", "9-report")  # a grid the demo's folder may hold already, and the report of it
PROSE = """\
The reduced grid keeps `attack-grid`'s four families, both sweep points, rule and full test sets, with
fewer arms (README, "Fine-tuning attacks and defenses"). What costs is generation on the full test
sets, not training: a calibration cell trains 4 steps and writes 32 replies, a test cell evaluates the
model its calibration trained on 163 harmful prompts (and 110 over-refusal prompts and 256 tasks when
its verdict needs them), and each monitor evaluates the attacked model on all three under the monitor.
Outside the cells, the monitors' calibration is most of the stage's remaining time: one for the studied
model's monitor, one for its per-token variant and one per family on the attacked model, each generating
its calibration replies in static batches under an observing monitor (about 100 s each on the demo's
model, from the times the stage wrote its files). Stopping a verdict's evaluation once it is decided is
what the grid already does; the rest of the gap is reply throughput (the monitors' generation is static
batching, three passes per family where one observed pass could serve all three) or fewer arms."""


def run(loaded, preset: str = "attack-grid-quick") -> dict:
    del loaded  # the grid loads its own model, in its own process
    given = os.environ.get("SSAH_BENCH_GRID_RUN")
    if given:
        return _result(Path(given) / "8-attacks", preset, given)
    demo = Path(os.environ.get("SSAH_BENCH_DEMO", ROOT / "runs" / "demo"))
    if not (demo / "3-groups").is_dir():
        _refuse(f"bench_grid: {demo} holds no finished demo (run `make demo` first)")
    with tempfile.TemporaryDirectory(prefix="ssah-bench-grid-") as tmp:
        out = Path(tmp) / "run"  # the demo's folder, ssah's record of what it wrote included, without a grid
        shutil.copytree(demo, out, ignore=lambda folder, names: LEFT_OUT if Path(folder) == demo else ())
        ssah = Path(sys.executable).with_name("ssah")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([str(ssah), "run", "--preset", preset, "--out", str(out), "--only", "align", "--only",
                        "groups", "--only", "attacks"], check=True, env=env)
        return _result(out / "8-attacks", preset)


def _refuse(message: str) -> None:
    """One line on stderr and exit status 2, as ssah answers an error its user made."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _result(stage: Path, preset: str, run_dir: str | None = None) -> dict:
    if not (stage / "done.json").is_file() or not (stage / "attacks.json").is_file():
        _refuse(f"bench_grid: {stage} holds no finished attack stage (done.json and attacks.json)")
    done = json.loads((stage / "done.json").read_text())
    compute = json.loads((stage / "attacks.json").read_text())["compute"]
    cells = sum(phase["seconds"] for phase in compute.values())
    if done["seconds"] < cells or any(phase["untimed"] for phase in compute.values()):
        _refuse(f"bench_grid: {stage} reused cells (stage {done['seconds']:.0f} s, its cells "
                f"{cells:.0f} s): not a run from scratch")
    minutes = done["seconds"] / 60
    return {"name": NAME, "preset": preset, "params": {"preset": preset}, "minutes": minutes, "compute": compute,
            "os_cpus": os.cpu_count(), **({"run_dir": run_dir} if run_dir else {}),
            "target": target(f"{preset} stage, minutes", minutes, "<=", TARGET_MIN, unit=" min")}


def render(result: dict) -> list[str]:
    source = " (a run of that command, read with `SSAH_BENCH_GRID_RUN`)" if result.get("run_dir") else ""
    lines = [f"`ssah run --preset {result['preset']}` on the demo's aligned model, {result['os_cpus']} CPU "
             f"cores, from scratch{source}.", "",
             "| phase | cells | seconds | mean per cell |", "|---|---|---|---|"]
    for phase, c in result["compute"].items():
        mean = f"{c['seconds'] / c['cells']:.0f}" if c["cells"] else "-"
        lines.append(f"| {phase} | {c['cells']} | {c['seconds']:.0f} | {mean} |")
    lines += ["", f"The whole stage (the studied model's evaluation, the harmful replies, every cell, the "
              f"monitors' calibration): **{result['minutes']:.1f} min**, {fmt_target(result['target'])}."]
    return lines


if __name__ == "__main__":
    script_main(sys.modules[__name__])
