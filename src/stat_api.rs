//! Monitoring at the SQL boundary: the worker's cumulative counters and gauges (`raft_stat`,
//! view `raft_kv.stat`) and its view of each peer (`raft_stat_peers`, view `raft_kv.stat_peers`),
//! as pg_stat views are: this node's, since its worker started. Granted to pg_monitor.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::shmem::{self, SHARED};
use crate::sql_boundary::require_preload;

/// This node's Raft counters (cumulative since the worker started) and gauges.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn raft_stat() -> TableIterator<
    'static,
    (
        name!(node_id, i64),
        name!(role, String),
        name!(term, i64),
        name!(leader_id, i64),
        name!(elections_started, i64),
        name!(elections_won, i64),
        name!(leader_changes, i64),
        name!(proposals, i64),
        name!(forwarded, i64),
        name!(commit_index, i64),
        name!(applied_index, i64),
        name!(applied_entries, i64),
        name!(deferred_applies, i64),
        name!(apply_lag, i64),
        name!(log_entries, i64),
        name!(read_index_requests, i64),
        name!(read_index_failures, i64),
        name!(snapshots_sent, i64),
        name!(snapshots_received, i64),
        name!(snapshots_failed, i64),
        name!(snapshot_bytes_sent, i64),
        name!(snapshot_bytes_received, i64),
        name!(dropped_inbound, i64),
        name!(dropped_outbound, i64),
    ),
> {
    require_preload();
    let sh = SHARED.share();
    let (s, c) = (&sh.status, &sh.status.stats);
    let n = |v: u64| v.min(i64::MAX as u64) as i64;
    let log_entries = (s.last_index + 1).saturating_sub(s.first_index.max(1));
    TableIterator::once((
        n(s.node_id),
        s.role.get(),
        n(s.term),
        n(s.leader_id),
        n(c.elections_started),
        n(c.elections_won),
        n(c.leader_changes),
        n(c.proposals),
        n(c.forwarded),
        n(s.commit),
        n(s.applied),
        n(c.applied_entries),
        n(c.deferred_applies),
        n(s.commit.saturating_sub(s.applied)),
        n(log_entries),
        n(c.read_index_requests),
        n(c.read_index_failures),
        n(c.snapshots_sent),
        n(c.snapshots_received),
        n(c.snapshots_failed),
        n(c.snapshot_bytes_sent),
        n(c.snapshot_bytes_received),
        n(c.dropped_inbound),
        n(c.dropped_outbound),
    ))
}

/// This node's view of every other member: whether a connection is up, how long since a
/// message from it arrived, and (on the leader) how far its log matches.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_stat_peers() -> TableIterator<
    'static,
    (
        name!(peer_id, i64),
        name!(address, String),
        name!(voter, bool),
        name!(connected, bool),
        name!(last_contact_age, Option<Interval>),
        name!(match_index, Option<i64>),
    ),
> {
    require_preload();
    let now = shmem::mono_ms();
    let sh = SHARED.share();
    let me = sh.status.node_id;
    let rows: Vec<_> = sh.status.members[..sh.status.n_members as usize]
        .iter()
        .filter(|m| m.id != me)
        .map(|m| {
            let age = (m.last_contact_ms > 0)
                .then(|| Interval::from_micros((now.saturating_sub(m.last_contact_ms) * 1000) as i64));
            (m.id as i64, m.addr.get(), m.voter, m.connected, age, m.has_progress.then_some(m.matched as i64))
        })
        .collect();
    TableIterator::new(rows)
}
