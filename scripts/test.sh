#!/usr/bin/env bash
# Runs every test of Sluice. On a fresh Debian machine it first installs what is missing
# (Rust toolchain must be present; cargo-nextest, Python readers from pip).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/sluice-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

need() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif need sudo; then sudo "$@"; else "$@"; fi; }

if ! need cargo; then
  echo "error: cargo not found. Install Rust (https://rustup.rs) and re-run." >&2
  exit 1
fi
if ! need cc || ! need python3 || ! python3 -m pip --version >/dev/null 2>&1; then
  echo "installing build tools and python3 with apt-get..." >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq build-essential python3 python3-pip >/dev/null
fi
# Servers the connector tests start their own instances of (never the machine's shared ones).
if ! need openssl; then
  echo "installing openssl with apt-get (the https tests make a private CA with it)..." >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq openssl >/dev/null
fi
if ! need redis-server; then
  echo "installing redis-server with apt-get (the tests start their own instances)..." >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq redis-server >/dev/null
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing the PostgreSQL server with apt-get (the tests create their own clusters)..." >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq postgresql >/dev/null
fi
if ! need mariadbd || ! need mariadb-install-db || ! need mariadb; then
  echo "installing the MariaDB server and client with apt-get (the tests start their own instances)..." >&2
  as_root apt-get update -qq
  as_root apt-get install -y -qq mariadb-server mariadb-client >/dev/null
fi
# As root, initdb runs as the postgres user (it refuses root); runuser comes with util-linux.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home postgres
fi
# Readers we did not write, used by the interoperability tests.
if ! python3 -c "import deltalake, pyarrow, duckdb" 2>/dev/null; then
  echo "installing python deltalake, pyarrow, duckdb with pip..." >&2
  python3 -m pip install -q deltalake pyarrow duckdb 2>/dev/null \
    || python3 -m pip install -q --break-system-packages deltalake pyarrow duckdb \
    || { echo "error: could not pip install deltalake pyarrow duckdb" >&2; exit 1; }
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest..." >&2
  cargo install --locked cargo-nextest
fi

cargo build --workspace --tests --bins
cargo nextest run --workspace --no-fail-fast "$@"
cargo test --workspace --doc
