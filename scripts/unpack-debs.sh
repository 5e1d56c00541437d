# Sourced by scripts/mysql-*.sh. unpack_debs MIRROR DIR PACKAGE...: fetches each package
# named in DIR/Packages (the first stanza of a name wins) from MIRROR into DIR/debs, once, and
# unpacks it under DIR/root. Nothing is installed.
unpack_debs() {
  local mirror=$1 dir=$2 p f
  shift 2
  for p in "$@"; do
    f=$(awk -v P="$p" '$0 == "Package: " P {f = 1} f && /^Filename:/ {print $2; exit}' "$dir/Packages")
    [ -n "$f" ] || { echo "package $p is not in $mirror any more" >&2; exit 1; }
    [ -f "$dir/debs/$(basename "$f")" ] || curl -fsS -o "$dir/debs/$(basename "$f")" "$mirror/$f"
    dpkg-deb -x "$dir/debs/$(basename "$f")" "$dir/root"
  done
}
