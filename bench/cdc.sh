#!/usr/bin/env bash
# Issue 4 benchmark: change data capture from a PostgreSQL the script starts (initdb on a free
# port): (a) streaming 1,000,000 changes vs pg_recvlogical on the same WAL; (b) an initial
# snapshot of 1,000,000 rows vs COPY of the same table. Then the same against a MariaDB it
# starts: vs mariadb-binlog decoding the same binlog, and vs SELECT ... INTO OUTFILE. Writes
# its sections of bench/RESULTS.md.
#
#   bash bench/cdc.sh                      # release build, both databases
#   CHANGES=200000 ROWS=200000 SLUICE_BIN=/path/to/sluice bash bench/cdc.sh
#   ONLY=mysql bash bench/cdc.sh           # or ONLY=postgres
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sluice-target}"
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release -p sluice
  SLUICE_BIN="$CARGO_TARGET_DIR/release/sluice"
fi
if [ "${ONLY:-postgres}" = postgres ] || [ -z "${ONLY:-}" ]; then
  python3 bench/cdc_bench.py --bin "$SLUICE_BIN" --changes "${CHANGES:-1000000}" --rows "${ROWS:-1000000}" --out bench/RESULTS.md
fi
if [ "${ONLY:-mysql}" = mysql ]; then
  python3 bench/mysql_cdc_bench.py --bin "$SLUICE_BIN" --changes "${CHANGES:-1000000}" --rows "${ROWS:-1000000}" --out bench/RESULTS.md
fi
