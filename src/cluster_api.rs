//! Membership and status: `raft_join`, `raft_remove`, `raft_transfer_leader`, `raft_status`,
//! `raft_members`.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;

use crate::requests;
use crate::shmem::{Op, SHARED};
use crate::sql_boundary::{raise, require_preload, submit};

fn nonzero(v: u64) -> Option<i64> {
    (v != 0).then_some(v as i64)
}

/// The membership as this node's worker last published it: (id, address, voter).
fn membership() -> (Vec<(u64, String, bool)>, bool) {
    let sh = SHARED.share();
    let s = &sh.status;
    let rows = s.members[..s.n_members as usize].iter().map(|m| (m.id, m.addr.get(), m.voter)).collect();
    (rows, s.change_pending)
}

fn check_node_id(id: Option<i64>) -> u64 {
    match id {
        Some(id) if id >= 1 && id as u64 <= raft_kv_core::config::MAX_NODE_ID => id as u64,
        Some(id) => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid raft_kv node id {id}: expected 1 to {}", raft_kv_core::config::MAX_NODE_ID),
            None,
            None,
        ),
        None => raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv node id must not be NULL".into(), None, None),
    }
}

fn no_change_pending(pending: bool) {
    if pending {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "a raft_kv membership change is already in progress".into(),
            Some("Membership changes one at a time; nothing was changed."),
            Some("Retry once raft_members() shows the previous change."),
        )
    }
}

pub(crate) fn admin(op: Op, target: u64, address: &str, as_learner: bool) -> requests::Reply {
    let req =
        requests::Request { op, key: address, value: "", expected: None, request_id: None, target, arg: 0, as_learner };
    submit(&req)
}

/// Adds node `node_id`, listening for Raft traffic at `address`, to the cluster: first as a
/// learner that catches up (by snapshot), then, unless `as_learner`, promoted to voter
/// automatically once within `raft_kv.promote_lag` entries. Returns once the learner is added.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_join(node_id: Option<i64>, address: Option<&str>, as_learner: default!(Option<bool>, "false")) -> i64 {
    require_preload();
    let id = check_node_id(node_id);
    let Some(address) = address else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv address must not be NULL".into(), None, None)
    };
    let parsed = raft_kv_core::config::parse_addr(address)
        .unwrap_or_else(|e| raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None, None));
    let (members, pending) = membership();
    if members.iter().any(|m| m.0 == id) {
        raise(Code::ERRCODE_DUPLICATE_OBJECT, format!("raft_kv node {id} is already a member"), None, None)
    }
    if let Some(m) = members.iter().find(|m| m.1.parse().ok() == Some(parsed)) {
        raise(
            Code::ERRCODE_DUPLICATE_OBJECT,
            format!("address {parsed} is already used by raft_kv node {}", m.0),
            None,
            None,
        )
    }
    no_change_pending(pending);
    admin(Op::Join, id, &parsed.to_string(), as_learner.unwrap_or(false)).revision
}

/// Removes node `node_id` (voter or learner) from the cluster. Returns once applied here.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_remove(node_id: Option<i64>) -> i64 {
    require_preload();
    let id = check_node_id(node_id);
    let (members, pending) = membership();
    let Some(target) = members.iter().find(|m| m.0 == id) else {
        raise(Code::ERRCODE_UNDEFINED_OBJECT, format!("raft_kv node {id} is not a member"), None, None)
    };
    if target.2 && members.iter().filter(|m| m.2).count() == 1 {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("raft_kv node {id} is the last voter and cannot be removed"),
            None,
            None,
        )
    }
    no_change_pending(pending);
    admin(Op::Remove, id, "", false).revision
}

/// Moves leadership to voter `node_id`; returns once this node sees it lead.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_transfer_leader(node_id: Option<i64>) -> bool {
    require_preload();
    let id = check_node_id(node_id);
    let (members, _) = membership();
    match members.iter().find(|m| m.0 == id) {
        None => raise(Code::ERRCODE_UNDEFINED_OBJECT, format!("raft_kv node {id} is not a member"), None, None),
        Some(m) if !m.2 => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("raft_kv node {id} is a learner; leadership can only move to a voter"),
            None,
            None,
        ),
        Some(_) => admin(Op::Transfer, id, "", false).flag,
    }
}

