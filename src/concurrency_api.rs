//! etcd's `concurrency` recipes as SQL functions: a mutex and a leader election, each built
//! from a lease, one transaction and the watch, as etcd builds them.
//!
//! A contender writes its own key, `<name>/<lease id in hex>`, attached to its lease, only if
//! it does not exist (a transaction on its create revision). Contenders are ordered by their
//! keys' create revisions: the lowest holds the lock (or leads), the others wait, woken by
//! every applied revision (the watch's condition variable, never polling), until every key
//! created before theirs is gone: released, resigned, or deleted with its expired lease. The
//! create revision of the holder's key is its fencing token: it grows with every acquisition.

use std::time::{Duration, Instant};

use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::command::check_key as key_rules;
use raft_kv_core::txn::{CmpOp, Compare, Scope, Target, Txn, TxnOp};
use raft_kv_core::types::KvRow;

use crate::history_api::{get_at, scan_at, wait_for_revision_above};
use crate::lease_api::{lease_arg, refused};
use crate::shmem::{self, Op};
use crate::sql_boundary::{check_value, consistency, raise, read_barrier, request, require_preload};

/// The contender's key for `name` and `lease`.
fn contender_key(name: Option<&str>, lease: u64) -> (String, String) {
    let Some(name) = name else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv lock or election name must not be NULL".into(), None, None)
    };
    let prefix = format!("{name}/");
    let key = format!("{prefix}{lease:016x}");
    if name.is_empty() || key_rules(&key).is_err() {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "raft_kv lock or election name must be a non-empty key of at most 1000 bytes".into(),
            None,
            None,
        )
    }
    (prefix, key)
}

/// Creates `key = value` on `lease` unless it exists; returns its create revision.
fn create_once(key: &str, value: &str, lease: u64) -> u64 {
    let txn = Txn {
        compare: vec![Compare { scope: Scope::Key(key.into()), target: Target::CreateRevision(0), op: CmpOp::Eq }],
        success: vec![TxnOp::PutLease { key: key.into(), value: value.into(), lease }],
        failure: Vec::new(),
    };
    let encoded = serde_json::to_string(&txn).expect("a transaction serializes");
    let reply = request(Op::Txn, "", &encoded, None, None);
    if reply.refused.is_some() {
        refused(reply.refused, lease)
    }
    if reply.flag {
        return reply.revision as u64;
    }
    // It existed: this lease is already a contender (applied here before the reply came).
    match get_at(key, None) {
        Some(row) => row.create_revision,
        None => raise(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "raft_kv contender key vanished (its lease expired or it was released)".into(),
            Some("Nothing is held; it is safe to retry."),
            None,
        ),
    }
}

/// Waits until no key under `prefix` was created before `mine` (then `key` holds), or the
/// deadline passes (`None`: no limit). Errors if `key` itself goes meanwhile.
fn wait_for_turn(prefix: &str, key: &str, mine: u64, deadline: Option<Instant>) -> bool {
    loop {
        let revision = shmem::revisions().0;
        // Local reads are enough: this node has applied `mine`, so it sees every key created
        // before it that still exists.
        match get_at(key, None) {
            Some(r) if r.create_revision == mine => {}
            _ => raise(
                Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
                "raft_kv lost its place while waiting: its key was deleted (the lease expired, or it was released)"
                    .into(),
                Some("Nothing is held."),
                Some("Keep the lease alive while waiting, or wait for less than its TTL."),
            ),
        }
        let ahead = scan_at(prefix, None).into_iter().any(|(_, r)| r.create_revision < mine);
        if !ahead {
            return true;
        }
        let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if Instant::now() >= until {
            return false;
        }
        wait_for_revision_above(revision, until);
    }
}

