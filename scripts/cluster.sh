#!/usr/bin/env bash
# A local raft_kv cluster of PostgreSQL 15 servers on loopback.
#
#   scripts/cluster.sh up [N] [--dir DIR]   start N nodes (default 3), print connection strings
#   scripts/cluster.sh down [--dir DIR]     stop every node and remove DIR
#   scripts/cluster.sh status [--dir DIR]   raft_status() of every node
#   scripts/cluster.sh psql I [--dir DIR] [psql args]   psql on node I
#   scripts/cluster.sh stop I | start I | kill I        one node (fast stop, start, immediate stop)
#   scripts/cluster.sh add [--dir DIR]      start one more node and raft_join it to the cluster
#   scripts/cluster.sh remove I [--dir DIR] raft_remove node I, stop it and delete its data
#
# The extension must be installed (scripts/demo.sh does it). When run as root the servers run
# as the postgres user. Settings for every node can be appended with RAFT_KV_EXTRA_CONF.
# Peers speak mutual TLS with certificates from a throw-away CA made in DIR/certs
# (scripts/certs.sh); RAFT_KV_CLUSTER_NAME names the cluster in them (default "local").
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DIR=${RAFT_KV_CLUSTER_DIR:-${TMPDIR:-/tmp}/raft_kv-cluster}

die() { echo "cluster.sh: $*" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Sets the variable named $1 to a TCP port on 127.0.0.1 that nothing listens on and that we
# have not handed out yet. Not through $(...): a subshell's USED_PORTS would be lost, and two
# nodes could be handed the same port.
USED_PORTS=" "
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( (RANDOM * 32768 + RANDOM) % 12000 + 20000 ))  # below the ephemeral range
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS="$USED_PORTS$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port found"
}

nodes_file() { echo "$DIR/nodes"; }

node_field() { # node_field I column(2=pg port, 3=raft port)
  awk -v i="$1" -v c="$2" '$1 == i { print $c }' "$(nodes_file)"
}

require_cluster() { [ -f "$(nodes_file)" ] || die "no cluster in $DIR (run: scripts/cluster.sh up)"; }

node_ids() { awk '{ print $1 }' "$(nodes_file)"; }

psql_node() { # psql_node I args...
  local i=$1; shift
  "$PG_BIN/psql" -X -h 127.0.0.1 -p "$(node_field "$i" 2)" -U postgres -d postgres "$@"
}

start_node() {
  local i=$1 d="$DIR/node$1"
  as_pg env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$PG_BIN/pg_ctl" -D "$d/data" -l "$d/server.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$d/server.log" >&2; die "node $i did not start"; }
}

# Every node gets a certificate from the cluster's own throw-away CA (in $DIR/certs), so the
# Raft port runs mutual TLS as in production.
CLUSTER_NAME=${RAFT_KV_CLUSTER_NAME:-local}

create_node() { # create_node I PEERS: initdb, configure and start node I
  local i=$1 peers=$2 d="$DIR/node$1"
  as_pg mkdir -p "$d"
  "$(dirname "$0")/certs.sh" "$DIR/certs" "$CLUSTER_NAME" "$i"
  cp "$DIR/certs/ca.pem" "$DIR/certs/node$i.pem" "$DIR/certs/node$i.key" "$d/"
  [ "$(id -u)" = 0 ] && chown postgres: "$d/ca.pem" "$d/node$i.pem" "$d/node$i.key"
  as_pg "$PG_BIN/initdb" -D "$d/data" -A trust -U postgres --no-sync >"$d/initdb.log" 2>&1 \
    || { cat "$d/initdb.log" >&2; die "initdb failed for node $i"; }
  as_pg tee -a "$d/data/postgresql.conf" >/dev/null <<EOF
# raft_kv local cluster node $i
port = $(node_field "$i" 2)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$d'
shared_preload_libraries = 'raft_kv'
raft_kv.node_id = $i
raft_kv.listen_addr = '127.0.0.1:$(node_field "$i" 3)'
raft_kv.peers = '$peers'
raft_kv.ssl_cert_file = '$d/node$i.pem'
raft_kv.ssl_key_file = '$d/node$i.key'
raft_kv.ssl_ca_file = '$d/ca.pem'
${RAFT_KV_EXTRA_CONF:-}
EOF
  start_node "$i"
}

# A running node other than $1, to send membership changes through.
other_node() {
  for j in $(node_ids); do
    [ "$j" != "${1:-}" ] && psql_node "$j" -Atqc "SELECT 1" >/dev/null 2>&1 && { echo "$j"; return; }
  done
  die "no other running node"
}

