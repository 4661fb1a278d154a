#!/usr/bin/env bash
# Every raft_kv test: unit tests of the pure core, `cargo pgrx test pg15` inside one
# PostgreSQL, and the multi-node tests on real local clusters. Installs what is missing first.
# Exits non-zero if any test fails; ends with each runner's summary line.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# Backtraces in server processes would be appended to every SQL error's DETAIL.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

scripts/setup.sh --no-install || { echo "setup failed" >&2; exit 1; }

# Without -e a failed mktemp would leave $log empty and the stage logs in /.
log=$(mktemp -d) || { echo "cannot make a temporary directory (TMPDIR=${TMPDIR:-unset})" >&2; exit 1; }
# The test clusters live here, so leftovers are this run's own (not another run's on the
# same machine); the postgres user must be able to reach it.
work=$(mktemp -d /tmp/raft_kv-run-XXXXXX) || { echo "cannot make a directory in /tmp" >&2; exit 1; }
chmod 755 "$work"
trap 'rm -rf "$log"; pkill -9 -f "$work/" 2>/dev/null; rm -rf "$work"' EXIT
failed=0
summary=()

stage() { # stage NAME command...
  local name=$1; shift
  echo "==> $name"
  "$@" 2>&1 | tee "$log/$name.out"
  local rc=${PIPESTATUS[0]}
  local lines
  lines=$(grep -E '^test result:' "$log/$name.out" | grep -v ' 0 passed; 0 failed' | sed "s/^/$name: /")
  [ -n "$lines" ] && summary+=("$lines")
  if [ "$rc" -ne 0 ]; then
    failed=1
    summary+=("$name: FAILED (exit $rc)")
  fi
}

stage core cargo test -p raft_kv_core --lib --tests

pgdata=$(mktemp -d /tmp/raft_kv-pgrx-XXXXXX)
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$pgdata"
  stage pgrx cargo pgrx test pg15 --runas postgres --pgdata "$pgdata"
else
  stage pgrx cargo pgrx test pg15 --pgdata "$pgdata"
fi
rm -rf "$pgdata"

# `cargo pgrx test` installed its test build; the cluster tests run the release build.
stage install scripts/setup.sh
stage cluster env TMPDIR="$work" cargo test -p raft_kv_tests --tests -- --test-threads=1

# Upgrading in place from 0.1.0: built once from its commit (about 4 minutes the first time),
# then run from a copy of the PostgreSQL installation beside the current build.
upgrade_test() {
  local bin
  bin=$(scripts/upgrade_fixture.sh) || return 1
  RAFT_KV_OLD_BIN="$bin" TMPDIR="$work" cargo test -p raft_kv_tests --test upgrade -- --ignored --test-threads=1
}
stage upgrade upgrade_test

# The Debian package: build it, install it with dpkg, run a cluster from the installed files,
# then remove it (and put the development build back).
package_test() {
  local deb
  deb=$(scripts/package.sh) || return 1
  sudo_if_needed dpkg -i "$deb" || return 1
  TMPDIR="$work" cargo test -p raft_kv_tests --test package -- --ignored --test-threads=1
  local rc=$?
  sudo_if_needed dpkg -r postgresql-15-raft-kv >/dev/null || rc=1
  scripts/setup.sh >/dev/null || rc=1
  return $rc
}
sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
stage package package_test

# Nothing may outlive the tests: no server, no data directory.
rm -rf "$work"/raft_kv-test-template-*
if pgrep -f "$work/" >/dev/null; then
  summary+=("leftovers: FAILED (servers still running: $(pgrep -f "$work/" | tr '\n' ' '))")
  failed=1
fi
if ls -d "$work"/raft_kv-test-* >/dev/null 2>&1; then
  summary+=("leftovers: FAILED (directories left: $(ls -d "$work"/raft_kv-test-* | tr '\n' ' '))")
  failed=1
fi

read -r passed failures < <(cat "$log"/*.out | awk '/^test result:/ {
  for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
  END { print p + 0, f + 0 }')
[ "$failed" = 1 ] && [ "${failures:-0}" = 0 ] && failures=1

echo
echo "==> summary"
printf '%s\n' "${summary[@]}"
echo "total: ${passed:-0} passed, ${failures:-0} failed"
exit $failed
