//! Rows written without the planner, as PostgreSQL's logical-replication apply worker writes
//! them (`execReplication.c`): a table and its indexes opened once per batch, then per row a
//! heap insert or update with its index entries, the table's NOT NULL and CHECK constraints
//! checked by `ExecSimpleRelationInsert` / `ExecSimpleRelationUpdate`. Rows only inserted (log
//! entries, history, request ids, new keys) go in together, as COPY inserts them
//! (`CopyMultiInsertBufferFlush`): a WAL record per page filled, not per row, 13.4 records
//! per write on a follower at 32 clients before, 10.8 after (BENCHMARKS.md). Through a kept
//! statement each batch paid the executor's start-up and shut-down of a three-table plan, the
//! `unnest` tuplestores and ON CONFLICT's speculative insertion (BENCHMARKS.md, issue 11).
//!
//! Only the Raft worker writes raft_kv's tables, so no permission check is made here. Row
//! triggers fire as they would for logical replication (the worker runs with
//! `session_replication_role = replica`); the tables have only statement triggers.

use std::ffi::CStr;

use pgrx::{pg_sys, IntoDatum, PgBox};

use crate::index_probe::Probe;

/// A column's value in a row to write.
pub enum Value<'a> {
    Null,
    /// The replaced row's value (in an update only).
    Keep,
    Text(&'a str),
    Bytes(&'a [u8]),
    Int8(i64),
    Int2(i16),
    Bool(bool),
}

impl Value<'_> {
    /// The value as a datum made in the current memory context.
    fn datum(&self) -> Option<pg_sys::Datum> {
        match self {
            Value::Null | Value::Keep => None,
            Value::Text(s) => s.into_datum(),
            Value::Bytes(b) => b.into_datum(),
            Value::Int8(v) => v.into_datum(),
            Value::Int2(v) => v.into_datum(),
            Value::Bool(v) => v.into_datum(),
        }
    }
}

/// A table open for writing, with its indexes and an executor state for the batch.
pub struct Writer {
    rel: pg_sys::Relation,
    rri: *mut pg_sys::ResultRelInfo,
    estate: *mut pg_sys::EState,
    /// Holds the row being written.
    slot: *mut pg_sys::TupleTableSlot,
    /// Rows added and not yet inserted ([`Writer::add`]), each in a slot of its own.
    queued: Vec<*mut pg_sys::TupleTableSlot>,
    /// Slots of rows inserted, for the next rows added.
    spare: Vec<*mut pg_sys::TupleTableSlot>,
    /// The table has row triggers on insert: rows added are inserted one by one, firing them.
    row_triggers: bool,
    /// Carries only the location of the row an update replaces.
    search: *mut pg_sys::TupleTableSlot,
    /// What fills each of the table's attributes.
    map: Vec<Att>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

#[derive(Clone, Copy)]
enum Att {
    /// The caller's column of this index.
    Col(usize),
    /// A dropped column: null.
    Dropped,
    /// A column the caller does not write: an update keeps the replaced row's value.
    Other,
}

/// Why a table cannot be written this way.
#[derive(Debug)]
pub enum OpenError {
    /// The table is not there (or not a table).
    Missing,
    /// Its columns are not exactly the ones the caller writes.
    Columns(String),
}

impl Writer {
    /// Opens `schema.table` for writes of rows with `columns` (in that order), resolving the
    /// name under the lock as the parser does (a snapshot's install swaps tables by renaming).
    /// With `all`, the table's columns must be exactly these (a column the caller does not know
    /// of would get no default here); without, the writer only updates, keeping the others.
    ///
    /// # Safety
    /// Inside a transaction, on the process's main thread; [`Writer::close`] must follow unless
    /// an ERROR aborts the transaction first (which releases everything).
    pub unsafe fn open(schema: &CStr, table: &CStr, columns: &[&CStr], all: bool) -> Result<Writer, OpenError> {
        const LOCK: pg_sys::LOCKMODE = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        unsafe {
            let relid = crate::index_probe::relid_locked(schema, table, LOCK).ok_or(OpenError::Missing)?;
            let rel = pg_sys::table_open(relid, LOCK);
            if (*(*rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char {
                pg_sys::table_close(rel, LOCK);
                return Err(OpenError::Missing);
            }
            let desc = (*rel).rd_att;
            let natts = (*desc).natts as usize;
            let mut map = Vec::with_capacity(natts);
            let mut seen = vec![false; columns.len()];
            let mut bad = None;
            for att in (*desc).attrs.as_slice(natts) {
                if att.attisdropped {
                    map.push(Att::Dropped);
                    continue;
                }
                let name = CStr::from_ptr(att.attname.data.as_ptr());
                match columns.iter().position(|c| *c == name) {
                    Some(i) => {
                        seen[i] = true;
                        map.push(Att::Col(i));
                    }
                    None if all => bad = Some(format!("column {} is not one raft_kv writes", name.to_string_lossy())),
                    None => map.push(Att::Other),
                }
            }
            if let Some(i) = seen.iter().position(|s| !s) {
                bad = Some(format!("column {} is missing", columns[i].to_string_lossy()));
            }
            if let Some(why) = bad {
                pg_sys::table_close(rel, LOCK);
                return Err(OpenError::Columns(format!("{}: {why}", table.to_string_lossy())));
            }

            // As the apply worker's create_edata_for_relation: one range-table entry (error
            // messages read it), the result relation and AFTER-trigger bookkeeping.
            let estate = pg_sys::CreateExecutorState();
            let old = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
            let mut rte = PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
            rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
            rte.relid = relid;
            rte.relkind = (*(*rel).rd_rel).relkind;
            rte.rellockmode = LOCK;
            pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(std::ptr::null_mut(), rte.into_pg().cast()));
            let rri = PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo).into_pg();
            pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_opened_result_relations = pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::ExecOpenIndices(rri, false);
            let slot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsHeapTuple);
            let search = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
            pg_sys::MakePerTupleExprContext(estate);
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::AfterTriggerBeginQuery();
            let triggers = (*rri).ri_TrigDesc;
            let row_triggers = !triggers.is_null()
                && ((*triggers).trig_insert_before_row
                    || (*triggers).trig_insert_after_row
                    || (*triggers).trig_insert_new_table);
            Ok(Writer {
                rel,
                rri,
                estate,
                slot,
                queued: Vec::new(),
                spare: Vec::new(),
                row_triggers,
                search,
                map,
                values: vec![pg_sys::Datum::from(0usize); natts],
                nulls: vec![true; natts],
            })
        }
    }

