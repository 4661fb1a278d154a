#!/usr/bin/env bash
# raft_kv benchmarks with pgbench against a fresh local 3-node cluster.
#
#   bench/run.sh                 1, 8 and 32 clients, 10 s per run
#   BENCH_SECONDS=30 BENCH_CLIENTS="1 8 32 64" bench/run.sh
#
# Operations: raft_set on the leader, raft_set on a follower (forwarded), raft_get on a follower
# (linearizable: a ReadIndex round trip to the leader; and local), and, for comparison, a plain
# upsert into an ordinary table on the same server (no consensus).
# The extension must be installed (scripts/demo.sh or scripts/setup.sh do it).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-1 8 32}
DIR=$(mktemp -d /tmp/raft_kv-bench-XXXXXX)
PG_BIN=/usr/lib/postgresql/15/bin
cluster() { scripts/cluster.sh "$@" --dir "$DIR"; }
trap 'cluster down >/dev/null 2>&1 || true' EXIT

cluster up 3 >/dev/null
port() { awk -v i="$1" '$1 == i { print $2 }' "$DIR/nodes"; }
q() { "$PG_BIN/psql" -X -Atq -h 127.0.0.1 -p "$(port "$1")" -U postgres -d postgres -c "$2"; }

leader=""
for _ in $(seq 1 100); do
  leader=$(q 1 "SELECT coalesce(leader_id, 0) FROM raft_status()")
  [ "$leader" != 0 ] && break
  sleep 0.1
done
[ "$leader" != 0 ] || { echo "no leader" >&2; exit 1; }
follower=$(( leader % 3 + 1 ))
# Preload the keys so raft_get finds them, and create the plain comparison table.
q "$leader" "SELECT count(raft_set('bench/' || g, 'value-' || g)) FROM generate_series(1, 10000) g" >/dev/null
q "$leader" "CREATE TABLE bench_plain_kv (key text PRIMARY KEY, value text NOT NULL)"
q "$leader" "INSERT INTO bench_plain_kv SELECT 'bench/' || g, 'value-' || g FROM generate_series(1, 10000) g"

echo "# raft_kv pgbench, $(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS_PER_RUN}s per run"
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# postgres: $($PG_BIN/postgres --version), fsync=$(q 1 'SHOW fsync'), synchronous_commit=$(q 1 'SHOW synchronous_commit')"
printf '| %-28s | %7s | %10s | %14s |\n' operation clients "ops/s" "avg latency ms"
printf '|%s|%s|%s|%s|\n' "------------------------------" "---------" "------------" "----------------"
run() { # run LABEL NODE SCRIPT CLIENTS
  local out tps lat
  out=$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$(port "$2")" -U postgres -c "$4" -j "$(( $4 < 2 ? $4 : 2 ))" \
        -T "$SECONDS_PER_RUN" -f "bench/$3" postgres 2>&1) || { echo "$out" >&2; exit 1; }
  tps=$(echo "$out" | awk '/^tps = / { printf "%.0f", $3 }')
  lat=$(echo "$out" | awk '/^latency average = / { print $4 }')
  printf '| %-28s | %7s | %10s | %14s |\n' "$1" "$4" "$tps" "$lat"
}
for c in $CLIENTS; do
  run "raft_set on the leader" "$leader" set.sql "$c"
  run "raft_set on a follower" "$follower" set.sql "$c"
  run "raft_get, linearizable" "$follower" get.sql "$c"
  run "raft_get, local" "$follower" get_local.sql "$c"
  run "plain upsert, no consensus" "$leader" upsert.sql "$c"
done
