//! `raft_txn`: etcd's transactions in SQL. The JSON is parsed and checked here (a clear
//! ERROR naming the offending element, nothing written), proposed as one log entry, decided
//! when it applies (`raft_kv_core::apply`), and its get and delete responses read back from
//! the history at the transaction's revision.

use pgrx::prelude::*;
use pgrx::JsonB;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::txn::{Scope, Txn, TxnOp};
use serde_json::{json, Value};

use crate::guc;
use crate::history_api::{changes_at, get_at, scan_at};
use crate::shmem::Op;
use crate::sql_boundary::{check_request_id, raise, request, require_preload};

fn scope_json(s: &Scope) -> (&'static str, &str) {
    match s {
        Scope::Key(k) => ("key", k),
        Scope::Prefix(p) => ("prefix", p),
    }
}

/// Runs `success` if every `compare` holds, else `failure`, atomically at one revision on
/// every node. Returns whether the compares held, the store's revision after the
/// transaction, and one response per op of the branch taken: a put's revision, how many keys
/// a delete removed, and what a get read, as the compares saw the store (before the
/// transaction's own writes). A `request_id` makes retries safe, as for `raft_set`.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_txn(
    compare: Option<JsonB>,
    success: Option<JsonB>,
    failure: default!(Option<JsonB>, "'[]'"),
    request_id: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(succeeded, bool), name!(revision, i64), name!(responses, JsonB))> {
    require_preload();
    let arg = |name: &str, v: Option<JsonB>| -> Value {
        match v {
            Some(JsonB(v)) => v,
            None => raise(
                Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("raft_kv transaction {name} must not be NULL"),
                None,
                Some("Pass '[]' for none."),
            ),
        }
    };
    let (compare, success, failure) = (arg("compare", compare), arg("success", success), arg("failure", failure));
    let txn = Txn::from_json(&compare, &success, &failure).unwrap_or_else(|e| {
        raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid raft_kv transaction: {e}"), None, None)
    });
    let max = guc::MAX_VALUE_BYTES.get() as usize;
    for (name, ops) in [("success", &txn.success), ("failure", &txn.failure)] {
        for (i, op) in ops.iter().enumerate() {
            if let Some((_, value, _)) = op.put() {
                if value.len() > max {
                    raise(
                        Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                        format!("invalid raft_kv transaction: {name}[{i}]: the value is {} bytes, over raft_kv.max_value_bytes ({max} bytes)", value.len()),
                        None,
                        None,
                    )
                }
            }
        }
    }
    let encoded = serde_json::to_string(&txn).expect("a transaction serializes");
    if encoded.len() > max.max(1 << 20) {
        raise(
            Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "raft_kv transaction is {} bytes encoded, over the limit of {} bytes",
                encoded.len(),
                max.max(1 << 20)
            ),
            Some("The limit is raft_kv.max_value_bytes, or 1 MiB if that is lower."),
            None,
        )
    }
    let reply = request(Op::Txn, "", &encoded, None, check_request_id(request_id));
    if let Some(r) = reply.refused {
        // A put named a lease that is gone or full: the transaction did nothing.
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .filter_map(|op| op.put())
            .map(|p| p.2)
            .find(|l| *l != 0)
            .unwrap_or(0);
        crate::lease_api::refused(Some(r), lease)
    }
    let revision = reply.revision as u64;
    let branch = if reply.flag { &txn.success } else { &txn.failure };
    // This transaction's own changes are those at its revision, if it wrote. A retry answered
    // from the first call's result does not say whether that call wrote: the history does.
    // Read only when needed: to decide that, or to count a delete's keys.
    let needs_history = reply.wrote.is_none() || branch.iter().any(|op| matches!(op, TxnOp::Delete(_)));
    let at_revision = if needs_history { changes_at(revision) } else { Vec::new() };
    let wrote = reply.wrote.unwrap_or_else(|| {
        branch.iter().any(|op| match op {
            TxnOp::Put { key, .. } | TxnOp::PutLease { key, .. } => at_revision.iter().any(|(k, _)| k == key),
            TxnOp::Delete(s) => at_revision.iter().any(|(k, deleted)| *deleted && s.contains(k)),
            TxnOp::Get(_) => false,
        })
    });
    let seen = if wrote { revision - 1 } else { revision };
    let responses: Vec<Value> = branch
        .iter()
        .map(|op| match op {
            TxnOp::Put { key, .. } | TxnOp::PutLease { key, .. } => {
                json!({"op": "put", "key": key, "revision": revision})
            }
            TxnOp::Delete(s) => {
                let deleted = if wrote { at_revision.iter().filter(|(k, d)| *d && s.contains(k)).count() } else { 0 };
                let (field, v) = scope_json(s);
                json!({"op": "delete", field: v, "deleted": deleted})
            }
            TxnOp::Get(s) => {
                let kvs: Vec<(String, raft_kv_core::types::KvRow)> = match (s, seen) {
                    (_, 0) => Vec::new(),
                    (Scope::Key(k), at) => get_at(k, Some(at)).map(|r| (k.clone(), r)).into_iter().collect(),
                    (Scope::Prefix(p), at) => scan_at(p, Some(at)),
                };
                let kvs: Vec<Value> = kvs
                    .into_iter()
                    .map(|(k, r)| {
                        json!({"key": k, "value": r.value, "mod_revision": r.mod_revision,
                               "create_revision": r.create_revision, "version": r.version})
                    })
                    .collect();
                let (field, v) = scope_json(s);
                json!({"op": "get", field: v, "kvs": kvs})
            }
        })
        .collect();
    TableIterator::once((reply.flag, reply.revision, JsonB(Value::Array(responses))))
}