/// Whether the caller may see peer addresses: members of raft_kv_admin or pg_monitor
/// (superusers have every role's privileges).
fn sees_addresses() -> bool {
    // SAFETY: catalog lookups by name and id in a backend with a transaction open.
    unsafe {
        let me = pg_sys::GetUserId();
        let admin = pg_sys::get_role_oid(c"raft_kv_admin".as_ptr(), true);
        (admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(me, admin))
            || pg_sys::has_privs_of_role(me, pg_sys::Oid::from(pg_sys::ROLE_PG_MONITOR))
    }
}

/// One row describing this node: identity, worker state and Raft progress. `listen_addr` and
/// `peers` are NULL unless the caller is in raft_kv_admin or pg_monitor.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_status() -> TableIterator<
    'static,
    (
        name!(node_id, Option<i64>),
        name!(listen_addr, Option<String>),
        name!(peers, Option<String>),
        name!(worker_pid, Option<i32>),
        name!(state, String),
        name!(role, Option<String>),
        name!(term, Option<i64>),
        name!(leader_id, Option<i64>),
        name!(commit_index, Option<i64>),
        name!(applied_index, Option<i64>),
        name!(first_index, Option<i64>),
        name!(last_index, Option<i64>),
        name!(snapshot_index, Option<i64>),
        name!(snapshot_term, Option<i64>),
        name!(voters, Option<Vec<i64>>),
        name!(change_pending, Option<bool>),
        name!(cluster_id, Option<String>),
        name!(revision, Option<i64>),
        name!(compact_revision, Option<i64>),
    ),
> {
    require_preload();
    let privileged = sees_addresses();
    let sh = SHARED.share();
    let s = &sh.status;
    let has_node = !s.role.get().is_empty();
    let raft = |v: u64| has_node.then_some(v as i64);
    let voters: Vec<i64> = s.members[..s.n_members as usize].iter().filter(|m| m.voter).map(|m| m.id as i64).collect();
    let row = (
        nonzero(s.node_id),
        Some(s.listen_addr.get()).filter(|a| privileged && !a.is_empty()),
        Some(s.peers.get()).filter(|a| privileged && !a.is_empty()),
        (s.worker_pid != 0).then_some(s.worker_pid),
        s.state.get(),
        has_node.then(|| s.role.get()),
        raft(s.term),
        nonzero(s.leader_id),
        raft(s.commit),
        raft(s.applied),
        raft(s.first_index),
        raft(s.last_index),
        raft(s.snapshot_index),
        raft(s.snapshot_term),
        has_node.then_some(voters),
        has_node.then_some(s.change_pending),
        (s.cluster_id != 0).then(|| format!("{:032x}", s.cluster_id)),
        raft(s.revision),
        raft(s.compact_revision),
    );
    TableIterator::once(row)
}

/// One row per cluster member. match_index and active are known on the leader only; version and
/// log_format as far as this node knows (NULL: the member has not said, as builds before 0.2.0
/// never do).
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_members() -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(address, Option<String>),
        name!(voter, bool),
        name!(match_index, Option<i64>),
        name!(active, Option<bool>),
        name!(version, Option<String>),
        name!(log_format, Option<i32>),
    ),
> {
    require_preload();
    let sh = SHARED.share();
    let rows: Vec<_> = sh.status.members[..sh.status.n_members as usize]
        .iter()
        .map(|m| {
            (
                m.id as i64,
                Some(m.addr.get()).filter(|a| !a.is_empty()),
                m.voter,
                m.has_progress.then_some(m.matched as i64),
                m.has_progress.then_some(m.active),
                (m.format != 0).then(|| m.version.get()),
                (m.format != 0).then_some(m.format as i32),
            )
        })
        .collect();
    TableIterator::new(rows)
}
