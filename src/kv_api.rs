//! The key-value functions: `raft_set`, `raft_cas`, `raft_delete` (and the `_rev` forms) and
//! `raft_get`.
//!
//! Every SQL function pins its search_path but these hot ones, where a pin's GUC save and
//! restore on each call costs (about 0.1 ms of a write's p50 at one client, see
//! BENCHMARKS.md): the writes run no SQL in the caller's session, only hand the request to the
//! worker; `raft_get` schema-qualifies every name it uses (below).
//! tests/tests/privileges.rs calls all of them as a superuser with a hostile search_path.

use pgrx::prelude::*;

use crate::requests;
use crate::shmem::Op;
use crate::sql_boundary::{
    check_key, check_request_id, check_value, kept_select, read_barrier, request, request_on, require_preload,
    Consistency, TEXT,
};

/// Writes `key = value` through the Raft log; returns the revision at which it applied.
/// A `request_id` makes retries safe: calling again with the same id (on any node, after an
/// "outcome unknown" error, say) returns the first call's revision without writing again.
#[pg_extern(volatile, parallel_unsafe)]
fn raft_set(
    key: Option<&str>,
    value: Option<&str>,
    request_id: default!(Option<&str>, "NULL"),
    lease: default!(Option<i64>, "NULL"),
) -> i64 {
    require_preload();
    let key = check_key(key);
    let value = check_value(value);
    let lease = lease.map_or(0, |l| crate::lease_api::lease_arg(Some(l)));
    let r = request_on(Op::Set, key, value, None, check_request_id(request_id), (lease, 0));
    if !r.flag {
        // Only a put attached to a lease can be refused.
        crate::lease_api::refused(r.refused, lease)
    }
    r.revision
}

/// Writes `new` only if the key's current value equals `expected` (NULL: the key is absent),
/// decided when the entry applies, so it is atomic cluster-wide. Returns whether it wrote.
#[pg_extern(volatile, parallel_unsafe)]
fn raft_cas(
    key: Option<&str>,
    expected: Option<&str>,
    new: Option<&str>,
    request_id: default!(Option<&str>, "NULL"),
) -> bool {
    cas(key, expected, new, request_id).flag
}

fn cas(key: Option<&str>, expected: Option<&str>, new: Option<&str>, request_id: Option<&str>) -> requests::Reply {
    require_preload();
    let key = check_key(key);
    let new = check_value(new);
    if let Some(e) = expected {
        check_value(Some(e));
    }
    request(Op::Cas, key, new, expected, check_request_id(request_id))
}

/// `raft_cas` with the store's revision once it applied (the write's, when it wrote).
#[pg_extern(volatile, parallel_unsafe)]
fn raft_cas_rev(
    key: Option<&str>,
    expected: Option<&str>,
    new: Option<&str>,
    request_id: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(succeeded, bool), name!(revision, i64))> {
    let r = cas(key, expected, new, request_id);
    TableIterator::once((r.flag, r.revision))
}

/// Deletes `key` through the Raft log; returns whether it existed.
#[pg_extern(volatile, parallel_unsafe)]
fn raft_delete(key: Option<&str>, request_id: default!(Option<&str>, "NULL")) -> bool {
    delete(key, request_id).flag
}

fn delete(key: Option<&str>, request_id: Option<&str>) -> requests::Reply {
    require_preload();
    let key = check_key(key);
    request(Op::Delete, key, "", None, check_request_id(request_id))
}

/// `raft_delete` with the store's revision once it applied (the delete's, when the key existed).
#[pg_extern(volatile, parallel_unsafe)]
fn raft_delete_rev(
    key: Option<&str>,
    request_id: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(deleted, bool), name!(revision, i64))> {
    let r = delete(key, request_id);
    TableIterator::once((r.flag, r.revision))
}

/// The value of `key`, NULL when absent. `'linearizable'` (the default) reflects every write
/// that completed before the call, on any node; `'local'` reads this node's applied state
/// without contacting the leader (possibly stale). `at_revision` reads the value as of that
/// revision (SQLSTATE 72000 once compacted).
///
/// Its search_path is not pinned (a pin is 15-20 % of a local read). Nothing it runs resolves
/// a name through search_path: every table, type and operator is schema-qualified.
#[pg_extern(volatile, parallel_unsafe)]
fn raft_get(
    key: Option<&str>,
    consistency: default!(Option<&str>, "'linearizable'"),
    at_revision: default!(Option<i64>, "NULL"),
) -> Option<String> {
    require_preload();
    let key = check_key(key);
    let at = crate::history_api::revision_arg("at_revision", at_revision);
    let consistency = crate::sql_boundary::consistency(consistency);
    read_barrier(consistency);
    if at.is_none() {
        // The hot path: the value alone, through the primary-key index without the executor
        // where the caller may read the table plainly; otherwise through a kept plan.
        let fresh = consistency == Consistency::Linearizable;
        if let Some(value) = crate::kv_probe::value_of(key, fresh) {
            return value;
        }
        let sql = "SELECT value FROM raft_kv.kv WHERE key OPERATOR(pg_catalog.=) $1";
        return kept_select(sql, &[TEXT], &[key.into()], fresh, |t| {
            if t.is_empty() {
                Ok(None)
            } else {
                t.first().get::<String>(1)
            }
        });
    }
    crate::history_api::get_at(key, at).map(|r| r.value)
}