    /// Inserts a row; its primary key must not be taken (a unique violation is an ERROR).
    pub fn insert(&mut self, row: &[Value<'_>]) {
        assert!(self.gives_every_column(row), "an insert gives every column");
        // SAFETY: the slot and the executor state belong to this open writer.
        unsafe {
            let old = self.store(self.slot, row, None);
            pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, self.slot);
            self.done(old);
        }
    }

    /// Adds a row to insert with the others added, at [`Writer::flush`] or [`Writer::close`]:
    /// one heap multi-insert for them all, as COPY does, writes a WAL record per page filled
    /// instead of one per row (a batch's log entries, history rows and request ids). Its
    /// constraints are checked now; its primary key must not be taken.
    pub fn add(&mut self, row: &[Value<'_>]) {
        if self.row_triggers {
            return self.insert(row);
        }
        assert!(self.gives_every_column(row), "an insert gives every column");
        // SAFETY: the slots and the executor state belong to this open writer; a slot made
        // here lives in the executor state's tuple table, freed with it.
        unsafe {
            let slot = match self.spare.pop() {
                Some(s) => s,
                None => pg_sys::ExecInitExtraTupleSlot(self.estate, (*self.rel).rd_att, &pg_sys::TTSOpsHeapTuple),
            };
            let old = self.store(slot, row, None);
            if !(*(*self.rel).rd_att).constr.is_null() {
                pg_sys::ExecConstraints(self.rri, slot, self.estate);
            }
            self.queued.push(slot);
            pg_sys::MemoryContextReset(self.per_row_memory());
            pg_sys::MemoryContextSwitchTo(old);
        }
    }

    /// Inserts the rows added since the last flush, then their index entries.
    pub fn flush(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        // SAFETY: the queued slots hold formed rows of this table; the executor's memory
        // context is current while the rows and their index entries are written, as in
        // `insert`.
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
            let cid = (*self.estate).es_output_cid;
            let n = self.queued.len() as std::ffi::c_int;
            // table_multi_insert, which is inline; every access method has one (GetTableAmRoutine).
            let multi_insert = (*(*self.rel).rd_tableam).multi_insert.expect("the table access method's multi_insert");
            multi_insert(self.rel, self.queued.as_mut_ptr(), n, cid, 0, std::ptr::null_mut());
            if (*self.rri).ri_NumIndices > 0 {
                for &s in &self.queued {
                    let recheck = pg_sys::ExecInsertIndexTuples(
                        self.rri,
                        s,
                        self.estate,
                        false,
                        false,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    );
                    pg_sys::list_free(recheck);
                    pg_sys::MemoryContextReset(self.per_row_memory());
                }
            }
            for s in self.queued.drain(..) {
                pg_sys::ExecClearTuple(s);
                self.spare.push(s);
            }
            pg_sys::MemoryContextSwitchTo(old);
        }
    }

