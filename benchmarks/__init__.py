"""ssah's performance harness: `python -m benchmarks` runs every benchmark and rewrites BENCHMARKS.md.

Each `bench_*.py` module is importable (`run(loaded, ...) -> dict`, `render(result) -> markdown lines`)
and runnable as a script that prints its table.
"""
