//! Rows read by primary key without the executor, as Postgres's own catalog lookups read them
//! (`systable_beginscan`): a table and its primary-key index opened once, then one index probe
//! per key. For a one-row read, the executor's start-up and shut-down around a kept plan cost
//! about as much as the probe itself (profiles in BENCHMARKS.md, issue 11).
//!
//! No permission or row-level-security check is made here: callers decide who may read.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::FromDatum;

/// An open table, its primary key and a scan over it, under one registered snapshot.
pub struct Probe {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    scan: pg_sys::IndexScanDesc,
    slot: *mut pg_sys::TupleTableSlot,
    snapshot: pg_sys::Snapshot,
    relid: pg_sys::Oid,
}

/// The snapshot a probe reads under.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Snap {
    /// The calling statement's (the active snapshot).
    Statement,
    /// A new one: what has committed by now.
    New,
    /// A new one that also sees this transaction's earlier statements (the worker's).
    AfterOwnWrites,
}

/// A primary-key column's value to probe for.
pub enum Key<'a> {
    Text(&'a str),
    Int8(i64),
    Int4(i32),
}

/// The table `schema.table`'s oid, locked for reading, or `None` when either is missing. As
/// the parser resolves a table name: the lock is taken before the name is trusted, and the name
/// looked up again after it, so a table swapped in by a concurrent transaction (a snapshot's
/// install renames raft_kv's tables) is the one read, never the one it replaced.
pub fn relid(schema: &CStr, table: &CStr) -> Option<pg_sys::Oid> {
    relid_locked(schema, table, pg_sys::AccessShareLock as pg_sys::LOCKMODE)
}

/// As [`relid`], under the lock `mode` (a writer's is `RowExclusiveLock`).
pub fn relid_locked(schema: &CStr, table: &CStr, mode: pg_sys::LOCKMODE) -> Option<pg_sys::Oid> {
    // SAFETY: a name look-up inside a transaction; makeRangeVar keeps the two static strings'
    // pointers, which Postgres does not write through.
    unsafe {
        let rv = pg_sys::makeRangeVar(schema.as_ptr().cast_mut(), table.as_ptr().cast_mut(), -1);
        let relid =
            pg_sys::RangeVarGetRelidExtended(rv, mode, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut());
        (relid != pg_sys::InvalidOid).then_some(relid)
    }
}