/// Waits for the turn of `key` (created at `mine`); its token, or `None` after leaving the
/// line when the deadline passed.
fn take_turn(prefix: &str, key: &str, mine: u64, deadline: Option<Instant>) -> Option<i64> {
    if wait_for_turn(prefix, key, mine, deadline) {
        Some(mine as i64)
    } else {
        request(Op::Delete, key, "", None, None);
        None
    }
}

fn deadline_of(wait: Option<Interval>) -> Option<Instant> {
    let micros = wait?.as_micros();
    if micros < 0 {
        raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, "raft_kv wait must not be negative".into(), None, None)
    }
    Some(Instant::now() + Duration::from_micros(micros.min(u64::MAX as i128) as u64))
}

/// Acquires the lock `name` for the holder of `lease`, waiting in line (by create revision)
/// for at most `wait` (NULL: until cancelled or statement_timeout). Returns the fencing token
/// (the revision at which this holder's key was created, larger for every later holder), or
/// NULL when the wait ran out (the place in line is given up). The lock is held while the
/// lease lives: pass the token to every write made under it (raft_cas, raft_txn compares).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_lock(name: Option<&str>, lease: Option<i64>, wait: default!(Option<Interval>, "NULL")) -> Option<i64> {
    require_preload();
    let lease = lease_arg(lease);
    let (prefix, key) = contender_key(name, lease);
    let deadline = deadline_of(wait);
    let mine = create_once(&key, "", lease);
    take_turn(&prefix, &key, mine, deadline)
}

/// Releases the lock `name` held (or waited for) with `lease`; returns whether it was held or
/// waited for.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_unlock(name: Option<&str>, lease: Option<i64>) -> bool {
    leave(name, lease)
}

/// Deletes the contender key of `lease` under `name`; whether it existed.
fn leave(name: Option<&str>, lease: Option<i64>) -> bool {
    require_preload();
    let lease = lease_arg(lease);
    let (_, key) = contender_key(name, lease);
    request(Op::Delete, &key, "", None, None).flag
}

/// Campaigns in `election` with `value` for the holder of `lease`, waiting in line for at most
/// `wait` (NULL: no limit). Returns the leadership's revision (its key's create revision, a
/// fencing token) once leader, or NULL when the wait ran out. Campaigning again with the same
/// lease updates the value.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_campaign(
    election: Option<&str>,
    lease: Option<i64>,
    value: Option<&str>,
    wait: default!(Option<Interval>, "NULL"),
) -> Option<i64> {
    require_preload();
    let lease = lease_arg(lease);
    let (prefix, key) = contender_key(election, lease);
    let value = check_value(value);
    let deadline = deadline_of(wait);
    let mine = create_once(&key, value, lease);
    if get_at(&key, None).is_some_and(|r| r.value != value) {
        // Already a candidate with another value: proclaim the new one, on the same lease.
        let r = crate::sql_boundary::request_on(Op::Set, &key, value, None, None, (lease, 0));
        if !r.flag {
            refused(r.refused, lease)
        }
    }
    take_turn(&prefix, &key, mine, deadline)
}

/// The leader of `election`: its value, its leadership revision and its key; no row when
/// there is none. Linearizable by default. Observe changes with
/// `raft_watch(election || '/', since_revision)` and call this again on each change.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_leader(
    election: Option<&str>,
    consistency: default!(Option<&str>, "'linearizable'"),
) -> TableIterator<'static, (name!(value, String), name!(revision, i64), name!(key, String))> {
    require_preload();
    let (prefix, _) = contender_key(election, 0);
    read_barrier(self::consistency(consistency));
    let leader: Option<(String, KvRow)> = scan_at(&prefix, None).into_iter().min_by_key(|(_, r)| r.create_revision);
    TableIterator::new(leader.map(|(k, r)| (r.value, r.create_revision as i64, k)))
}

/// Gives up leadership of (or candidacy in) `election` held with `lease`; returns whether it
/// was held.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_resign(election: Option<&str>, lease: Option<i64>) -> bool {
    leave(election, lease)
}
