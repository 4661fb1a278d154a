#!/usr/bin/env bash
# How raft_kv scales with its data (issue 11, "Scale"):
#   scan   raft_scan of a 100-key prefix on a table of SCALE_KEYS keys, against a plain indexed
#          SELECT of the same 100 rows from the same table on the same server;
#   join   a fourth node joins the SCALE_KEYS-key cluster by streamed snapshot: time until it
#          is a caught-up voter, and the peak private memory (RssAnon) of its worker and of
#          the leader's;
#   large  8 clients write 1 MiB values for SCALE_LARGE_SECONDS on the leader: MB/s against the
#          sync-replication baseline with the same values, and whether leadership held.
#
#   bench/scale.sh                                      1,000,000 keys, all three parts
#   SCALE_KEYS=200000 SCALE_PARTS="scan join" bench/scale.sh
#
# Keys are 16 bytes ('scale/' and 10 digits), values 256 bytes; they are loaded through
# raft_txn, 128 puts per transaction, by 8 sessions. The extension must be installed
# (scripts/demo.sh or scripts/setup.sh do it).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
. bench/lib.sh
KEYS=${SCALE_KEYS:-1000000}
PARTS=${SCALE_PARTS:-scan join large}
SECS=${SCALE_SECONDS:-10}
LARGE_SECS=${SCALE_LARGE_SECONDS:-60}
bench_dirs scale
want() { [[ " $PARTS " == *" $1 "* ]]; }

scripts/cluster.sh up 3 --dir "$RK" >/dev/null
leader=$(rk_leader "$RK")
follower=$(( leader % 3 + 1 ))
LP=$(rk_port "$RK" "$leader") FP=$(rk_port "$RK" "$follower")
echo "# raft_kv bench/scale.sh, $(date -u +%Y-%m-%dT%H:%MZ), $KEYS keys of 16 bytes, 256-byte values"
machine

# pgbench_run PORT SCRIPT CLIENTS SECONDS -> "ops/s p50_ms p99_ms"
pgbench_run() {
  local logs=$WORK/log.$RANDOM out tps
  mkdir -p "$logs"
  out=$("$PG_BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$1" -U postgres -c "$3" -j "$(( $3 < 2 ? $3 : 2 ))" \
        -T "$4" -f "$2" -l --log-prefix="$logs/tx" postgres 2>&1) || { echo "$out" >&2; return 1; }
  tps=$(echo "$out" | awk '/^tps = / { printf "%.1f", $3 }')
  cat "$logs"/tx* | awk '{ print $3 }' | sort -n | awk -v tps="$tps" '
    { v[NR] = $1 } END { printf "%s %.2f %.2f\n", tps, v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000 }'
  rm -rf "$logs"
}

if want scan || want join; then
  t0=$(date +%s.%N)
  BATCH=128 SESSIONS=8
  batches=$(( (KEYS + BATCH - 1) / BATCH ))
  for s in $(seq 0 $(( SESSIONS - 1 ))); do
    q "$LP" "SELECT count(*) FROM generate_series($s, $(( batches - 1 )), $SESSIONS) b,
               LATERAL raft_txn('[]', (SELECT jsonb_agg(jsonb_build_object('op', 'put',
                   'key', 'scale/' || lpad(g::text, 10, '0'), 'value', repeat(md5(g::text), 8)))
                 FROM generate_series(b * $BATCH, least(b * $BATCH + $BATCH, $KEYS) - 1) g))" >/dev/null &
  done
  wait
  n=$(q "$FP" "SELECT count(*) FROM raft_scan('scale/')")
  [ "$n" = "$KEYS" ] || { echo "loaded $n keys, expected $KEYS" >&2; exit 1; }
  printf '\nloaded %s keys in %.0f s (raft_txn, %s puts each, %s sessions); raft_kv.kv on the leader: %s\n' \
    "$KEYS" "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { print a - b }')" "$BATCH" "$SESSIONS" \
    "$(q "$LP" "SELECT pg_size_pretty(pg_total_relation_size('raft_kv.kv'))")"
  q "$FP" "VACUUM ANALYZE raft_kv.kv" >/dev/null
fi

if want scan; then
  # 100-key prefixes: 'scale/' and the first 8 of the 10 digits.
  P="\\set p random(0, $(( KEYS / 100 - 1 )))"
  echo "$P
SELECT * FROM raft_scan('scale/' || lpad(:p::text, 8, '0'));" >"$WORK/scan.sql"
  echo "$P
SELECT * FROM raft_scan('scale/' || lpad(:p::text, 8, '0'), 'local');" >"$WORK/scan_local.sql"
  echo "$P
SELECT key, value, mod_revision, create_revision, version FROM raft_kv.kv
  WHERE key >= 'scale/' || lpad(:p::text, 8, '0') AND key < 'scale/' || lpad((:p + 1)::text, 8, '0') ORDER BY key;" >"$WORK/select.sql"
  [ "$(q "$FP" "SELECT count(*) FROM raft_scan('scale/00000001', 'local')")" = 100 ] || { echo "a prefix is not 100 keys" >&2; exit 1; }
  echo
  echo "| 100-key prefix on $KEYS keys, on a follower | clients | ops/s | p50 ms | p99 ms |"
  echo "|---|---|---|---|---|"
  declare -A S
  for c in 1 8; do
    for op in select scan_local scan; do
      S[$op.$c]=$(pgbench_run "$FP" "$WORK/$op.sql" "$c" "$SECS")
      read -r tps p50 p99 <<<"${S[$op.$c]}"
      case $op in
        select) label="indexed SELECT of the rows (raft_kv.kv)" ;;
        scan_local) label="raft_scan(prefix, 'local')" ;;
        scan) label="raft_scan(prefix), linearizable" ;;
      esac
      echo "| $label | $c | $tps | $p50 | $p99 |"
    done
  done
  for c in 1 8; do
    echo "cost of raft_scan(prefix, 'local') / indexed SELECT at $c clients (throughput ratio inverted): $(awk -v a="${S[select.$c]%% *}" -v b="${S[scan_local.$c]%% *}" 'BEGIN { printf "%.2f", a / b }') (goal <= 2)"
  done
