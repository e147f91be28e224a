#!/usr/bin/env bash
# GPU benchmark: a 7B-shaped Llama with random bf16 weights (no internet, no weights needed).
#   bash benchmarks/gpu.sh                        # on a CUDA machine with torch, transformers, accelerate
#   SSAH_GPU_BENCH_TINY=1 bash benchmarks/gpu.sh  # tiny config, runs on the CPU as well (smoke test)
# Prints one markdown table; writes benchmarks/results/gpu.json, which BENCHMARKS.md then includes
# (python -m benchmarks --render-only). Hard limit of 8 minutes. With vLLM installed (pip install
# "ssah[vllm]") it also times the vllm evaluation engine against the hf one.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# Use the checkout without installing it (ssah's own dependencies beyond torch/transformers are
# only imported lazily on the paths this script takes).
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch, transformers' || { echo "gpu.sh needs torch and transformers" >&2; exit 1; }
exec timeout 480 "$PYTHON" -m benchmarks.gpu_bench
