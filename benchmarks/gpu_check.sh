#!/usr/bin/env bash
# The prepared GPU check (issue 14): CUDA-event latency vs torch.utils.benchmark, GPU peak memory vs
# max_memory_allocated, BranchyNet's latency saving vs its MACs saving on GPU, trainer images/s vs a
# bare loop, one short CIFAR-10 training cell. Under 8 minutes on one GPU; skips (exit 0) without one.
#   benchmarks/gpu_check.sh [--data-root DIR]      (DIR: CIFAR-10; else synthetic data for the cell)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
