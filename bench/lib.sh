# Shared by the bench scripts (sourced): the PostgreSQL tools, a raft_kv cluster's ports and
# leader, and the synchronous-replication baseline every raft_kv write is compared with.
PG_BIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
q() { "$PG_BIN/psql" -X -Atq -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }
# free_ports N: N distinct loopback ports nothing listens on, drawn below the kernel's
# ephemeral range (as scripts/cluster.sh and tests/ draw theirs), so no outgoing connection takes
# one before its server starts; each is held until all are found, so none is handed out twice.
free_ports() {
  python3 -c 'import random, socket, sys
held = []
while len(held) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(20000, 32000)))
        held.append(s)
    except OSError:
        s.close()
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
machine() {
  echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
}

# role_cpu: CPU time (jiffies, user + system) of the long-lived server threads that a write or a
# read passes through, summed by role: raft_kv's workers' main threads (worker) and their
# network threads (net); PostgreSQL's walsenders, walreceivers and startup processes (the
# standbys' WAL replay). Backends and pgbench come and go with each run: they are the rest of
# the host's busy time.
role_cpu() {
  local p cmd cls t comm
  for p in /proc/[0-9]*; do
    read -r -d "" cmd 2>/dev/null <"$p/cmdline" || [ -n "$cmd" ] || continue
    case "$cmd" in
      "postgres: raft_kv worker"*) cls=worker ;;
      "postgres: walsender"*) cls=walsender ;;
      "postgres: walreceiver"* | "postgres: startup"*) cls=standby ;;
      *) continue ;;
    esac
    for t in "$p"/task/*; do
      read -r comm 2>/dev/null <"$t/comm" || continue
      if [ "$comm" = raft_kv-net ]; then echo "net $t/stat"; else echo "$cls $t/stat"; fi
    done
  done | awk '{ f = $2; if ((getline line < f) > 0) { sub(/^.*\) /, "", line); split(line, a, " "); s[$1] += a[12] + a[13] } close(f) }
              END { printf "worker=%d net=%d walsender=%d standby=%d\n", s["worker"], s["net"], s["walsender"], s["standby"] }'
}

# bench_dirs NAME: a work directory (WORK) holding a raft_kv cluster's (RK) and the sync-rep
# baseline's (SR) directories, all stopped and removed when the script exits.
bench_dirs() {
  WORK=$(mktemp -d "/tmp/raft_kv-$1-XXXXXX")
  chmod 755 "$WORK"
  RK=$WORK/raft SR=$WORK/syncrep
  trap 'scripts/cluster.sh down --dir "$RK" >/dev/null 2>&1 || true; syncrep_down "$SR"; rm -rf "$WORK"' EXIT
}

# rk_port DIR I: node I's SQL port in the cluster in DIR (scripts/cluster.sh)
rk_port() { awk -v i="$2" '$1 == i { print $2 }' "$1/nodes"; }
# rk_leader DIR: the leader's node id, once there is one (10 s at most)
rk_leader() {
  local leader=0
  for _ in $(seq 1 100); do
    leader=$(q "$(rk_port "$1" 1)" "SELECT coalesce(leader_id, 0) FROM raft_status()")
    [ "$leader" != 0 ] && break
    sleep 0.1
  done
  [ "$leader" != 0 ] || { echo "no leader" >&2; return 1; }
  echo "$leader"
}
# worker_rss_kib PORT: the raft_kv worker's private memory (RssAnon) on that server, KiB
worker_rss_kib() {
  local pid
  pid=$(q "$1" "SELECT worker_pid FROM raft_status()") || return 1
  awk '/^RssAnon:/ { print $2 }' "/proc/$pid/status"
}

# The benchmarks' keys (16 bytes: 'bench/' and g zero-padded) and values (256 bytes), as SQL.
KEY="'bench/' || lpad(g::text, 10, '0')"
VALUE="repeat('v', 256)"
# rk_load PORT KEYS: keys 1 to KEYS written through the raft_kv server at PORT, by 32 sessions
# at once (one raft_set each is a commit round).
rk_load() {
  local part lo hi
  for part in $(seq 0 31); do
    lo=$(( part * $2 / 32 + 1 )) hi=$(( (part + 1) * $2 / 32 ))
    q "$1" "SELECT count(raft_set($KEY, $VALUE)) FROM generate_series($lo, $hi) g" >/dev/null &
  done
  wait
}
# set_script FILE KEYS: the pgbench script of one raft_set of a key drawn uniformly of KEYS.
set_script() {
  printf '\\set g random(1, %s)\nSELECT raft_set(%s, %s);\n' "$2" "${KEY//g::text/:g::text}" "$VALUE" >"$1"
}
# tx_stats LOGDIR BUSY: "p50 p99 cpu" of the pgbench per-transaction logs in LOGDIR: latency
# percentiles in ms, and BUSY (host jiffies over the run, see busy) in ms per transaction.
tx_stats() {
  cat "$1"/tx* | awk '{ print $3 }' | sort -n | awk -v cpu="$2" '
    { v[NR] = $1 } END { printf "%.2f %.2f %.3f\n", v[int(NR * 0.5) + 1] / 1000, v[int(NR * 0.99) + 1] / 1000, cpu * 10 / NR }'
}

# syncrep_up DIR: a primary with two streaming standbys, synchronous_standby_names =
# 'ANY 1 (s1, s2)', synchronous_commit = on, initdb'd as scripts/cluster.sh does; sets
# SR_PORT (the primary's). syncrep_down DIR stops them.
syncrep_up() {
  local sr=$1 p1 p2 port
  mkdir -p "$sr"; [ "$(id -u)" = 0 ] && chown postgres: "$sr"
  read -r SR_PORT p1 p2 < <(free_ports 3)
  as_pg "$PG_BIN/initdb" -D "$sr/p" -A trust -U postgres --no-sync >"$sr/initdb.log" 2>&1
  as_pg tee -a "$sr/p/postgresql.conf" >/dev/null <<CONF
port = $SR_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sr'
synchronous_standby_names = 'ANY 1 (s1, s2)'
synchronous_commit = on
CONF
  as_pg "$PG_BIN/pg_ctl" -D "$sr/p" -l "$sr/p.log" -w start >/dev/null
  for s in 1 2; do
    port=$([ $s = 1 ] && echo "$p1" || echo "$p2")
    as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$SR_PORT" -U postgres -D "$sr/s$s" -R -X stream >/dev/null
    as_pg tee -a "$sr/s$s/postgresql.conf" >/dev/null <<<"port = $port"
    as_pg tee -a "$sr/s$s/postgresql.auto.conf" >/dev/null \
      <<<"primary_conninfo = 'host=127.0.0.1 port=$SR_PORT user=postgres application_name=s$s'"
    as_pg "$PG_BIN/pg_ctl" -D "$sr/s$s" -l "$sr/s$s.log" -w start >/dev/null
  done
  for _ in $(seq 1 100); do
    [ "$(q "$SR_PORT" "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')")" = 2 ] && return 0
    sleep 0.1
  done
  echo "the standbys did not become synchronous" >&2
  return 1
}
syncrep_down() {
  for n in s2 s1 p; do
    [ -d "$1/$n" ] && as_pg "$PG_BIN/pg_ctl" -D "$1/$n" -m immediate -w stop >/dev/null 2>&1 || true
  done
}
