//! The SQL functions. Typed errors from the rest of the crate become Postgres ERRORs here,
//! each with a SQLSTATE a client can act on.
//!
//! Every function pins its search_path but the hot ones, where a pin's GUC save and restore on
//! each call costs (about 0.1 ms of a write's p50 at one client, see BENCHMARKS.md): the writes
//! (`raft_set`, `raft_cas`, `raft_delete` and their `_rev` forms) run no SQL in the caller's
//! session, only hand the request to the worker; `raft_get` schema-qualifies every name it
//! uses (below). tests/tests/privileges.rs calls all of them as a superuser with a hostile
//! search_path.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::command::{scoped_request_key, MAX_KEY_BYTES, MAX_REQUEST_ID_BYTES};

use crate::guc;
use crate::requests::{self, RequestError};
use crate::shmem::{self, Op, SHARED};

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
fn kept_select<R>(
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
    let consistency = self::consistency(consistency);
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
