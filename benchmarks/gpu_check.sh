#!/usr/bin/env bash
# One-GPU check (one H100/H200, under 5 minutes with the default --budget 270, compiling
# included): library vs reference Heun speed, BDIA overhead and round trip; writes
# docs/benchmarks/gpu.md. Options go to benchmarks/gpu_check.py (--smoke: CPU, seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_check.py "$@"
