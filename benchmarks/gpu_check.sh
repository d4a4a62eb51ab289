#!/usr/bin/env bash
# The one-GPU check (one H100/H200, about 5.5 minutes): gpu_check.py (under 5 minutes with
# its default --budget 270, compiling included) writes docs/benchmarks/gpu.md, then
# fid_speed.py (about a minute, 180 s at most) writes docs/benchmarks/fid_speed.md.
# Options go to gpu_check.py. Without a GPU both run their CPU smoke modes, writing no page.
# It needs no installed bdia (the checkout goes first on PYTHONPATH) and runs $PYTHON, else
# python3; one script's failure does not stop the other, and the status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
status=0
"$python" benchmarks/gpu_check.py "$@" || status=$?
"$python" benchmarks/fid_speed.py || { rc=$?; [[ $status -ne 0 ]] || status=$rc; }
exit "$status"
