#!/usr/bin/env bash
# Issue 3 benchmark (a): the reference workload through a pipeline (filter + map + route into
# three lake tables) against issue 2's plain landing of the same events, in the same run.
# Appends its table to bench/RESULTS.md (section "Pipelines").
#
#   bash bench/pipeline.sh              # 1,000,000 events, release build
#   EVENTS=200000 SLUICE_BIN=/path/to/sluice bash bench/pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sluice-target}"
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release -p sluice
  SLUICE_BIN="$CARGO_TARGET_DIR/release/sluice"
fi
exec python3 bench/pipeline_bench.py --bin "$SLUICE_BIN" --events "${EVENTS:-1000000}" --out bench/RESULTS.md