fi

if want join; then
  # sample PORT OUTFILE: peak RssAnon (KiB) of that server's worker until $WORK/stop exists,
  # read from /proc every 50 ms by one process: a psql per sample cost a third of the CPU the
  # join itself had.
  sample() {
    local pid
    pid=$(q "$1" "SELECT worker_pid FROM raft_status()")
    python3 -c '
import os, sys, time
pid, out, stop = sys.argv[1:]
peak = 0
while not os.path.exists(stop):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                peak = max(peak, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.05)
open(out, "w").write(str(peak))
' "$pid" "$2" "$WORK/stop"
  }
  rm -f "$WORK/stop"
  term0=$(q "$LP" "SELECT term FROM raft_status()")
  leader_before=$(worker_rss_kib "$LP")
  sample "$LP" "$WORK/leader.peak" &
  # SCALE_PERF=FILE: a system-wide profile of the join (perf record -a -g) into FILE.
  if [ -n "${SCALE_PERF:-}" ]; then
    perf record -q -a -g -F 250 -o "$SCALE_PERF" &
    perf_pid=$!
  fi
  t0=$(date +%s.%N)
  scripts/cluster.sh add --dir "$RK" >/dev/null
  JP=$(rk_port "$RK" 4)
  sample "$JP" "$WORK/joiner.peak" &
  # Waits in one session, polling every 50 ms, for at most 10 minutes.
  q "$LP" "SET statement_timeout = '10min';
    DO \$\$ BEGIN
      WHILE NOT EXISTS (SELECT FROM raft_members() WHERE id = 4 AND voter) LOOP PERFORM pg_sleep(0.05); END LOOP;
    END \$\$" || true
  t1=$(date +%s.%N)
  [ -n "${SCALE_PERF:-}" ] && kill -INT "$perf_pid"
  touch "$WORK/stop"
  wait
  [ "$(q "$LP" "SELECT count(*) FROM raft_members() WHERE id = 4 AND voter")" = 1 ] || { echo "node 4 did not become a voter" >&2; exit 1; }
  n=$(q "$JP" "SELECT count(*) FROM raft_scan('scale/', 'local')")
  echo
  printf 'join: node 4 joined %s keys and was promoted to voter in %.1f s (goal <= 30 s); it holds %s keys\n' \
    "$KEYS" "$(awk -v a="$t1" -v b="$t0" 'BEGIN { print a - b }')" "$n"
  # Where the time went: the joiner's and the leader's log lines about the transfer.
  grep -h "snapshot" "$RK/node4/server.log" "$RK/node$leader/server.log" | sed 's/^/join: /'
  # A leader whose loop blocks on the transfer would lose its leadership: the term must not move.
  echo "join: leader node $leader, term $term0 before the join; after: $(q "$LP" "SELECT format('leader %s, term %s', leader_id, term) FROM raft_status()")"
  echo "join: peak worker RssAnon: joiner $(( $(cat "$WORK/joiner.peak") / 1024 )) MB, leader $(( $(cat "$WORK/leader.peak") / 1024 )) MB (before: $(( leader_before / 1024 )) MB; goal <= 100 MB)"
fi

if want large; then
  syncrep_up "$SR"
  q "$SR_PORT" "CREATE TABLE bench_large (key text PRIMARY KEY, value text NOT NULL)" >/dev/null
  # 64 values of 1 MiB that pglz cannot shrink (random md5 digests), made once on each server
  # in a plain table, so a write costs its replication and not the making of its value.
  for p in "$LP" "$SR_PORT"; do
    q "$p" "CREATE TABLE large_values (id int PRIMARY KEY, v text NOT NULL);
            INSERT INTO large_values SELECT i, (SELECT string_agg(md5(random()::text || i || g), '')
              FROM generate_series(1, 32768) g) FROM generate_series(1, 64) i" >/dev/null
  done
  echo "\\set k random(1, 64)
SELECT raft_set('large/' || :k, v) IS NOT NULL FROM large_values WHERE id = :k;" >"$WORK/large_set.sql"
  echo "\\set k random(1, 64)
INSERT INTO bench_large SELECT 'large/' || :k, v FROM large_values WHERE id = :k
  ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;" >"$WORK/large_upsert.sql"
  term0=$(q "$LP" "SELECT term FROM raft_status()")
  echo
  echo "| 1 MiB values, 8 clients, ${LARGE_SECS} s | ops/s | MB/s | p50 ms | p99 ms |"
  echo "|---|---|---|---|---|"
  for op in large_set large_upsert; do
    port=$([ $op = large_set ] && echo "$LP" || echo "$SR_PORT")
    read -r tps p50 p99 <<<"$(pgbench_run "$port" "$WORK/$op.sql" 8 "$LARGE_SECS")"
    case $op in
      large_set) label="raft_set on the leader" ;;
      large_upsert) label="PG sync replication upsert" ;;
    esac
    echo "| $label | $tps | $(awk -v t="$tps" 'BEGIN { printf "%.1f", t * 1.048576 }') | $p50 | $p99 |"
  done
  echo
  echo "large: leader and term before $leader/$term0, after: $(for i in 1 2 3; do q "$(rk_port "$RK" $i)" "SELECT format('node %s: leader %s term %s', node_id, leader_id, term) FROM raft_status()"; done | tr '\n' ';')"
fi
