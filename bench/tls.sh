#!/usr/bin/env bash
# The cost of peer TLS: raft_set on the leader of a cluster with mutual TLS (the default) and of
# one with raft_kv.peer_tls = off, measured in the same run, runs interleaved, on one machine.
#
#   bench/tls.sh                           1 and 32 clients, 10 s per run, 2 rounds
#   BENCH_SECONDS=20 BENCH_CLIENTS="1 8 32" BENCH_ROUNDS=3 bench/tls.sh
#
# Reports throughput and p50/p99 latency from pgbench's per-transaction logs (not averages),
# and the TLS/plain ratios. The extension must be installed (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
SECS=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-1 32}
ROUNDS=${BENCH_ROUNDS:-2}
PG_BIN=/usr/lib/postgresql/15/bin
WORK=$(mktemp -d /tmp/raft_kv-bench-tls-XXXXXX)
TLS_DIR=$WORK/tls PLAIN_DIR=$WORK/plain
chmod 755 "$WORK"
cleanup() {
  scripts/cluster.sh down --dir "$TLS_DIR" >/dev/null 2>&1 || true
  scripts/cluster.sh down --dir "$PLAIN_DIR" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

scripts/cluster.sh up 3 --dir "$TLS_DIR" >/dev/null
RAFT_KV_EXTRA_CONF="raft_kv.peer_tls = off" scripts/cluster.sh up 3 --dir "$PLAIN_DIR" >/dev/null

port() { awk -v i="$2" '$1 == i { print $2 }' "$1/nodes"; }
q() { "$PG_BIN/psql" -X -Atq -h 127.0.0.1 -p "$(port "$1" "$2")" -U postgres -d postgres -c "$3"; }
leader_of() { # leader_of DIR
  local l=0
  for _ in $(seq 1 100); do
    l=$(q "$1" 1 "SELECT coalesce(leader_id, 0) FROM raft_status()")
    [ "$l" != 0 ] && { echo "$l"; return; }
    sleep 0.1
  done
  echo "no leader in $1" >&2; exit 1
}
TLS_LEADER=$(leader_of "$TLS_DIR")
PLAIN_LEADER=$(leader_of "$PLAIN_DIR")
for d in "$TLS_DIR:$TLS_LEADER" "$PLAIN_DIR:$PLAIN_LEADER"; do
  q "${d%%:*}" "${d##*:}" "SELECT count(raft_set('bench/' || g, 'value-' || g)) FROM generate_series(1, 10000) g" >/dev/null
done

# run DIR NODE CLIENTS -> "ops/s p50_ms p99_ms"
run() {
  local logs=$WORK/log.$RANDOM out tps
  mkdir -p "$logs"
  out=$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$(port "$1" "$2")" -U postgres -c "$3" -j "$(( $3 < 2 ? $3 : 2 ))" \
        -T "$SECS" -f bench/set.sql -l --log-prefix="$logs/tx" postgres 2>&1) || { echo "$out" >&2; exit 1; }
  tps=$(echo "$out" | awk '/^tps = / { printf "%.0f", $3 }')
  cat "$logs"/tx* | awk '{ print $3 }' | sort -n | awk -v tps="$tps" '
    { v[NR] = $1 } END { printf "%s %.2f %.2f\n", tps, v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000 }'
  rm -rf "$logs"
}

echo "# raft_kv peer TLS cost, $(date -u +%Y-%m-%dT%H:%MZ), ${SECS}s per run, $ROUNDS rounds, runs interleaved"
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '| %-7s | %-5s | %-5s | %9s | %8s | %8s |\n' clients round peers "ops/s" "p50 ms" "p99 ms"
printf '|%s|%s|%s|%s|%s|%s|\n' "---------" "-------" "-------" "-----------" "----------" "----------"
declare -A sum
for c in $CLIENTS; do
  for r in $(seq 1 "$ROUNDS"); do
    for mode in tls plain; do
      if [ "$mode" = tls ]; then res=$(run "$TLS_DIR" "$TLS_LEADER" "$c"); else res=$(run "$PLAIN_DIR" "$PLAIN_LEADER" "$c"); fi
      read -r tps p50 p99 <<<"$res"
      printf '| %7s | %5s | %-5s | %9s | %8s | %8s |\n' "$c" "$r" "$mode" "$tps" "$p50" "$p99"
      sum[$c.$mode.tps]=$(awk -v a="${sum[$c.$mode.tps]:-0}" -v b="$tps" 'BEGIN { print a + b }')
      sum[$c.$mode.p50]=$(awk -v a="${sum[$c.$mode.p50]:-0}" -v b="$p50" 'BEGIN { print a + b }')
    done
  done
done
echo
for c in $CLIENTS; do
  awk -v c="$c" -v tt="${sum[$c.tls.tps]}" -v pt="${sum[$c.plain.tps]}" -v tl="${sum[$c.tls.p50]}" -v pl="${sum[$c.plain.p50]}" \
    'BEGIN { printf "%s clients: TLS/plain throughput %.2f, p50 latency %.2f (summed over rounds)\n", c, tt / pt, tl / pl }'
done
