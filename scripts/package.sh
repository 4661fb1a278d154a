#!/usr/bin/env bash
# Builds the Debian package postgresql-15-raft-kv_<version>_amd64.deb (PGDG naming) into
# target/deb/ from `cargo pgrx package`; prints its path. Install it with
#   apt install ./target/deb/postgresql-15-raft-kv_<version>_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config

scripts/setup.sh --no-install >/dev/null
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is required (Debian's dpkg)" >&2; exit 1; }

version=$(awk -F"'" '/^default_version/ { print $2 }' raft_kv.control)
crate_version=$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)
[ "$version" = "$crate_version" ] || { echo "raft_kv.control says $version, Cargo.toml $crate_version" >&2; exit 1; }
arch=$(dpkg --print-architecture)
name=postgresql-15-raft-kv
staging=target/release/raft_kv-pg15
out=target/deb
pkg="$out/${name}_${version}_${arch}"

rm -rf "$staging" "$pkg"
cargo pgrx package --pg-config "$PG_CONFIG" >/dev/null
mkdir -p "$pkg/DEBIAN" "$pkg/usr/share/doc/$name/examples"
cp -a "$staging/usr" "$pkg/"
# As Debian's own packages: no debug symbols (pgrx's entry points are dynamic symbols, kept).
strip --strip-unneeded "$pkg"/usr/lib/postgresql/15/lib/raft_kv.so
cp README.md "$pkg/usr/share/doc/$name/"
cp examples/*.py scripts/certs.sh "$pkg/usr/share/doc/$name/examples/"
cat > "$pkg/usr/share/doc/$name/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: raft_kv
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: raft_kv developers <raft-kv@localhost>
Installed-Size: $size
Depends: postgresql-15, libc6 (>= 2.36), libgcc-s1
Section: database
Priority: optional
Description: Raft-replicated key-value store inside PostgreSQL 15
 raft_kv makes each PostgreSQL server a Raft node: three or five servers that
 load it elect a leader and keep a replicated, linearizable key-value store
 (watch, transactions, leases, locks) that any SQL client can use.
 Load it with shared_preload_libraries = 'raft_kv' and CREATE EXTENSION raft_kv.
CONTROL
(cd "$pkg" && find usr -type f -exec md5sum {} + > DEBIAN/md5sums)
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$pkg.deb" >/dev/null
rm -rf "$pkg"
echo "$pkg.deb"
