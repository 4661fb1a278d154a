//! What every SQL function shares at the boundary: argument checks, typed errors turned into
//! Postgres ERRORs with a SQLSTATE a client can act on, the hand-off of a request to the worker,
//! the read barrier, and the backend's kept read plans. Also the `raft_kv.is_worker()` helper
//! of the tables' guard trigger.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::command::{scoped_request_key, MAX_KEY_BYTES, MAX_REQUEST_ID_BYTES};

use crate::guc;
use crate::requests::{self, RequestError};
use crate::shmem::{self, Op};

pub(crate) fn require_preload() {
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

pub(crate) fn raise(code: Code, message: String, detail: Option<&str>, hint: Option<&str>) -> ! {
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

pub(crate) fn check_key(key: Option<&str>) -> &str {
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

pub(crate) fn check_value(value: Option<&str>) -> &str {
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

pub(crate) fn request(
    op: Op,
    key: &str,
    value: &str,
    expected: Option<&str>,
    request_id: Option<&str>,
) -> requests::Reply {
    request_on(op, key, value, expected, request_id, (0, 0))
}

/// [`request`] with a lease (or other target) and a numeric argument: `(target, arg)`.
pub(crate) fn request_on(
    op: Op,
    key: &str,
    value: &str,
    expected: Option<&str>,
    request_id: Option<&str>,
    (target, arg): (u64, u64),
) -> requests::Reply {
    // A client's request id names one command of one role: another role, or another command
    // under the same id, is a new request and can neither read nor block the first one's
    // outcome.
    let scoped = request_id.map(|id| {
        // SAFETY: reads the session's current user id; no preconditions.
        let role = unsafe { pg_sys::GetUserId() }.to_u32();
        let (t, a) = (target.to_string(), arg.to_string());
        let numbers = format!("{t}/{a}");
        // Without a target, the key is what it always was (a retry across an upgrade matches).
        let args: &[Option<&str>] = if (target, arg) == (0, 0) {
            &[Some(key), Some(value), expected]
        } else {
            &[Some(key), Some(value), expected, Some(&numbers)]
        };
        scoped_request_key(role, op as u8, args, id)
    });
    let req =
        requests::Request { op, key, value, expected, request_id: scoped.as_deref(), target, arg, as_learner: false };
    submit(&req)
}

pub(crate) fn submit(req: &requests::Request) -> requests::Reply {
    requests::submit(req).unwrap_or_else(|e| match e {
        RequestError::NotRunning(state) => raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("raft_kv is not running on this node: {state}"),
            Some("The write was not attempted."),
            Some("SELECT * FROM raft_status() shows the node's state."),
        ),
        RequestError::Busy => raise(
            Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("raft_kv serves the first {} server processes; this session's process is past them", shmem::NSLOTS),
            Some("The request was not attempted."),
            Some("Lower max_connections (plus background workers) below that number."),
        ),
        RequestError::NotCommitted(m) => raise(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("raft_kv {} not committed: {m}", if req.target != 0 { "change" } else { "write" }),
            Some("The write certainly did not happen; it is safe to retry."),
            None,
        ),
        RequestError::Unknown(m) => raise(
            Code::ERRCODE_T_R_STATEMENT_COMPLETION_UNKNOWN,
            format!("raft_kv {} outcome unknown: {m}", if req.target != 0 { "change" } else { "write" }),
            Some("The write may or may not have been applied; read the key to find out."),
            None,
        ),
        RequestError::Refused(m) => {
            raise(Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("raft_kv: {m}"), None, None)
        }
        RequestError::Invalid(m) => {
            raise(Code::ERRCODE_DATA_EXCEPTION, format!("raft_kv: {m}"), Some("Nothing was restored."), None)
        }
        RequestError::ReadFailed(m) => raise(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("raft_kv linearizable read failed: {m}"),
            Some("Nothing was read; it is safe to retry."),
            Some("consistency => 'local' reads this node's state without contacting the leader (it may be stale)."),
        ),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Consistency {
    Linearizable,
    Local,
}

pub(crate) fn consistency(c: Option<&str>) -> Consistency {
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
pub(crate) fn read_barrier(c: Consistency) {
    if c == Consistency::Linearizable {
        // SAFETY: reads this backend's isolation level global.
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

pub(crate) const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);

thread_local! {
    /// This backend's kept read plans, by query text: parsing and planning a one-row lookup
    /// costs more than running it.
    static READ_PLANS: std::cell::RefCell<std::collections::HashMap<&'static str, pgrx::spi::OwnedPreparedStatement>> =
        Default::default();
}

/// Runs a read query with a fresh snapshot, through a plan kept for the backend's life.
/// (The calling statement's snapshot was taken before the read barrier and could miss writes
/// the barrier waited for.) Postgres re-plans a kept plan itself when the tables change.
pub(crate) fn fresh_select<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[pgrx::datum::DatumWithOid],
    f: impl FnOnce(pgrx::spi::SpiTupleTable) -> Result<R, pgrx::spi::SpiError>,
) -> R {
    kept_select(sql, types, args, true, f)
}

/// [`fresh_select`] when `fresh`; otherwise with the calling statement's snapshot, as a plain
/// SELECT in that statement would read: for `'local'` reads, which have no barrier to see past.
/// Taking a new snapshot there cost a quarter of a local read's throughput.
pub(crate) fn kept_select<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[pgrx::datum::DatumWithOid],
    fresh: bool,
    f: impl FnOnce(pgrx::spi::SpiTupleTable) -> Result<R, pgrx::spi::SpiError>,
) -> R {
    READ_PLANS
        .with_borrow_mut(|plans| {
            Spi::connect_mut(|c| {
                if !plans.contains_key(sql) {
                    let plan = c.prepare_mut(sql, types)?.keep();
                    plans.insert(sql, plan);
                }
                let plan = &plans[sql];
                if !fresh {
                    return f(c.select(plan, None, args)?);
                }
                // A new snapshot, then a read-only execution under it: what SPI's non-read-only
                // execution does for a SELECT, without its command-counter work (5-10 % of a
                // linearizable read, measured).
                // SAFETY: pushes a snapshot and pops it before returning; an ERROR in between
                // aborts the transaction, which clears the active snapshot stack.
                unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
                let read = c.select(plan, None, args);
                // SAFETY: the snapshot pushed above is still the active one.
                unsafe { pg_sys::PopActiveSnapshot() };
                f(read?)
            })
        })
        .unwrap_or_else(|e: pgrx::spi::SpiError| {
            raise(Code::ERRCODE_INTERNAL_ERROR, format!("raft_kv: reading failed: {e}"), None, None)
        })
}

pub(crate) fn check_request_id(id: Option<&str>) -> Option<&str> {
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

/// Schema of the extension's tables; also holds the helper the guard trigger calls.
#[pg_schema]
mod raft_kv {
    use pgrx::prelude::*;

    /// True only in the raft_kv worker (and its snapshot freeze worker): the guard trigger
    /// lets nobody else write the tables.
    #[pg_extern(stable, parallel_safe)]
    fn is_worker() -> bool {
        // SAFETY: reads this process's pid global.
        let me = unsafe { pgrx::pg_sys::MyProcPid };
        crate::shmem::preloaded() && {
            let s = &crate::shmem::SHARED.share().status;
            s.worker_pid == me || s.freeze_pid == me
        }
    }
}
