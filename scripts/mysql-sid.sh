#!/usr/bin/env bash
# Fetches a MySQL server from Debian unstable (bookworm has none; it is MySQL 9.x there) with
# the newer C and C++ runtime it needs, unpacked under DIR (nothing is installed), and writes
# DIR/mysqld: that server run with its own loader and libraries. For the MySQL test of change
# data capture, which CI does not run (it needs Debian unstable's moving package set):
#
#   bash scripts/mysql-sid.sh /var/tmp/mysql-sid
#   SLUICE_TEST_MYSQLD=/var/tmp/mysql-sid/mysqld cargo nextest run --run-ignored only -E 'test(mysql_server)'
set -euo pipefail
. "$(dirname "$0")/unpack-debs.sh"
dir=${1:?usage: scripts/mysql-sid.sh DIR}
mkdir -p "$dir/debs" "$dir/root"
dir=$(cd "$dir" && pwd)
mirror=http://deb.debian.org/debian
curl -fsS "$mirror/dists/sid/main/binary-amd64/Packages.xz" | xz -dc > "$dir/Packages"
# The server and what the machine's bookworm libraries cannot stand in for (newer glibc and
# libstdc++, sonames bookworm lacks); the rest of its libraries come from the machine.
unpack_debs "$mirror" "$dir" mysql-server-core libc6 libstdc++6 libgcc-s1 libicu78 libaio1t64 libprotobuf-lite32t64 \
  libprotobuf32t64 libtirpc3t64 libgoogle-perftools4t64 libtcmalloc-minimal4t64 libmecab2 libnuma1 libfido2-1 libcurl4t64 \
  libssl3t64 libzstd1 liblz4-1 zlib1g libcbor0.10 libunwind8
lib=$dir/root/usr/lib/x86_64-linux-gnu
cat > "$dir/mysqld" <<EOF
#!/bin/sh
exec $lib/ld-linux-x86-64.so.2 --library-path $lib:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu \\
  $dir/root/usr/sbin/mysqld --no-defaults --basedir=$dir/root/usr --lc-messages-dir=$dir/root/usr/share/mysql "\$@"
EOF
chmod +x "$dir/mysqld"
"$dir/mysqld" --version | sed "s/^/ok: /"
