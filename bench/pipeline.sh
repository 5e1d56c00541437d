#!/usr/bin/env bash
# Issue 3 benchmark: (a) the reference workload through a pipeline (filter + map + route into
# three lake tables) against issue 2's plain landing of the same events, alternating runs in
# the same invocation; (b) enrichment from a loopback service (the `slow_service` example,
# answering after 5 ms). Writes its section of bench/RESULTS.md ("Pipelines (issue 3)").
#
#   bash bench/pipeline.sh              # 1,000,000 events, release build
#   EVENTS=200000 SLUICE_BIN=/path/to/sluice bash bench/pipeline.sh   # a given binary; dev-profile service
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sluice-target}"
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release -p sluice
  cargo build --release --workspace --example slow_service
  SLUICE_BIN="$CARGO_TARGET_DIR/release/sluice"
  SERVICE="$CARGO_TARGET_DIR/release/examples/slow_service"
else
  cargo build --workspace --example slow_service
  SERVICE="$CARGO_TARGET_DIR/debug/examples/slow_service"
fi
exec python3 bench/pipeline_bench.py --bin "$SLUICE_BIN" --service "$SERVICE" --events "${EVENTS:-1000000}" \
  --rounds "${ROUNDS:-3}" --out bench/RESULTS.md
