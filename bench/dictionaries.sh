#!/usr/bin/env bash
# Issue 5 benchmark: stored bytes/event and CPU per event of log batches of 1, 16, 100 and
# 1000 events under none, lz4, zstd-3, zstd-3 + trained dictionary, auto (the default),
# gzip-6 and brotli 5/9; then the same events written through the real log one batch per
# request, with the dictionary trained as the server does, and re-packed. Replaces its
# section of bench/RESULTS.md.
#
#   bash bench/dictionaries.sh                # 200,000 events (the issue's workload)
#   EVENTS=50000 bash bench/dictionaries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sluice-target}"
# The test profile (dependencies and ours at opt-level 2): the same build the tests use.
cargo build --workspace --example dictionary_bench
events="$(mktemp)"
table="$(mktemp)"
trap 'rm -f "$events" "$table"' EXIT
python3 ../shared/bench/gen_events.py --count "${EVENTS:-200000}" > "$events"
DICT_BENCH_OUT="$table" "$CARGO_TARGET_DIR/debug/examples/dictionary_bench" "$events"
python3 - "$table" bench/RESULTS.md <<'PY'
import os, platform, subprocess, sys, time
table, out = sys.argv[1], sys.argv[2]
SECTION = "## Compression dictionaries (issue 5)"
cpu = "unknown CPU"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
head = (f"{SECTION}\n\nRun {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bash bench/dictionaries.sh` "
        f"on {os.cpu_count()} cores, {cpu}; `gen_events.py` reference workload. Each cell: stored bytes/event "
        f"(42-byte batch header included) · encode / decode CPU ns per event.\n\n")
text = head + open(table).read().rstrip("\n") + "\n"
old = open(out).read() if os.path.exists(out) else ""
if SECTION in old:
    start = old.index(SECTION)
    end = old.find("\n## ", start + len(SECTION))
    old = old[:start] + (old[end + 1:] if end >= 0 else "")
with open(out, "w") as f:
    f.write(old.rstrip("\n") + "\n\n" + text)
PY