    /// Replaces the row `probe` found last (in this transaction) with `row`; columns given as
    /// [`Value::Keep`], and those the writer was not opened with, keep their values.
    pub fn update(&mut self, probe: &Probe, row: &[Value<'_>]) {
        // SAFETY: the probe's slot holds the row found last, its buffer pinned, while the new
        // row is formed.
        unsafe { self.replace(probe.tid(), row, Some(probe.slot())) }
    }

    /// Replaces the row at `tid` (found in this transaction, and not changed since) with `row`,
    /// which gives every column the writer was opened with (`all`, and no [`Value::Keep`]).
    pub fn update_at(&mut self, tid: pg_sys::ItemPointerData, row: &[Value<'_>]) {
        assert!(self.gives_every_column(row), "an update by location replaces every column");
        // SAFETY: nothing is read from a replaced row.
        unsafe { self.replace(tid, row, None) }
    }

    unsafe fn replace(
        &mut self,
        tid: pg_sys::ItemPointerData,
        row: &[Value<'_>],
        replaced: Option<*mut pg_sys::TupleTableSlot>,
    ) {
        // SAFETY: as insert; ExecSimpleRelationUpdate reads only the search slot's tid.
        unsafe {
            (*self.search).tts_tid = tid;
            let old = self.store(self.slot, row, replaced);
            pg_sys::ExecSimpleRelationUpdate(self.rri, self.estate, std::ptr::null_mut(), self.search, self.slot);
            self.done(old);
        }
    }

    /// Forms `row` into the slot and leaves the executor's memory context current (as the
    /// executor runs a row's write), returning the caller's.
    unsafe fn store(
        &mut self,
        slot: *mut pg_sys::TupleTableSlot,
        row: &[Value<'_>],
        replaced: Option<*mut pg_sys::TupleTableSlot>,
    ) -> pg_sys::MemoryContext {
        unsafe {
            if let Some(r) = replaced {
                if ((*r).tts_nvalid as usize) < self.map.len() {
                    pg_sys::slot_getsomeattrs_int(r, self.map.len() as i32);
                }
            }
            // The datums in the per-row context, reset after the row; the formed tuple in the
            // executor's, owned by the slot (a heap slot then writes it without a copy).
            let old = pg_sys::MemoryContextSwitchTo(self.per_row_memory());
            for (i, att) in self.map.iter().enumerate() {
                let keep = match *att {
                    Att::Col(c) => matches!(row[c], Value::Keep),
                    Att::Dropped => false,
                    Att::Other => true,
                };
                let d = match (*att, replaced) {
                    (_, Some(r)) if keep => {
                        let null = *(*r).tts_isnull.add(i);
                        (!null).then(|| *(*r).tts_values.add(i))
                    }
                    (Att::Col(c), _) => row[c].datum(),
                    _ => None,
                };
                self.nulls[i] = d.is_none();
                self.values[i] = d.unwrap_or(pg_sys::Datum::from(0usize));
            }
            pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
            let tuple = pg_sys::heap_form_tuple((*self.rel).rd_att, self.values.as_mut_ptr(), self.nulls.as_mut_ptr());
            pg_sys::ExecStoreHeapTuple(tuple, slot, true);
            old
        }
    }

    /// Whether `row` gives every column of the table: no [`Value::Keep`], and the writer was
    /// opened with all of them.
    fn gives_every_column(&self, row: &[Value<'_>]) -> bool {
        !self.map.iter().any(|a| matches!(a, Att::Other)) && !row.iter().any(|v| matches!(v, Value::Keep))
    }

    /// The executor's per-row memory: a row's datums and index entries, reset after each row.
    unsafe fn per_row_memory(&self) -> pg_sys::MemoryContext {
        // SAFETY: the executor state and its per-tuple context live as long as the writer.
        unsafe { (*(*self.estate).es_per_tuple_exprcontext).ecxt_per_tuple_memory }
    }

    unsafe fn done(&mut self, old: pg_sys::MemoryContext) {
        unsafe {
            pg_sys::ExecClearTuple(self.slot);
            pg_sys::MemoryContextReset(self.per_row_memory());
            pg_sys::MemoryContextSwitchTo(old);
        }
    }

    /// Inserts the rows added, closes the indexes and frees the executor state; the lock is
    /// held to the transaction's end, as the executor holds it.
    pub fn close(mut self) {
        self.flush();
        // SAFETY: everything was opened by `open` and is released once, in the apply worker's
        // order (finish_edata): AFTER triggers, the tuple table, the executor state.
        unsafe {
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::AfterTriggerEndQuery(self.estate);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
    }
}
