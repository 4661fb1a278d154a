#!/usr/bin/env bash
# raft_kv against PostgreSQL's own replication, measured side by side in one run on one machine.
#
#   bench/run.sh                                   1, 8 and 32 clients, 10 s per run
#   BENCH_SECONDS=30 BENCH_CLIENTS="1 8 32 64" bench/run.sh
#   BENCH_OPS="set_leader syncrep" bench/run.sh     only these rows (set_leader set_follower
#                                                   syncrep single get_leader get_follower
#                                                   get_local select)
#
# Two clusters run at once: a raft_kv cluster of 3 nodes (scripts/cluster.sh), and a primary
# with two streaming standbys, synchronous_standby_names = 'ANY 1 (s1, s2)',
# synchronous_commit = on (the baseline a write must be compared with: durable on two of
# three servers). Same settings otherwise, same data: 100,000 keys of 16 bytes, values of
# 256 bytes, prepared statements (pgbench -M prepared), keys drawn uniformly.
#
# Each run reports throughput, p50 and p99 latency from pgbench's per-transaction logs, and
# the host CPU time per operation (busy time of all cores from /proc/stat over the run, divided
# by the operations; it includes pgbench and every server), and how much of it the long-lived
# server threads took (role_cpu in bench/lib.sh). Then the issue-11 ratios.
# The extension must be installed (scripts/demo.sh or scripts/setup.sh do it).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
SECS=${BENCH_SECONDS:-10}
CLIENTS=${BENCH_CLIENTS:-1 8 32}
KEYS=100000
. bench/lib.sh
bench_dirs bench

# --- the raft_kv cluster
scripts/cluster.sh up 3 --dir "$RK" >/dev/null
leader=$(rk_leader "$RK")
follower=$(( leader % 3 + 1 ))
LP=$(rk_port "$RK" "$leader") FP=$(rk_port "$RK" "$follower")

# --- the synchronous-replication cluster: same initdb and settings as scripts/cluster.sh
syncrep_up "$SR"
P0=$SR_PORT

# --- data: the same keys and values everywhere
KEY="'bench/' || lpad(g::text, 10, '0')"
VALUE="repeat('v', 256)"
TABLE="CREATE TABLE bench_kv (key text PRIMARY KEY, value text NOT NULL);
       INSERT INTO bench_kv SELECT $KEY, $VALUE FROM generate_series(1, $KEYS) g"
for p in "$P0" "$LP" "$FP"; do
  # P0: the sync-rep upsert's table (replicated to both standbys); LP: the single-server
  # upsert's, on the raft leader's server; FP: the plain primary-key SELECT's, on a follower's.
  q "$p" "$TABLE" >/dev/null
  q "$p" "VACUUM ANALYZE bench_kv" >/dev/null
done
# raft_kv's keys, loaded by 32 sessions at once (one raft_set each is a commit round).
for part in $(seq 0 31); do
  lo=$(( part * KEYS / 32 + 1 )) hi=$(( (part + 1) * KEYS / 32 ))
  q "$LP" "SELECT count(raft_set($KEY, $VALUE)) FROM generate_series($lo, $hi) g" >/dev/null &
done
wait
q "$FP" "SELECT raft_get('bench/' || lpad('$KEYS', 10, '0'))" >/dev/null

cat >"$WORK/set.sql" <<'EOF'
\set k random(1, 100000)
SELECT raft_set('bench/' || lpad(:k::text, 10, '0'), repeat('v', 256));
EOF
cat >"$WORK/upsert.sql" <<'EOF'
\set k random(1, 100000)
INSERT INTO bench_kv (key, value) VALUES ('bench/' || lpad(:k::text, 10, '0'), repeat('v', 256))
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
EOF
cat >"$WORK/get.sql" <<'EOF'
\set k random(1, 100000)
SELECT raft_get('bench/' || lpad(:k::text, 10, '0'));
EOF
cat >"$WORK/get_local.sql" <<'EOF'
\set k random(1, 100000)
SELECT raft_get('bench/' || lpad(:k::text, 10, '0'), 'local');
EOF
cat >"$WORK/select.sql" <<'EOF'
\set k random(1, 100000)
SELECT value FROM bench_kv WHERE key = 'bench/' || lpad(:k::text, 10, '0');
EOF

