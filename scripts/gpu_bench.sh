#!/usr/bin/env bash
# The GPU measurements of results/bench/ (performance issue), one stage per device call.
# Usage: scripts/gpu_bench.sh STAGE OUTDIR   with STAGE one of: eager1, eager1-nographs, eager4, mapmem4,
# compile1 (PROFILE=1 adds --profile-dir to the eager1 stages; COMPILE_MODE sets the compile mode).
# Needs diffusers (and its importlib_metadata) importable; attnguide is run from src/.
set -euo pipefail
stage=$1
out=$2
mkdir -p "$out"
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
common=(--preset sd15 --dtype float16 --resolution 512 --steps 50)
case "$stage" in
  eager1)
    python3 -m attnguide bench "${common[@]}" --batch-size 1 --repeats 3 --warmup 1 \
      ${PROFILE:+--profile-dir "$out"} --out "$out/sd15-b1-eager.json" ;;
  eager1-nographs)
    python3 -m attnguide bench "${common[@]}" --batch-size 1 --repeats 3 --warmup 1 --no-cuda-graphs \
      ${PROFILE:+--profile-dir "$out"} --out "$out/sd15-b1-eager-nographs.json" ;;
  eager4)
    python3 -m attnguide bench "${common[@]}" --batch-size 4 --repeats 3 --warmup 1 \
      --map-memory --out "$out/sd15-b4-eager.json" ;;
  mapmem4)
    python3 -m attnguide bench "${common[@]}" --batch-size 4 --repeats 3 --warmup 1 --arms cfg+sag \
      --map-memory --out "$out/sd15-b4-map-memory.json" ;;
  compile1)
    python3 -m attnguide bench "${common[@]}" --batch-size 1 --repeats 3 --warmup 1 \
      --arms none,cfg,cfg+sag --compile ${COMPILE_MODE:+--compile-mode "$COMPILE_MODE"} \
      --out "$out/sd15-b1-compile${COMPILE_MODE:+-$COMPILE_MODE}.json" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
