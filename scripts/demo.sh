#!/usr/bin/env bash
# The raft_kv tour: installs what is missing, builds and installs the extension, starts a
# local 3-node cluster and shows it working: replication, leader failover, rejoin.
# The cluster keeps running afterwards; stop it with: scripts/cluster.sh down
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

scripts/setup.sh

cluster=scripts/cluster.sh
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
sql() { local i=$1; shift; $cluster psql "$i" -Atq -c "$*"; }

step "Start three PostgreSQL servers, each a raft_kv node"
$cluster down >/dev/null 2>&1 || true
$cluster up 3

leader_of() { sql "$1" "SELECT coalesce(leader_id, 0) FROM raft_status()" 2>/dev/null || echo 0; }
wait_leader() { # wait_leader NODE...: prints the leader, one of NODE..., that all of them follow
  for _ in $(seq 1 100); do
    local l first="" same=1
    for i in "$@"; do
      l=$(leader_of "$i"); [ -z "$first" ] && first=$l; [ "$l" = "$first" ] || same=0
    done
    if [ "$same" = 1 ] && [[ " $* " == *" $first "* ]]; then echo "$first"; return; fi
    sleep 0.1
  done
  echo "no leader elected" >&2; exit 1
}

leader=$(wait_leader 1 2 3)
step "raft_status() on every node (node $leader was elected leader)"
for i in 1 2 3; do
  $cluster psql "$i" -q -c "SELECT node_id, state, role, term, leader_id, commit_index, applied_index, voters FROM raft_status()"
done

step "Write on node 1, read on nodes 2 and 3"
echo "node 1: raft_set('config/mode', 'active') -> revision $(sql 1 "SELECT raft_set('config/mode', 'active')")"
for i in 2 3; do echo "node $i: raft_get('config/mode') = $(sql "$i" "SELECT raft_get('config/mode')")"; done

step "Peers speak mutual TLS; SQL roles get only what they are granted"
grep -h "(mutual TLS" "${RAFT_KV_CLUSTER_DIR:-${TMPDIR:-/tmp}/raft_kv-cluster}"/node1/server.log | tail -1 | sed 's/.*LOG: *//'
sql 1 "SET client_min_messages = warning; DROP ROLE IF EXISTS demo_app; CREATE ROLE demo_app; GRANT raft_kv_writer TO demo_app" >/dev/null
echo "as demo_app (granted raft_kv_writer): raft_set('app/flag', 'on') -> revision $(sql 1 "SET ROLE demo_app; SELECT raft_set('app/flag', 'on')")"
echo "as demo_app: raft_join(9, '127.0.0.1:1') -> $(sql 1 "SET ROLE demo_app; SELECT raft_join(9, '127.0.0.1:1')" 2>&1 | sed 's/^psql:[^:]*:[0-9]*: //' | head -1)"
sql 1 "DROP ROLE demo_app" >/dev/null

step "Kill the leader (node $leader) with pg_ctl -m immediate"
$cluster kill "$leader"
others=$(for i in 1 2 3; do [ "$i" = "$leader" ] || echo "$i"; done | tr '\n' ' ')
start=$(date +%s%N)
new=$(wait_leader $others)
echo "node $new is the new leader after $(( ($(date +%s%N) - start) / 1000000 )) ms"
for i in $others; do
  $cluster psql "$i" -q -c "SELECT node_id, role, term, leader_id FROM raft_status()"
done

step "Write and read again with one node down"
a=${others%% *}; b=${others#* }; b=${b%% }
echo "node $a: raft_set('config/mode', 'degraded') -> revision $(sql "$a" "SELECT raft_set('config/mode', 'degraded')")"
echo "node $b: raft_get('config/mode') = $(sql "$b" "SELECT raft_get('config/mode')")"

step "History and a transaction: every change has a revision; raft_txn is atomic at one"
echo "node $b: raft_txn(if config/mode = 'degraded' then put config/mode 'active' and config/epoch '2') ->"
$cluster psql "$b" -q -c "SELECT succeeded, revision FROM raft_txn(
  '[{\"key\": \"config/mode\", \"target\": \"value\", \"op\": \"=\", \"value\": \"degraded\"}]',
  '[{\"op\": \"put\", \"key\": \"config/mode\", \"value\": \"active\"}, {\"op\": \"put\", \"key\": \"config/epoch\", \"value\": \"2\"}]')"
echo "node $a: raft_changes(1, 'config/'), the change feed a watcher follows:"
$cluster psql "$a" -q -c "SELECT revision, key, kind, value, prev_value FROM raft_changes(1, 'config/')"

step "Leases: keys that go away when their owner stops keeping them alive"
lease=$(sql "$a" "SELECT raft_lease_grant('2s')")
echo "node $a: raft_lease_grant('2s') -> lease $lease"
echo "node $a: raft_set('services/web', '10.0.0.7:80', lease => $lease) -> revision $(sql "$a" "SELECT raft_set('services/web', '10.0.0.7:80', lease => $lease)")"
echo "node $b: raft_lock('jobs/nightly', $lease) -> fencing token $(sql "$b" "SELECT raft_lock('jobs/nightly', $lease)")"
echo "nobody keeps lease $lease alive; the leader expires it about 2 s later, through the log:"
for _ in $(seq 1 100); do
  [ -z "$(sql "$b" "SELECT raft_get('services/web')")" ] && break
  sleep 0.1
done
$cluster psql "$b" -q -c "SELECT revision, key, kind FROM raft_changes(1, '') WHERE key IN ('services/web') OR key LIKE 'jobs/nightly/%'"

step "Restart the old leader (node $leader): it rejoins as a follower and catches up"
$cluster start "$leader"
wait_leader 1 2 3 >/dev/null
for _ in $(seq 1 50); do
  [ "$(sql "$leader" "SELECT raft_get('config/mode')")" = active ] && break
  sleep 0.1
done
echo "node $leader: raft_get('config/mode') = $(sql "$leader" "SELECT raft_get('config/mode')")"
$cluster status

step "Done. The cluster is still running:"
$cluster info
echo "  scripts/cluster.sh psql 1     # a psql prompt on node 1"
echo "  scripts/cluster.sh down       # stop it and remove its data"
