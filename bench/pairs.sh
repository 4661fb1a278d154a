#!/usr/bin/env bash
# Two variants of raft_kv measured against each other on one cluster, in pairs, across restarts:
# two builds' libraries, or the installed build with and without an environment variable (the
# switch of a throw-away build). Differences of 5-15 % drown in the spread between fresh
# clusters (BENCHMARKS.md, issue 11); restarting one cluster on each variant in turn keeps its
# keys, history and disk layout the same for both.
#
#   bench/pairs.sh so OLD.so NEW.so   two builds of the library (of the same SQL version)
#   bench/pairs.sh env VAR            the installed library with VAR=1 and without
#
# Settings (environment): PAIRS (4); TARGET, where the clients connect: leader or follower
# (leader); CLIENTS (32); SECS per run (10) after WARM seconds (5); RATE, ops/s offered
# (pgbench -R; unbounded when empty); WAL=1 adds the WAL records and bytes per write on a
# follower (pg_waldump --stats over the run). The cluster holds 100,000 keys of 16 bytes with
# 256-byte values, as bench/run.sh's; the writes are bench/run.sh's raft_set, keys drawn
# uniformly. Each pair runs both variants, the first named first in odd pairs. One line per run:
# writes/s, p50 and p99 latency, host CPU per write (all processes, as bench/run.sh's).
# Run as root (the libraries are installed into the system PostgreSQL); "so" puts back the
# library installed before.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
MODE=${1:-} PAIRS=${PAIRS:-4} TARGET=${TARGET:-leader} CLIENTS=${CLIENTS:-32} SECS=${SECS:-10} WARM=${WARM:-5}
RATE=${RATE:-}
usage() { sed -n '8,9p' "$0" >&2; exit 2; }
case "$MODE" in
  so) [ $# = 3 ] && [ -f "$2" ] && [ -f "$3" ] || usage; A=$2 B=$3 ;;
  env) [ $# = 2 ] && [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage; VAR=$2 ;;
  *) usage ;;
esac
case "$TARGET" in leader | follower) ;; *) echo "TARGET is leader or follower" >&2; exit 2 ;; esac
. bench/lib.sh
bench_dirs pairs
LIB=$("$PG_BIN/pg_config" --pkglibdir)/raft_kv.so
if [ "$MODE" = so ]; then
  cp "$LIB" "$WORK/installed.so"
  trap 'scripts/cluster.sh down --dir "$RK" >/dev/null 2>&1 || true; cp "$WORK/installed.so" "$LIB"; rm -rf "$WORK"' EXIT
fi

# restart VARIANT (1 or 2): every node stopped, the variant put in place, every node started.
restart() {
  local i
  for i in 1 2 3; do scripts/cluster.sh stop "$i" --dir "$RK" >/dev/null; done
  if [ "$MODE" = so ]; then
    cp "$([ "$1" = 1 ] && echo "$A" || echo "$B")" "$LIB"
  fi
  for i in 1 2 3; do
    if [ "$MODE" = env ] && [ "$1" = 2 ]; then
      env "$VAR=1" scripts/cluster.sh start "$i" --dir "$RK" >/dev/null
    else
      scripts/cluster.sh start "$i" --dir "$RK" >/dev/null
    fi
  done
}
label() {
  if [ "$MODE" = so ]; then basename "$([ "$1" = 1 ] && echo "$A" || echo "$B")"
  else [ "$1" = 1 ] && echo "without $VAR" || echo "$VAR=1"; fi
}

[ "$MODE" = so ] && cp "$A" "$LIB"
scripts/cluster.sh up 3 --dir "$RK" >/dev/null
rk_load "$(rk_port "$RK" "$(rk_leader "$RK")")" 100000
set_script "$WORK/set.sql" 100000

# run VARIANT: one line for a run of the variant (already started).
run() {
  local leader follower port logs out tps b0 b1 lsn0 lsn1 rev0 rev1 wal="" fp p50 p99 cpu
  leader=$(rk_leader "$RK")
  follower=$(( leader % 3 + 1 ))
  port=$(rk_port "$RK" "$([ "$TARGET" = leader ] && echo "$leader" || echo "$follower")")
  fp=$(rk_port "$RK" "$follower")
  pgb() { "$PG_BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$port" -U postgres -c "$CLIENTS" \
            -j "$(( CLIENTS < 2 ? CLIENTS : 2 ))" ${RATE:+-R "$RATE"} -f "$WORK/set.sql" "$@" postgres 2>&1; }
  pgb -T "$WARM" >/dev/null || { echo "warm-up failed" >&2; exit 1; }
  logs=$WORK/log.$RANDOM
  mkdir -p "$logs"
  lsn0=$(q "$fp" "SELECT pg_current_wal_flush_lsn()") rev0=$(q "$fp" "SELECT revision FROM raft_status()")
  b0=$(busy)
  out=$(pgb -T "$SECS" -l --log-prefix="$logs/tx") || { echo "$out" >&2; exit 1; }
  b1=$(busy)
  lsn1=$(q "$fp" "SELECT pg_current_wal_flush_lsn()") rev1=$(q "$fp" "SELECT revision FROM raft_status()")
  tps=$(echo "$out" | awk '/^tps = / { printf "%.0f", $3 }')
  if [ "${WAL:-}" = 1 ]; then
    # (It ends with an error when the last record crosses the flush point.)
    wal=$({ "$PG_BIN/pg_waldump" --stats -p "$RK/node$follower/data/pg_wal" -s "$lsn0" -e "$lsn1" 2>/dev/null || true; } |
          awk -v n="$(( rev1 - rev0 ))" '/^Total/ { printf ", WAL per write on a follower: %.2f records, %.0f bytes", $2 / n, $3 / n }')
  fi
  read -r p50 p99 cpu < <(tx_stats "$logs" "$(( b1 - b0 ))")
  printf '%-24s on the %-8s %6s writes/s, p50 %s ms, p99 %s ms, host CPU %4.0f us/write%s\n' \
    "$(label "$1")" "$TARGET" "$tps" "$p50" "$p99" "$(awk -v c="$cpu" 'BEGIN { print c * 1000 }')" "$wal"
  rm -rf "$logs"
}

machine
echo "# bench/pairs.sh $MODE: $PAIRS pairs, $CLIENTS clients on the $TARGET, ${SECS}s per run after ${WARM}s${RATE:+, $RATE ops/s offered}"
for p in $(seq 1 "$PAIRS"); do
  order="1 2"
  [ $(( p % 2 )) = 0 ] && order="2 1"
  for v in $order; do
    restart "$v"
    printf 'pair %d: ' "$p"
    run "$v"
  done
done
