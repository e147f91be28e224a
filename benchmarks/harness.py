"""Run every benchmark in one process and rewrite BENCHMARKS.md from the results.

    python -m benchmarks                       # full run on the built-in model, rewrites BENCHMARKS.md
    python -m benchmarks --only peers,freeze   # rerun some tables, keep the others from the last JSON
    python -m benchmarks --quick               # smoke run on tiny:llama (results/quick/, not BENCHMARKS.md)
    python -m benchmarks --render-only         # regenerate the markdown from the saved JSON
    python -m benchmarks --only grid           # the reduced attack grid from scratch (not in the default run)

Raw results go to benchmarks/results/latest.json (quick runs: benchmarks/results/quick/), so the
markdown can be regenerated without measuring again. Benchmarks run one after another, never in
parallel, with torch limited to --threads (default 1) so ratios are comparable between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks import (
    bench_freeze,
    bench_generation,
    bench_grid,
    bench_monitor,
    bench_peers,
    bench_scaling,
    bench_scoring,
    bench_training,
    common,
    report,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Run order: everything that only reads the built-in model first (the training table's steps take no
# optimizer step); the freeze benchmark trains it (and restores the weights), scaling builds its own models.
BENCHMARKS = {m.NAME: m for m in (bench_scoring, bench_peers, bench_generation, bench_training, bench_monitor,
                                  bench_freeze, bench_scaling, bench_grid)}


def _paths(args) -> tuple[Path, Path]:
    if args.quick:
        out = RESULTS / "quick"
        return Path(args.json or out / "quick.json"), Path(args.markdown or out / "BENCHMARKS.md")
    return Path(args.json or RESULTS / "latest.json"), Path(args.markdown or ROOT / "BENCHMARKS.md")


def _command(argv: list[str]) -> str:
    return " ".join(["python -m benchmarks", *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run on a tiny model, one repeat")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--model", default=None, help="model spec (default: built-in model; --quick: tiny:llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default=None, help="results JSON (default benchmarks/results/latest.json)")
    parser.add_argument("--markdown", default=None, help="markdown to rewrite (default BENCHMARKS.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown from the JSON, measure nothing")
    args = parser.parse_args(argv)
    json_path, md_path = _paths(args)

    if args.render_only:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        scaling = data["benchmarks"].get(bench_scaling.NAME)
        if scaling and scaling.get("plot"):  # the plot is drawn from the JSON too
            bench_scaling.plot(scaling, ROOT / scaling["plot"])
        md_path.write_text(report.render(data, md_path, BENCHMARKS), encoding="utf-8")
        print(f"wrote {md_path} from {json_path}")
        return

    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    # a module with DEFAULT = False (the grid, which runs for as long as the grid) runs only when named
    selected = [name for name, module in BENCHMARKS.items()
                if name in only or not only and getattr(module, "DEFAULT", True)]
    mode = "quick" if args.quick else "full"
    spec = args.model or (common.QUICK_MODEL if args.quick else common.DEFAULT_MODEL)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    common.set_threads(args.threads)
    # Keep earlier results of benchmarks not rerun now (same mode), so the markdown stays complete.
    data = {"benchmarks": {}}
    if only and json_path.is_file():
        previous = json.loads(json_path.read_text(encoding="utf-8"))
        if previous.get("mode") == mode:
            data = previous
    started = time.perf_counter()
    run_info = {"command": _command(argv), "machine": common.machine_info()}
    partial = bool(only) and "command" in data
    if partial:  # the header keeps describing the full run; partial reruns are listed under it
        data.setdefault("reruns", []).append(run_info)
    else:
        data.update({"mode": mode, "model": spec, "threads": args.threads, **run_info})
        data.pop("reruns", None)
        data.pop("history", None)
    print(f"loading {spec} ...", flush=True)
    loaded = common.load(spec)
    for name in selected:
        module = BENCHMARKS[name]
        print(f"running {name} ...", flush=True)
        params = dict(module.PARAMS[mode])
        if name == bench_scaling.NAME:
            params["out_dir"] = json_path.parent
        begin = time.perf_counter()
        result = module.run(loaded, **params)
        result["elapsed_s"] = time.perf_counter() - begin
        if result.get("plot"):  # repo-relative, so the markdown can link it from wherever it is written
            result["plot"] = os.path.relpath(json_path.parent.resolve() / result["plot"], ROOT)
        result["date"] = common.machine_info()["date"]
        result["command"] = _command([*(["--quick"] if args.quick else []), "--only", name]
                                     + (["--model", args.model] if args.model else []))
        previous = data["benchmarks"].get(name)
        if previous is not None:  # keep the verdicts of earlier runs: on a shared machine they can differ
            data.setdefault("history", {}).setdefault(name, []).append(report.history_entry(previous))
        data["benchmarks"][name] = result
        print("\n".join(module.render(result)), flush=True)
        _save(json_path, data)  # after each benchmark: a crash later keeps what was measured
    finished = {"elapsed_s": time.perf_counter() - started,
                "load_average_end": common.machine_info().get("load_average")}
    if partial:
        run_info.update(finished)
    else:
        data["elapsed_s"] = finished["elapsed_s"]
        data["machine"]["load_average_end"] = finished["load_average_end"]
    _save(json_path, data)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report.render(data, md_path, BENCHMARKS), encoding="utf-8")
    print(f"wrote {json_path} and {md_path} ({finished['elapsed_s'] / 60:.1f} min)")


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
