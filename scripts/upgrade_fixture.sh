#!/usr/bin/env bash
# Builds what the upgrade test (tests/tests/upgrade.rs) starts from: raft_kv 0.1.0 (commit
# 404003e, the last 0.1.0 on main) installed into a copy of the PostgreSQL 15 installation.
# PostgreSQL finds its lib and share directories relative to its binaries, so the copy runs as
# a second installation beside the system one, which holds the current build. Prints the
# copy's bin directory. Cached: a second run only prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
OLD_COMMIT=404003e007defea670f0aa5e8afc7f64923151d1
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
root=${TMPDIR:-/tmp}/raft_kv-upgrade-0.1.0
tree=$root/pg
bin=$tree/usr/lib/postgresql/15/bin
if [ -f "$root/done-$OLD_COMMIT" ]; then
  echo "$bin"
  exit 0
fi
rm -rf "$root/pg" "$root/pkg" "$root/src"
mkdir -p "$root/src" "$tree/usr/lib/postgresql" "$tree/usr/share/postgresql"
have() { git cat-file -e "$OLD_COMMIT^{commit}" 2>/dev/null; }
# A shallow clone lacks it: deepen it, or fetch that commit.
have || git fetch -q --unshallow 2>/dev/null || true
have || git fetch -q origin "$OLD_COMMIT" 2>/dev/null || true
have || { echo "commit $OLD_COMMIT (raft_kv 0.1.0) is not in this clone, and could not be fetched" >&2; exit 1; }
git archive "$OLD_COMMIT" | tar -x -C "$root/src"
# A target directory of its own: sharing the current one would let cargo take one build's
# raft_kv_core for the other's (same name and version, older sources).
(cd "$root/src" && CARGO_TARGET_DIR="$root/target" cargo pgrx package --pg-config "$PG_CONFIG" \
  --out-dir "$root/pkg" >"$root/build.log" 2>&1) || { tail -30 "$root/build.log" >&2; exit 1; }
cp -a /usr/lib/postgresql/15 "$tree/usr/lib/postgresql/"
cp -a /usr/share/postgresql/15 "$tree/usr/share/postgresql/"
rm -f "$tree"/usr/share/postgresql/15/extension/raft_kv*
cp "$root/pkg/usr/lib/postgresql/15/lib/raft_kv.so" "$tree/usr/lib/postgresql/15/lib/"
cp "$root/pkg/usr/share/postgresql/15/extension/"raft_kv* "$tree/usr/share/postgresql/15/extension/"
grep -q "default_version = '0.1.0'" "$tree/usr/share/postgresql/15/extension/raft_kv.control"
rm -rf "$root/src"
chmod -R go+rX "$root"
touch "$root/done-$OLD_COMMIT"
echo "$bin"
