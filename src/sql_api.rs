//! The SQL functions. Typed errors from the rest of the crate become Postgres ERRORs here,
//! each with a SQLSTATE a client can act on.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::command::{MAX_KEY_BYTES, MAX_REQUEST_ID_BYTES};

use crate::guc;
use crate::requests::{self, RequestError};
use crate::shmem::{self, Op, SHARED};

fn require_preload() {
    if !shmem::preloaded() {
        ErrorReport::new(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "raft_kv is not loaded through shared_preload_libraries",
            "require_preload",
        )
        .set_hint("Add raft_kv to shared_preload_libraries in postgresql.conf, set raft_kv.node_id, raft_kv.listen_addr and raft_kv.peers, and restart the server.")
        .report(PgLogLevel::ERROR);
    }
}

fn raise(code: Code, message: String, detail: Option<&str>, hint: Option<&str>) -> ! {
    let mut r = ErrorReport::new(code, message, "raft_kv");
    if let Some(d) = detail {
        r = r.set_detail(d);
    }
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!()
}

fn check_key(key: Option<&str>) -> &str {
    let Some(key) = key else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv key must not be NULL".into(), None, None)
    };
    if key.is_empty() {
        raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, "raft_kv key must not be empty".into(), None, None)
    }
    if key.len() > MAX_KEY_BYTES {
        raise(
            Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("raft_kv key is {} bytes, over the limit of {MAX_KEY_BYTES} bytes", key.len()),
            None,
            None,
        )
    }
    key
}

fn check_value(value: Option<&str>) -> &str {
    let Some(value) = value else {
        raise(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "raft_kv value must not be NULL".into(),
            None,
            Some("Use raft_delete() to remove a key."),
        )
    };
    let max = guc::MAX_VALUE_BYTES.get() as usize;
    if value.len() > max {
        raise(
            Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("raft_kv value is {} bytes, over raft_kv.max_value_bytes ({max} bytes)", value.len()),
            None,
            None,
        )
    }
    value
}

fn request(op: Op, key: &str, value: &str, expected: Option<&str>, request_id: Option<&str>) -> requests::Reply {
    let req = requests::Request { op, key, value, expected, request_id };
    requests::submit(&req).unwrap_or_else(|e| match e {
        RequestError::NotRunning(state) => raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("raft_kv is not running on this node: {state}"),
            Some("The write was not attempted."),
            Some("SELECT * FROM raft_status() shows the node's state."),
        ),
        RequestError::Busy => raise(
            Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("all {} raft_kv request slots are in use", shmem::NSLOTS),
            Some("The write was not attempted; it is safe to retry."),
            None,
        ),
        RequestError::NotCommitted(m) => raise(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("raft_kv write not committed: {m}"),
            Some("The write certainly did not happen; it is safe to retry."),
            None,
        ),
        RequestError::Unknown(m) => raise(
            Code::ERRCODE_T_R_STATEMENT_COMPLETION_UNKNOWN,
            format!("raft_kv write outcome unknown: {m}"),
            Some("The write may or may not have been applied; read the key to find out."),
            None,
        ),
        RequestError::ReadFailed(m) => raise(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("raft_kv linearizable read failed: {m}"),
            Some("Nothing was read; it is safe to retry."),
            Some("consistency => 'local' reads this node's state without contacting the leader (it may be stale)."),
        ),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Consistency {
    Linearizable,
    Local,
}

fn consistency(c: Option<&str>) -> Consistency {
    match c {
        Some("linearizable") => Consistency::Linearizable,
        Some("local") => Consistency::Local,
        other => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "invalid raft_kv consistency {}: choose 'linearizable' or 'local'",
                match other {
                    Some(s) => format!("\"{s}\""),
                    None => "NULL".into(),
                }
            ),
            None,
            None,
        ),
    }
}

/// For a linearizable read: waits until this node has applied everything committed when the
/// read started (confirmed with the leader through ReadIndex), so the local read that follows
/// cannot be stale.
fn read_barrier(c: Consistency) {
    if c == Consistency::Linearizable {
        if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
            raise(
                Code::ERRCODE_FEATURE_NOT_SUPPORTED,
                "raft_kv linearizable reads need READ COMMITTED isolation".into(),
                Some("Under REPEATABLE READ or SERIALIZABLE the transaction's snapshot predates the read, so it could be stale."),
                Some("Use consistency => 'local' inside such transactions, or read outside them."),
            )
        }
        request(Op::Read, "", "", None, None);
    }
}

/// Runs a read query with a fresh snapshot. (A read-only SPI query would reuse the calling
/// statement's snapshot, taken before the read barrier, and could miss writes the barrier
/// waited for.)
fn fresh_select<R>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
    f: impl FnOnce(pgrx::spi::SpiTupleTable) -> Result<R, pgrx::spi::SpiError>,
) -> R {
    Spi::connect_mut(|c| f(c.update(sql, None, args)?)).unwrap_or_else(|e: pgrx::spi::SpiError| {
        raise(Code::ERRCODE_INTERNAL_ERROR, format!("raft_kv: reading failed: {e}"), None, None)
    })
}

