#!/usr/bin/env bash
# The one-GPU check (one H100/H200, about 5.5 minutes): gpu_check.py (under 5 minutes with
# its default --budget 270, compiling included) writes docs/benchmarks/gpu.md, then
# fid_speed.py (about a minute, 180 s at most) writes docs/benchmarks/fid_speed.md.
# `--outdir DIR` writes the two pages as DIR/gpu.md and DIR/fid_speed.md instead (each page
# is rewritten after every step, so a run stopped early still leaves what it measured);
# other options go to gpu_check.py. Without a GPU both run their CPU smoke modes, writing no
# page unless --outdir is given.
# It needs no installed bdia (the checkout goes first on PYTHONPATH) and runs $PYTHON, else
# python3; one script's failure does not stop the other, and the status is the first failure's.
# The two share one limit, $GPU_CHECK_TOTAL_S (450 s): gpu_check.py run to its hard stop
# (budget + 15 s) and fid_speed.py to its full 180 s would together pass 8 minutes, so
# fid_speed.py is given what is left of the limit when that is less (60 s at the least).
set -uo pipefail
total="${GPU_CHECK_TOTAL_S:-450}"
if [[ ! $total =~ ^[0-9]+$ ]]; then
  echo "GPU_CHECK_TOTAL_S must be whole seconds, got '$total'" >&2
  exit 2
fi
total=$((10#$total)) # not octal for a leading zero
SECONDS=0
outdir=""
args=()
while (($#)); do
  case "$1" in
    --outdir) outdir="${2:?--outdir needs a folder}"; shift 2 ;;
    --outdir=*) outdir="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
gpu_out=()
fid_out=()
if [[ -n $outdir ]]; then
  mkdir -p "$outdir" && outdir="$(cd "$outdir" && pwd)" || exit 2
  gpu_out=(--out "$outdir/gpu.md")
  fid_out=(--out "$outdir/fid_speed.md")
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
status=0
"$python" benchmarks/gpu_check.py ${args[@]+"${args[@]}"} ${gpu_out[@]+"${gpu_out[@]}"} || status=$?
left=$((total - SECONDS))
if ((left < 180)); then
  fid_out+=(--budget "$((left > 60 ? left : 60))")
fi
"$python" benchmarks/fid_speed.py ${fid_out[@]+"${fid_out[@]}"} || { rc=$?; [[ $status -ne 0 ]] || status=$rc; }
exit "$status"