impl Probe {
    /// Opens the table and its primary key for probes with `nkeys` key columns, under the
    /// snapshot `snap` names. `None` when the table has no primary key.
    ///
    /// # Safety
    /// Inside a transaction, on the process's main thread; [`Probe::close`] must follow unless
    /// an ERROR aborts the transaction first (its resource owner then releases everything).
    pub unsafe fn open(relid: pg_sys::Oid, nkeys: usize, snap: Snap) -> Option<Probe> {
        unsafe {
            let heap = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let index_id = pg_sys::RelationGetPrimaryKeyIndex(heap);
            if index_id == pg_sys::InvalidOid {
                pg_sys::table_close(heap, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                return None;
            }
            let index = pg_sys::index_open(index_id, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let snapshot = match snap {
                // (Outside a statement there is none: then a new one, as a statement would take.)
                Snap::Statement if pg_sys::ActiveSnapshotSet() => pg_sys::GetActiveSnapshot(),
                Snap::Statement | Snap::New => pg_sys::GetTransactionSnapshot(),
                Snap::AfterOwnWrites => {
                    // As SPI does before a statement: earlier statements' rows become visible.
                    pg_sys::CommandCounterIncrement();
                    pg_sys::GetTransactionSnapshot()
                }
            };
            let snapshot = pg_sys::RegisterSnapshot(snapshot);
            let scan = pg_sys::index_beginscan(heap, index, snapshot, nkeys as i32, 0);
            let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
            Some(Probe { heap, index, scan, slot, snapshot, relid })
        }
    }

    /// The attribute number of `column`, or `None` if the table has none.
    pub fn attnum(&self, column: &CStr) -> Option<i16> {
        // SAFETY: a catalog look-up of an open table's column.
        let n = unsafe { pg_sys::get_attnum(self.relid, column.as_ptr()) };
        (n > 0).then_some(n)
    }

    /// Finds the row whose primary key equals `keys` (in the key's column order); its columns
    /// are then read with [`Probe::text`], [`Probe::int8`] and [`Probe::boolean`].
    pub fn find(&mut self, keys: &[Key<'_>]) -> bool {
        // SAFETY: the scan was begun for keys.len() keys on an open index; text keys are made in
        // the current memory context and freed after the probe, which copies what it keeps.
        unsafe {
            let mut sk: Vec<pg_sys::ScanKeyData> = Vec::with_capacity(keys.len());
            let mut texts = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                let (proc_, datum) = match k {
                    Key::Text(s) => {
                        let t = pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32);
                        texts.push(t);
                        (pg_sys::F_TEXTEQ, pg_sys::Datum::from(t))
                    }
                    Key::Int8(v) => (pg_sys::F_INT8EQ, pg_sys::Datum::from(*v)),
                    Key::Int4(v) => (pg_sys::F_INT4EQ, pg_sys::Datum::from(*v)),
                };
                let mut k: pg_sys::ScanKeyData = std::mem::zeroed();
                // ScanKeyInit sets the "C" collation, raft_kv's text keys' own.
                pg_sys::ScanKeyInit(
                    &mut k,
                    (i + 1) as pg_sys::AttrNumber,
                    pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                    pg_sys::Oid::from(proc_),
                    datum,
                );
                sk.push(k);
            }
            pg_sys::index_rescan(self.scan, sk.as_mut_ptr(), sk.len() as i32, std::ptr::null_mut(), 0);
            let found = pg_sys::index_getnext_slot(self.scan, pg_sys::ScanDirection::ForwardScanDirection, self.slot);
            for t in texts {
                pg_sys::pfree(t.cast());
            }
            found
        }
    }

    fn datum(&mut self, att: i16) -> (pg_sys::Datum, bool) {
        // SAFETY: the slot holds the row found last; attributes are deformed up to att.
        unsafe {
            if ((*self.slot).tts_nvalid as i32) < att as i32 {
                pg_sys::slot_getsomeattrs_int(self.slot, att as i32);
            }
            let i = att as usize - 1;
            (*(*self.slot).tts_values.add(i), *(*self.slot).tts_isnull.add(i))
        }
    }

    /// A text column of the row found last, detoasted and copied.
    pub fn text(&mut self, att: i16) -> Option<String> {
        let (d, null) = self.datum(att);
        // SAFETY: a text datum of the slot's row (or null).
        unsafe { String::from_datum(d, null) }
    }

    pub fn int8(&mut self, att: i16) -> Option<i64> {
        let (d, null) = self.datum(att);
        // SAFETY: an int8 datum of the slot's row (or null).
        unsafe { i64::from_datum(d, null) }
    }

    pub fn boolean(&mut self, att: i16) -> Option<bool> {
        let (d, null) = self.datum(att);
        // SAFETY: a boolean datum of the slot's row (or null).
        unsafe { bool::from_datum(d, null) }
    }

    /// Where the row found last is, for an update of it ([`crate::heap_write::Writer::update`]).
    pub fn tid(&self) -> pg_sys::ItemPointerData {
        // SAFETY: the slot holds the row found last.
        unsafe { (*self.slot).tts_tid }
    }

    /// The slot holding the row found last.
    pub(crate) fn slot(&self) -> *mut pg_sys::TupleTableSlot {
        self.slot
    }

    /// Ends the scan; the locks are held to the transaction's end, as the executor holds them.
    pub fn close(self) {
        // SAFETY: everything was opened by `open` and is released once.
        unsafe {
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            pg_sys::index_endscan(self.scan);
            pg_sys::UnregisterSnapshot(self.snapshot);
            pg_sys::index_close(self.index, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(self.heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
    }
}