fn check_request_id(id: Option<&str>) -> Option<&str> {
    if let Some(id) = id {
        if id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES {
            raise(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("raft_kv request_id must be 1 to {MAX_REQUEST_ID_BYTES} bytes, got {}", id.len()),
                None,
                None,
            )
        }
    }
    id
}

/// Writes `key = value` through the Raft log; returns the revision at which it applied.
/// A `request_id` makes retries safe: calling again with the same id (on any node, after an
/// "outcome unknown" error, say) returns the first call's revision without writing again.
#[pg_extern(volatile, parallel_unsafe)]
fn raft_set(key: Option<&str>, value: Option<&str>, request_id: default!(Option<&str>, "NULL")) -> i64 {
    require_preload();
    let key = check_key(key);
    let value = check_value(value);
    request(Op::Set, key, value, None, check_request_id(request_id)).revision
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
    require_preload();
    let key = check_key(key);
    let new = check_value(new);
    if let Some(e) = expected {
        check_value(Some(e));
    }
    request(Op::Cas, key, new, expected, check_request_id(request_id)).flag
}

/// Deletes `key` through the Raft log; returns whether it existed.
#[pg_extern(volatile, parallel_unsafe)]
fn raft_delete(key: Option<&str>, request_id: default!(Option<&str>, "NULL")) -> bool {
    require_preload();
    let key = check_key(key);
    request(Op::Delete, key, "", None, check_request_id(request_id)).flag
}

/// The value of `key`, NULL when absent. `'linearizable'` (the default) reflects every write
/// that completed before the call, on any node; `'local'` reads this node's applied state
/// without contacting the leader (possibly stale).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
fn raft_get(key: Option<&str>, consistency: default!(Option<&str>, "'linearizable'")) -> Option<String> {
    require_preload();
    let key = check_key(key);
    read_barrier(self::consistency(consistency));
    fresh_select("SELECT value FROM raft_kv.kv WHERE key = $1", &[key.into()], |t| {
        if t.is_empty() {
            Ok(None)
        } else {
            t.first().get::<String>(1)
        }
    })
}

/// Every key starting with `prefix` (all keys for ''), ordered by key, with the same
/// consistency choices as `raft_get`.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
fn raft_scan(
    prefix: Option<&str>,
    consistency: default!(Option<&str>, "'linearizable'"),
) -> TableIterator<'static, (name!(key, String), name!(value, String), name!(revision, i64))> {
    require_preload();
    let Some(prefix) = prefix else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv prefix must not be NULL".into(), None, None)
    };
    read_barrier(self::consistency(consistency));
    let rows: Vec<(String, String, i64)> = fresh_select(
        "SELECT key, value, revision FROM raft_kv.kv WHERE starts_with(key, $1) ORDER BY key",
        &[prefix.into()],
        |t| {
            let mut rows = Vec::with_capacity(t.len());
            for r in t {
                rows.push((r.get(1)?.unwrap_or_default(), r.get(2)?.unwrap_or_default(), r.get(3)?.unwrap_or(0)));
            }
            Ok(rows)
        },
    );
    TableIterator::new(rows)
}

fn nonzero(v: u64) -> Option<i64> {
    (v != 0).then_some(v as i64)
}

/// One row describing this node: identity, worker state and Raft progress.
#[pg_extern(volatile, parallel_safe)]
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
    ),
> {
    require_preload();
    let sh = SHARED.share();
    let s = &sh.status;
    let has_node = !s.role.get().is_empty();
    let raft = |v: u64| has_node.then_some(v as i64);
    let voters: Vec<i64> = s.members[..s.n_members as usize].iter().filter(|m| m.voter).map(|m| m.id as i64).collect();
    let row = (
        nonzero(s.node_id),
        Some(s.listen_addr.get()).filter(|a| !a.is_empty()),
        Some(s.peers.get()).filter(|a| !a.is_empty()),
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
    );
    TableIterator::once(row)
}

/// One row per cluster member. match_index and active are known on the leader only.
#[pg_extern(volatile, parallel_safe)]
fn raft_members() -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(address, Option<String>),
        name!(voter, bool),
        name!(match_index, Option<i64>),
        name!(active, Option<bool>),
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
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Schema of the extension's tables; also holds the helper the guard trigger calls.
#[pg_schema]
mod raft_kv {
    use pgrx::prelude::*;

    /// True only in the raft_kv worker: the guard trigger lets nobody else write the tables.
    #[pg_extern(stable, parallel_safe)]
    fn is_worker() -> bool {
        crate::shmem::preloaded()
            && crate::shmem::SHARED.share().status.worker_pid == unsafe { pgrx::pg_sys::MyProcPid }
    }
}
