#!/usr/bin/env bash
# One-GPU check (H100, under 8 minutes): throughput, BDIA overhead, round-trip error.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_check.py "$@"
