#!/usr/bin/env bash
# Two builds of raft_kv measured against each other on this machine, alternately (A B A B ...),
# each run against the same sync-replication baseline (bench/run.sh), so a change's cost shows
# as a ratio taken in the same sitting despite the machine's drift.
#
#   bench/compare_builds.sh OLD_COMMIT [NEW_COMMIT]      NEW defaults to the working tree
#   BENCH_ROUNDS=2 BENCH_OPS="set_leader syncrep" BENCH_CLIENTS="1 32" bench/compare_builds.sh 926f150
#
# Each commit is built (release) in a worktree with its own target directory, and its library
# and SQL script kept aside; a round installs one, then runs bench/run.sh. The working tree's
# build is installed again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 NEW=${2:-}
ROUNDS=${BENCH_ROUNDS:-2}
export BENCH_OPS=${BENCH_OPS:-set_leader syncrep}
export BENCH_CLIENTS=${BENCH_CLIENTS:-1 32}
LIB=$(pg_config --pkglibdir) EXT=$(pg_config --sharedir)/extension
OUT=$(mktemp -d /tmp/raft_kv-compare-XXXXXX)
trap 'git worktree remove --force "$OUT/tree" >/dev/null 2>&1 || true' EXIT

build() { # build COMMIT|"" DIR
  mkdir -p "$2"
  if [ -n "$1" ]; then
    git worktree remove --force "$OUT/tree" >/dev/null 2>&1 || true
    git worktree add -f "$OUT/tree" "$1" >/dev/null
    (cd "$OUT/tree" && CARGO_TARGET_DIR=/tmp/raft_kv-compare-target-$1 cargo pgrx install --release --pg-config "$(command -v pg_config)" >/dev/null)
  else
    scripts/setup.sh >/dev/null
  fi
  # Each build has its own version: the installed control file names it.
  local version
  version=$(awk -F"'" '/^default_version/ { print $2 }' "$EXT/raft_kv.control")
  cp "$LIB/raft_kv.so" "$EXT/raft_kv.control" "$EXT/raft_kv--$version.sql" "$2/"
}
install() { # the library, control file and SQL script of one build, and no other version's script
  rm -f "$EXT"/raft_kv--*.sql
  cp "$1/raft_kv.so" "$LIB/"
  cp "$1"/raft_kv.control "$1"/raft_kv--*.sql "$EXT/"
}

echo "# building $OLD and ${NEW:-the working tree}" >&2
build "$OLD" "$OUT/old"
build "$NEW" "$OUT/new"
for r in $(seq 1 "$ROUNDS"); do
  for which in old new; do
    install "$OUT/$which"
    label=$([ $which = old ] && echo "$OLD" || echo "${NEW:-working tree}")
    echo "## round $r: $label"
    bench/run.sh | grep -E '^\| (raft_set|PG|raft_get|operation|---)'
  done
done
install "$OUT/new"
rm -rf "$OUT/old" "$OUT/new"
