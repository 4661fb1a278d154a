//! `raft_get`'s hot path: one key's value read through `raft_kv.kv`'s primary-key index
//! directly, as Postgres's own catalog lookups read (`systable_beginscan`), instead of running
//! a kept plan through SPI. The executor's start-up and shut-down for a one-row plan cost about
//! as much as the index probe itself (a profile of backends serving linearizable reads:
//! `ExecutorStart` 12 % of their time, the scan 10 %).
//!
//! It reads what the kept plan would: the same index, snapshot and operator (text equality
//! under the key's "C" collation), with the caller's privileges. Where the caller lacks plain
//! SELECT on the table, or row-level security applies to it, it declines and the caller runs
//! the kept plan, whose permission checks and error messages are Postgres's own.

use pgrx::pg_sys;
use pgrx::FromDatum;

/// The value stored under `key` (`Some(None)`: no such key), read with a new snapshot when
/// `fresh` (after a read barrier) or else the calling statement's; `None` when the probe
/// declines (no privilege, row-level security, the table or its key missing).
pub fn value_of(key: &str, fresh: bool) -> Option<Option<String>> {
    // SAFETY: called from a SQL function, inside a transaction, on the backend's only thread.
    // Every relation opened is closed and the registered snapshot unregistered before
    // returning; an ERROR raised in between aborts the transaction, whose resource owner
    // releases relations, buffer pins and snapshots. Datums are copied into Rust strings
    // before the slot that holds them is dropped.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"raft_kv".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        let relid = pg_sys::get_relname_relid(c"kv".as_ptr(), ns);
        if relid == pg_sys::InvalidOid
            || pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode)
                != pg_sys::AclResult::ACLCHECK_OK
            || pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true)
                != pg_sys::CheckEnableRlsResult::RLS_NONE as i32
        {
            return None;
        }
        let value_att = pg_sys::get_attnum(relid, c"value".as_ptr());
        if value_att <= 0 {
            return None;
        }
        let heap = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let index_id = pg_sys::RelationGetPrimaryKeyIndex(heap);
        if index_id == pg_sys::InvalidOid {
            pg_sys::table_close(heap, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            return None;
        }
        let index = pg_sys::index_open(index_id, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        // A linearizable read needs a snapshot taken now, after the barrier; a local one
        // reads as a SELECT in the calling statement would.
        let snapshot = pg_sys::RegisterSnapshot(if fresh {
            pg_sys::GetTransactionSnapshot()
        } else {
            pg_sys::GetActiveSnapshot()
        });
        let text = pg_sys::cstring_to_text_with_len(key.as_ptr().cast(), key.len() as i32);
        let mut skey: pg_sys::ScanKeyData = std::mem::zeroed();
        // ScanKeyInit sets the "C" collation: the key column's and its index's.
        pg_sys::ScanKeyInit(
            &mut skey,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_TEXTEQ),
            pg_sys::Datum::from(text),
        );
        let scan = pg_sys::index_beginscan(heap, index, snapshot, 1, 0);
        pg_sys::index_rescan(scan, &mut skey, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let value = if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            if ((*slot).tts_nvalid as i32) < value_att as i32 {
                pg_sys::slot_getsomeattrs_int(slot, value_att as i32);
            }
            let i = value_att as usize - 1;
            // Detoasted and copied: the datum points into a buffer the slot pins.
            String::from_datum(*(*slot).tts_values.add(i), *(*slot).tts_isnull.add(i))
        } else {
            None
        };
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        // Locks are held to the transaction's end, as the executor holds them.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::pfree(text.cast());
        Some(value)
    }
}
