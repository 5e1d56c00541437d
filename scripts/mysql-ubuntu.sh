#!/usr/bin/env bash
# Fetches MySQL 8.0 (Ubuntu 22.04's mysql-server-core-8.0, the 8.0 line still in wide use) and
# the libraries it needs that Debian bookworm lacks or has under other sonames, unpacked under
# DIR (nothing is installed), and writes DIR/mysqld: that server run with those libraries. Its
# C library is the machine's (bookworm's 2.36 is newer than the 2.35 it was built against).
# For the MySQL test of change data capture, which CI does not run (it needs a mirror outside
# Debian's):
#
#   bash scripts/mysql-ubuntu.sh /var/tmp/mysql8
#   SLUICE_TEST_MYSQLD=/var/tmp/mysql8/mysqld cargo nextest run --run-ignored only -E 'test(mysql_server)'
set -euo pipefail
. "$(dirname "$0")/unpack-debs.sh"
dir=${1:?usage: scripts/mysql-ubuntu.sh DIR}
mkdir -p "$dir/debs" "$dir/root"
dir=$(cd "$dir" && pwd)
mirror=http://archive.ubuntu.com/ubuntu
: > "$dir/Packages"
for d in jammy-updates/main jammy/main jammy/universe; do
  curl -fsS "$mirror/dists/$d/binary-amd64/Packages.xz" | xz -dc >> "$dir/Packages"
done
# jammy-updates comes first in Packages: its newer stanzas win.
unpack_debs "$mirror" "$dir" mysql-server-core-8.0 libicu70 libprotobuf-lite23 libmecab2 libaio1 libevent-core-2.1-7 \
  libevent-pthreads-2.1-7 libnuma1 libtirpc3
lib=$dir/root/usr/lib/x86_64-linux-gnu
cat > "$dir/mysqld" <<EOS
#!/bin/sh
LD_LIBRARY_PATH=$lib:$dir/root/lib/x86_64-linux-gnu exec $dir/root/usr/sbin/mysqld --no-defaults \\
  --basedir=$dir/root/usr --lc-messages-dir=$dir/root/usr/share/mysql "\$@"
EOS
chmod +x "$dir/mysqld"
"$dir/mysqld" --version | sed "s/^/ok: /"