# run LABEL PORT SCRIPT CLIENTS -> one table row; remembers "tps p50 p99 cpu" under LABEL.CLIENTS
declare -A R
run() {
  local logs=$WORK/log.$RANDOM out tps b0 b1 stats r0 r1 roles
  mkdir -p "$logs"
  r0=$(role_cpu)
  b0=$(busy)
  out=$("$PG_BIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$2" -U postgres -c "$4" -j "$(( $4 < 2 ? $4 : 2 ))" \
        -T "$SECS" -f "$WORK/$3" -l --log-prefix="$logs/tx" postgres 2>&1) || { echo "$out" >&2; exit 1; }
  b1=$(busy)
  r1=$(role_cpu)
  tps=$(echo "$out" | awk '/^tps = / { printf "%.0f", $3 }')
  # CPU ms per op: busy jiffies (1/100 s) over the run, divided by the operations done.
  stats=$(cat "$logs"/tx* | awk '{ print $3 }' | sort -n | awk -v tps="$tps" -v secs="$SECS" -v cpu="$(( b1 - b0 ))" '
    { v[NR] = $1 } END {
      printf "%s %.2f %.2f %.3f\n", tps, v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000, cpu * 10 / NR }')
  # Of that, the server threads by role (role_cpu), per op: raft_kv's workers and network
  # threads on its rows, the walsenders and standbys on the sync-rep rows.
  roles=$(cat "$logs"/tx* | wc -l | awk -v a="$r0" -v b="$r1" -v raft="$([[ $1 == raft_* ]] && echo 1)" '
    function get(s, k,   n, i, kv) { n = split(s, kv, /[ =]/); for (i = 1; i < n; i += 2) if (kv[i] == k) return kv[i + 1]; return 0 }
    { ops = $1 } END {
      w = get(b, "worker") - get(a, "worker"); n = get(b, "net") - get(a, "net")
      s = get(b, "walsender") - get(a, "walsender"); r = get(b, "standby") - get(a, "standby")
      if (raft) printf "workers %.3f, net %.3f", w * 10 / ops, n * 10 / ops
      else if (s + r > 0) printf "walsenders %.3f, standbys %.3f", s * 10 / ops, r * 10 / ops
      else printf "-" }')
  rm -rf "$logs"
  R[$1.$4]=$stats
  read -r tps p50 p99 cpu <<<"$stats"
  printf '| %-34s | %7s | %8s | %7s | %7s | %9s | %-30s |\n' "$1" "$4" "$tps" "$p50" "$p99" "$cpu" "$roles"
}

echo "# raft_kv bench/run.sh, $(date -u +%Y-%m-%dT%H:%MZ), ${SECS}s per run, $KEYS keys of 16 bytes, 256-byte values"
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# postgres: $($PG_BIN/postgres --version), fsync=$(q "$LP" 'SHOW fsync'), synchronous_commit=$(q "$LP" 'SHOW synchronous_commit'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
printf '| %-34s | %7s | %8s | %7s | %7s | %9s | %-30s |\n' operation clients "ops/s" "p50 ms" "p99 ms" "CPU ms/op" \
  "of which server threads, ms/op"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "------------------------------------" "---------" "----------" "---------" "---------" \
  "-----------" "--------------------------------"
want() { [ -z "${BENCH_OPS:-}" ] || [[ " $BENCH_OPS " == *" $1 "* ]]; }
for c in $CLIENTS; do
  want set_leader && run "raft_set on the leader" "$LP" set.sql "$c"
  want set_follower && run "raft_set on a follower" "$FP" set.sql "$c"
  want syncrep && run "PG sync replication upsert" "$P0" upsert.sql "$c"
  want single && run "PG single-server upsert" "$LP" upsert.sql "$c"
  want get_leader && run "raft_get linearizable, leader" "$LP" get.sql "$c"
  want get_follower && run "raft_get linearizable, follower" "$FP" get.sql "$c"
  want get_local && run "raft_get 'local', follower" "$FP" get_local.sql "$c"
  want select && run "PG primary-key SELECT" "$FP" select.sql "$c"
done

# The issue-11 targets, as ratios within this run.
f() { echo "${R[$1.$2]:-}" | awk -v i="$3" '{ print $i }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
echo
echo "| target (issue 11) | measured | goal |"
echo "|---|---|---|"
has() { case " $CLIENTS " in *" $1 "*) return 0 ;; esac; return 1; }
if has 32; then
  echo "| raft_set leader / sync-rep upsert, ops/s at 32 | $(ratio "$(f 'raft_set on the leader' 32 1)" "$(f 'PG sync replication upsert' 32 1)") | >= 0.8 |"
  echo "| raft_set follower / sync-rep upsert, ops/s at 32 | $(ratio "$(f 'raft_set on a follower' 32 1)" "$(f 'PG sync replication upsert' 32 1)") | >= 0.7 |"
  echo "| raft_set leader / sync-rep upsert, CPU per op at 32 | $(ratio "$(f 'raft_set on the leader' 32 4)" "$(f 'PG sync replication upsert' 32 4)") | <= 1.5 |"
  echo "| raft_get linearizable leader / PK SELECT, ops/s at 32 | $(ratio "$(f 'raft_get linearizable, leader' 32 1)" "$(f 'PG primary-key SELECT' 32 1)") | >= 0.4 |"
  echo "| raft_get linearizable follower / PK SELECT, ops/s at 32 | $(ratio "$(f 'raft_get linearizable, follower' 32 1)" "$(f 'PG primary-key SELECT' 32 1)") | >= 0.35 |"
fi
if has 1; then
  echo "| raft_set leader / sync-rep upsert, p50 at 1 | $(ratio "$(f 'raft_set on the leader' 1 2)" "$(f 'PG sync replication upsert' 1 2)") | <= 1.0 |"
fi
if has 8; then
  echo "| raft_get 'local' / PK SELECT, ops/s at 8 | $(ratio "$(f "raft_get 'local', follower" 8 1)" "$(f 'PG primary-key SELECT' 8 1)") | >= 0.8 |"
fi
