//! The rows every write batch writes, on every node, written without the planner
//! ([`heap_write`]): the log entries, the keys put with their history and request ids, and the
//! state row. What is only inserted goes in with one multi-insert per table and batch. The
//! rarer statements of a batch (deletes, leases, compaction, a snapshot's install) stay SQL in
//! `storage.rs`.

use std::collections::HashMap;
use std::ffi::{CStr, CString};

use pgrx::pg_sys;

use raft_kv_core::apply::Effects;
use raft_kv_core::eraftpb::{Entry, EntryType};
use raft_kv_core::storage::{encode_conf_state, StoreError, StoreResult, WriteBatch};

use crate::heap_write::{OpenError, Value, Writer};
use crate::index_probe::{self, Key, Probe, Snap};

/// The log kind stored for an entry (`raft_kv.log.kind`).
pub fn kind_of(e: &Entry) -> i16 {
    match e.get_entry_type() {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

/// Whether the log holds an entry at `index`.
pub fn log_has(schema: &str, index: u64) -> StoreResult<bool> {
    let mut p = probe(&schema_c(schema)?, c"log", 1)?;
    let found = p.find(&[Key::Int8(index as i64)]);
    p.close();
    Ok(found)
}

/// Appends `entries` to the log (a conflicting suffix was deleted first).
pub fn append_log(schema: &str, entries: &[Entry]) -> StoreResult<()> {
    let schema = schema_c(schema)?;
    let mut w = open(&schema, c"log", &[c"idx", c"term", c"kind", c"data", c"context"], true)?;
    for e in entries {
        w.add(&[
            Value::Int8(e.index as i64),
            Value::Int8(e.term as i64),
            Value::Int2(kind_of(e)),
            Value::Bytes(&e.data),
            Value::Bytes(&e.context),
        ]);
    }
    w.close();
    Ok(())
}

/// Where the rows of keys are (`None`: absent), as the batch's look-up found them in this
/// transaction. Only the worker writes raft_kv's tables, and a batch writes each key once, so
/// a row found there is still the key's row when the batch writes it.
pub type KeyRows = HashMap<String, Option<pg_sys::ItemPointerData>>;

/// The keys put (each updated where it exists, else inserted), the history rows and the
/// request ids of a batch. Deleted keys were deleted first; no key is both. A key `found` holds
/// is not looked for again.
pub fn write_effects(schema: &str, fx: &Effects, found: &KeyRows) -> StoreResult<()> {
    let schema = schema_c(schema)?;
    if fx.kv.values().any(Option::is_some) {
        let columns = [c"key", c"value", c"mod_revision", c"create_revision", c"version", c"lease"];
        let mut w = open(&schema, c"kv", &columns, true)?;
        let mut p = None;
        for (key, row) in &fx.kv {
            let Some(r) = row else { continue };
            let row = [
                Value::Text(key),
                Value::Text(&r.value),
                Value::Int8(r.mod_revision as i64),
                Value::Int8(r.create_revision as i64),
                Value::Int8(r.version as i64),
                Value::Int8(r.lease as i64),
            ];
            let at = match found.get(key) {
                Some(at) => *at,
                None => {
                    // Read by a prefix or not at all: looked for now.
                    let p = match &mut p {
                        Some(p) => p,
                        None => p.insert(probe(&schema, c"kv", 1)?),
                    };
                    p.find(&[Key::Text(key)]).then(|| p.tid())
                }
            };
            match at {
                Some(tid) => w.update_at(tid, &row),
                None => w.add(&row),
            }
        }
        if let Some(p) = p {
            p.close();
        }
        w.close();
    }
    if !fx.changes.is_empty() {
        let columns = [
            c"revision",
            c"key",
            c"kind",
            c"value",
            c"prev_value",
            c"create_revision",
            c"version",
            c"prev_mod_revision",
        ];
        let mut w = open(&schema, c"changes", &columns, true)?;
        for ch in &fx.changes {
            w.add(&[
                Value::Int8(ch.revision as i64),
                Value::Text(&ch.key),
                Value::Text(ch.kind.as_str()),
                text(&ch.value),
                text(&ch.prev_value),
                Value::Int8(ch.create_revision as i64),
                Value::Int8(ch.version as i64),
                ch.prev_mod_revision.map_or(Value::Null, |r| Value::Int8(r as i64)),
            ]);
        }
        w.close();
    }
    if !fx.requests.is_empty() {
        let mut w = open(&schema, c"requests", &[c"nonce", c"seq", c"node", c"revision", c"flag"], true)?;
        for (&(nonce, seq), &(node, revision, flag)) in &fx.requests {
            w.add(&[
                Value::Int8(nonce as i64),
                Value::Int8(seq as i64),
                Value::Int8(node as i64),
                Value::Int8(revision as i64),
                Value::Bool(flag),
            ]);
        }
        w.close();
    }
    Ok(())
}

/// The hard state, the applied index, the configuration and the revisions, each where the
/// batch gives it: one update of the state row.
pub fn write_state(schema: &str, b: &WriteBatch, fx: &Effects) -> StoreResult<()> {
    let schema = schema_c(schema)?;
    let columns =
        [c"term", c"vote", c"commit_index", c"applied_index", c"conf_state", c"revision", c"compact_revision"];
    let mut w = open(&schema, c"state", &columns, false)?;
    let mut p = probe(&schema, c"state", 1)?;
    if !p.find(&[Key::Int4(1)]) {
        p.close();
        w.close();
        return Err(StoreError::Corrupt(format!("{}.state has no row", schema.to_string_lossy())));
    }
    let int8 = |v: Option<u64>| v.map_or(Value::Keep, |v| Value::Int8(v as i64));
    let hs = b.hard_state.as_ref();
    let conf = b.conf_state.as_ref().map(encode_conf_state);
    w.update(
        &p,
        &[
            int8(hs.map(|h| h.term)),
            int8(hs.map(|h| h.vote)),
            int8(hs.map(|h| h.commit)),
            int8(b.applied),
            conf.as_deref().map_or(Value::Keep, Value::Bytes),
            int8(fx.revision),
            int8(fx.compact_revision),
        ],
    );
    p.close();
    w.close();
    Ok(())
}

pub fn schema_c(schema: &str) -> StoreResult<CString> {
    CString::new(schema).map_err(|e| StoreError::Backend(e.to_string()))
}

fn open(schema: &CStr, table: &CStr, columns: &[&CStr], all: bool) -> StoreResult<Writer> {
    // SAFETY: in the worker's write transaction (storage.rs's in_txn); closed by the caller.
    unsafe { Writer::open(schema, table, columns, all) }.map_err(|e| match e {
        OpenError::Missing => {
            StoreError::Corrupt(format!("{}.{} is missing", schema.to_string_lossy(), table.to_string_lossy()))
        }
        OpenError::Columns(why) => StoreError::Corrupt(format!("{}.{why}", schema.to_string_lossy())),
    })
}

/// A probe of `table`'s primary key that sees the transaction's own rows.
pub fn probe(schema: &CStr, table: &CStr, nkeys: usize) -> StoreResult<Probe> {
    let missing = || {
        StoreError::Corrupt(format!(
            "{}.{} or its primary key is missing",
            schema.to_string_lossy(),
            table.to_string_lossy()
        ))
    };
    let relid = index_probe::relid(schema, table).ok_or_else(missing)?;
    // SAFETY: in the worker's transaction (the look-up's or the write's); closed by the caller.
    unsafe { Probe::open(relid, nkeys, Snap::AfterOwnWrites) }.ok_or_else(missing)
}

fn text(v: &Option<String>) -> Value<'_> {
    v.as_deref().map_or(Value::Null, Value::Text)
}
