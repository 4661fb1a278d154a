#!/usr/bin/env bash
# Failover times at default settings: 3 nodes under a light write load (one client writing
# every 10 ms through a surviving node); the leader is crashed ROUNDS times by an immediate
# shutdown (SIGQUIT to the postmaster, as pg_ctl stop -m immediate), ROUNDS times by kill -9
# of all its processes, silenced (SIGSTOP) ROUNDS times, then stopped as planned (fast
# shutdown, which hands leadership over first) ROUNDS times. Reports p50/p90/max of the time until
# a new leader accepts a write, and of the longest gap between the client's writes.
#
#   bench/failover.sh            20 rounds of each
#   BENCH_ROUNDS=5 bench/failover.sh
#
# The extension must be installed (scripts/demo.sh or scripts/setup.sh do it).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "# raft_kv failover, $(date -u +%Y-%m-%dT%H:%MZ), default settings (tick 100 ms, election 10-20 ticks)"
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
cargo run -q --release -p raft_kv_tests --bin failover_bench -- "${BENCH_ROUNDS:-20}"
