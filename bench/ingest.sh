#!/usr/bin/env bash
# Issue 2 benchmark: HTTP ingest into the log, end-to-end into the lake, freshness at a
# steady 50k events/s, peak RSS, lake bytes/event — and DuckDB converting the same NDJSON
# into date-partitioned zstd Parquet in the same run (end to end: three alternating rounds,
# the median round reported). Writes bench/RESULTS.md.
#
#   bash bench/ingest.sh              # 1,000,000 events, release build
#   EVENTS=200000 bash bench/ingest.sh
#   SLUICE_BIN=/path/to/sluice bash bench/ingest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sluice-target}"
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release -p sluice
  SLUICE_BIN="$CARGO_TARGET_DIR/release/sluice"
fi
python3 -c "import duckdb" 2>/dev/null || python3 -m pip install -q duckdb
exec python3 bench/ingest_bench.py --bin "$SLUICE_BIN" --events "${EVENTS:-1000000}" --out bench/RESULTS.md