cmd_add() {
  require_cluster
  local i pg raft via
  i=$(( $(node_ids | sort -n | tail -1) + 1 ))
  for p in $(awk '{ print $2, $3 }' "$(nodes_file)"); do USED_PORTS="$USED_PORTS$p "; done
  free_port pg; free_port raft
  echo "$i $pg $raft" >> "$(nodes_file)"
  create_node "$i" ""
  psql_node "$i" -qc "CREATE EXTENSION IF NOT EXISTS raft_kv" >/dev/null
  via=$(other_node "$i")
  psql_node "$via" -Atqc "SELECT raft_join($i, '127.0.0.1:$raft')" >/dev/null
  echo "node $i: postgresql://postgres@127.0.0.1:$pg/postgres  (raft 127.0.0.1:$raft), joined through node $via"
}

cmd_remove() {
  require_cluster
  local i=$1 via
  [ -n "$(node_field "$i" 2)" ] || die "no node $i"
  via=$(other_node "$i")
  psql_node "$via" -Atqc "SELECT raft_remove($i)" >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$DIR/node$i/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$DIR/node$i"
  awk -v i="$i" '$1 != i' "$(nodes_file)" > "$(nodes_file).tmp" && mv "$(nodes_file).tmp" "$(nodes_file)"
  echo "node $i removed (through node $via)"
}

cmd_up() {
  local n=$1
  [ "$n" -ge 1 ] 2>/dev/null || die "node count must be a positive integer, got '$n'"
  [ -f /usr/lib/postgresql/15/lib/raft_kv.so ] || die "raft_kv is not installed (run scripts/demo.sh)"
  if [ -f "$(nodes_file)" ]; then
    echo "cluster already exists in $DIR; (re)starting its nodes"
    for i in $(node_ids); do
      as_pg "$PG_BIN/pg_ctl" -D "$DIR/node$i/data" status >/dev/null 2>&1 || start_node "$i"
    done
    cmd_info
    return
  fi
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  local peers="" i pg raft
  : > "$DIR/nodes.tmp"
  for i in $(seq 1 "$n"); do
    free_port pg; free_port raft
    echo "$i $pg $raft" >> "$DIR/nodes.tmp"
    peers="${peers:+$peers,}$i=127.0.0.1:$raft"
  done
  mv "$DIR/nodes.tmp" "$(nodes_file)"
  for i in $(seq 1 "$n"); do
    create_node "$i" "$peers"
  done
  for i in $(seq 1 "$n"); do
    psql_node "$i" -qc "CREATE EXTENSION IF NOT EXISTS raft_kv" >/dev/null
  done
  cmd_info
}

cmd_info() {
  require_cluster
  for i in $(node_ids); do
    echo "node $i: postgresql://postgres@127.0.0.1:$(node_field "$i" 2)/postgres  (raft 127.0.0.1:$(node_field "$i" 3))"
  done
}

cmd_down() {
  if [ -f "$(nodes_file)" ]; then
    for i in $(node_ids); do
      if [ -d "$DIR/node$i/data" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$DIR/node$i/data" -m fast -w stop >/dev/null 2>&1 || true
      fi
    done
  fi
  rm -rf "$DIR"
  echo "cluster in $DIR is down"
}

cmd_status() {
  require_cluster
  for i in $(node_ids); do
    psql_node "$i" -Atc "SELECT format('node %s: %s, %s, term %s, leader %s, applied %s', node_id, state, role, term, leader_id, applied_index) FROM raft_status()" 2>/dev/null \
      || echo "node $i: down"
  done
}

# Parse: command, positional args, --dir anywhere.
cmd=${1:-}; [ $# -gt 0 ] && shift
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"

case "$cmd" in
  up) cmd_up "${1:-3}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  info) cmd_info ;;
  psql) require_cluster; i=${1:?node number}; shift; psql_node "$i" "$@" ;;
  start) require_cluster; start_node "${1:?node number}" ;;
  stop) require_cluster; as_pg "$PG_BIN/pg_ctl" -D "$DIR/node${1:?node number}/data" -m fast -w stop >/dev/null ;;
  kill) require_cluster; as_pg "$PG_BIN/pg_ctl" -D "$DIR/node${1:?node number}/data" -m immediate -w stop >/dev/null ;;
  add) cmd_add ;;
  remove) cmd_remove "${1:?node number}" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || exit 2 ;;
esac
