#!/usr/bin/env bash
# Soak: 64 clients writing (raft_set on the leader) for 10 minutes on a fresh 3-node cluster.
# Every minute: throughput, each worker's private memory (RssAnon), the size of raft_kv.log on
# each node. At the end: errors, and autovacuum's work on raft_kv's tables on every node.
#
#   bench/soak.sh                              64 clients, 600 s
#   SOAK_CLIENTS=32 SOAK_SECONDS=300 bench/soak.sh
#
# The extension must be installed (scripts/demo.sh or scripts/setup.sh do it).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
CLIENTS=${SOAK_CLIENTS:-64}
SECS=${SOAK_SECONDS:-600}
PG_BIN=/usr/lib/postgresql/15/bin
DIR=$(mktemp -d /tmp/raft_kv-soak-XXXXXX)
trap 'scripts/cluster.sh down --dir "$DIR" >/dev/null 2>&1 || true' EXIT
RAFT_KV_EXTRA_CONF="max_connections = 200" scripts/cluster.sh up 3 --dir "$DIR" >/dev/null
port() { awk -v i="$1" '$1 == i { print $2 }' "$DIR/nodes"; }
q() { "$PG_BIN/psql" -X -Atq -h 127.0.0.1 -p "$(port "$1")" -U postgres -d postgres -c "$2"; }
leader=0
for _ in $(seq 1 100); do
  leader=$(q 1 "SELECT coalesce(leader_id, 0) FROM raft_status()")
  [ "$leader" != 0 ] && break
  sleep 0.1
done
[ "$leader" != 0 ] || { echo "no leader" >&2; exit 1; }

echo "# raft_kv soak, $(date -u +%Y-%m-%dT%H:%MZ), $CLIENTS clients, ${SECS}s, raft_set on the leader (node $leader)"
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PG_BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$(port "$leader")" -U postgres -c "$CLIENTS" -j 2 -T "$SECS" -P 60 \
  -f bench/set.sql postgres >"$DIR/pgbench.out" 2>&1 &
bench=$!
echo "| minute | ops/s (pgbench -P 60) | worker RssAnon MB (node 1, 2, 3) | raft_kv.log MB (node 1, 2, 3) |"
echo "|---|---|---|---|"
rss() { # rss NODE: RssAnon of its worker, MB
  local pid
  pid=$(q "$1" "SELECT worker_pid FROM raft_status()")
  awk '/^RssAnon:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status"
}
for m in $(seq 1 $(( SECS / 60 ))); do
  sleep 61
  tps=$( (grep -E '^progress: ' "$DIR/pgbench.out" || true) | sed -n "${m}p" | awk '{ print $4 }')
  rs=$(for i in 1 2 3; do rss "$i"; echo -n " "; done)
  logs=$(for i in 1 2 3; do q "$i" "SELECT round(pg_total_relation_size('raft_kv.log') / 1048576.0, 1)"; done | tr '\n' ' ')
  echo "| $m | ${tps:-?} | $rs| $logs|"
done
wait "$bench" || echo "pgbench exited with $?"
echo
grep -E "number of (transactions actually processed|failed transactions)|aborted|^tps|latency average" "$DIR/pgbench.out" || true
echo
echo "| node | table | n_live_tup | n_dead_tup | autovacuum_count | autoanalyze_count |"
echo "|---|---|---|---|---|---|"
for i in 1 2 3; do
  q "$i" "SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables
          WHERE schemaname = 'raft_kv' AND relname IN ('log', 'kv', 'requests') ORDER BY relname" |
    awk -F'|' -v n="$i" '{ printf "| %s | %s | %s | %s | %s | %s |\n", n, $1, $2, $3, $4, $5 }'
done
