//! The Raft [`Backend`] over the extension's tables, through SPI on the worker's main thread.
//!
//! Each `write` is one transaction, so a Ready's log entries, hard state, applied entries
//! and applied index commit together, and Postgres's WAL makes them durable at COMMIT.

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};
use raft_kv_core::apply::{Effects, Lookup, Needs};
use raft_kv_core::eraftpb::{Entry, EntryType};
use raft_kv_core::lease::LeaseRow;
use raft_kv_core::snapshot::{Cursor, Frozen, Row};
use raft_kv_core::storage::{
    decode_conf_state, encode_conf_state, Backend, PersistedState, StoreError, StoreResult, WriteBatch,
};
use raft_kv_core::types::{Change, KvRow, Member, MemberOp, SnapshotData};

use crate::batch_rows::{append_log, log_has, probe, schema_c, write_effects, write_state, KeyRows};
use crate::index_probe::{Key, Probe};
use crate::snapshot_tables::{freeze_tables, read_rows, select_members, SNAPSHOT_STORE};
use crate::spi::{in_txn, spi_err};

/// The Raft backend over the tables of one schema (`raft_kv` in production; tests point it at
/// a scratch copy).
pub struct PgBackend {
    schema: &'static str,
    /// The write path's statements, each parsed and planned once and kept across transactions.
    plans: Plans,
    /// Freezes snapshots elsewhere (the Raft worker's: a background worker, see `freeze.rs`);
    /// `None`: synchronously, in the calling transaction.
    freezer: Option<Box<dyn Freezer>>,
    /// Average bytes of the snapshot rows read last, so the next chunk's query reads about
    /// as many rows as fit (a fixed row limit read ten times what one chunk sends).
    snap_row_bytes: usize,
    /// Where the deletes below a point start, as of the last committed write.
    cleared: Cleared,
    /// As the write in the current transaction leaves it, until that commits.
    cleared_pending: Option<Cleared>,
    /// Where the batch's look-up found each key it probed (`None`: absent), so the write
    /// updates those rows without probing for them again; only for the transaction's write.
    found: KeyRows,
}

/// Points below which a table's rows are known to be gone, so that a delete below a newer
/// point starts there. Started from 0, each prune and compaction walked the index entries of
/// every row the ones before had deleted, until a vacuum removed them: bitmap index scans were
/// 13 % of a follower's worker at 32 clients (profiled). Too low costs only time; none is ever
/// too high, since a failed write ends the worker (`raft_loop.rs`), and these live in it.
#[derive(Clone, Copy, Default)]
struct Cleared {
    /// Request ids below this revision were forgotten (0 after a start or a snapshot).
    requests: u64,
    /// History below this revision was compacted (0 after a start or a snapshot: builds before
    /// 718b4a7 compacted before writing a batch's own changes and could leave those below the
    /// point, so the first compaction after a start sweeps from revision 0).
    history: u64,
    /// Log entries up to this index were compacted (the snapshot index).
    log: u64,
}

/// Statements of the write path, each parsed and planned once and kept across transactions,
/// by their text. The worker runs with `plan_cache_mode = force_generic_plan` (see
/// `spi::worker_session`), so a kept statement is never planned again: every one of them is
/// written to probe primary keys whatever its parameters.
#[derive(Default)]
struct Plans(std::collections::HashMap<&'static str, OwnedPreparedStatement>);

impl Plans {
    fn get(
        &mut self,
        c: &mut pgrx::spi::SpiClient<'_>,
        schema: &str,
        sql: &'static str,
        args: &[PgOid],
    ) -> StoreResult<&OwnedPreparedStatement> {
        if !self.0.contains_key(sql) {
            let plan = c.prepare_mut(q_for(schema, sql).as_str(), args).map_err(spi_err)?.keep();
            self.0.insert(sql, plan);
        }
        Ok(&self.0[sql])
    }
}

/// Makes the frozen copy of the state machine that snapshots are streamed from, without the
/// rows passing through this process.
pub trait Freezer {
    /// A finished copy (returned once), or `None` while one is being made.
    fn freeze(&mut self) -> StoreResult<Option<Frozen>>;
    /// Stops a copy under way: the snapshot tables are about to be reused.
    fn cancel(&mut self);
}

impl PgBackend {
    /// Freezes snapshots synchronously, in the calling transaction (for the contract tests).
    #[cfg(any(test, feature = "pg_test"))]
    pub fn new(schema: &'static str) -> Self {
        PgBackend {
            schema,
            plans: Plans::default(),
            freezer: None,
            snap_row_bytes: 64,
            cleared: Cleared::default(),
            cleared_pending: None,
            found: KeyRows::new(),
        }
    }

    /// The worker's backend over `raft_kv`'s tables, freezing snapshots with `freezer`.
    pub fn with_freezer(freezer: Box<dyn Freezer>) -> Self {
        PgBackend {
            schema: "raft_kv",
            plans: Plans::default(),
            freezer: Some(freezer),
            snap_row_bytes: 64,
            cleared: Cleared::default(),
            cleared_pending: None,
            found: KeyRows::new(),
        }
    }

    fn read_members(&self, c: &pgrx::spi::SpiClient<'_>) -> StoreResult<Vec<Member>> {
        select_members(c, &|sql| self.q(sql))
    }

    /// `sql` with every `raft_kv.` table reference pointed at this backend's schema.
    fn q(&self, sql: &str) -> String {
        q_for(self.schema, sql)
    }
}

fn entry_type(kind: i16) -> EntryType {
    match kind {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    }
}

impl Backend for PgBackend {
    fn load(&mut self) -> StoreResult<PersistedState> {
        in_txn(|| {
            Spi::connect(|c| {
                let t = c
                    .select(
                        &self.q(
                            "SELECT term, vote, commit_index, applied_index, conf_state, snapshot_index, snapshot_term, \
                             COALESCE((SELECT max(idx) FROM raft_kv.log), snapshot_index), cluster_id, \
                             revision, compact_revision \
                             FROM raft_kv.state WHERE id = 1",
                        ),
                        None,
                        &[],
                    )
                    .map_err(spi_err)?;
                if t.is_empty() {
                    return Err(StoreError::Corrupt("raft_kv.state has no row".into()));
                }
                let t = t.first();
                let g = |i| t.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
                let mut st = PersistedState::default();
                st.hard_state.term = g(1)?;
                st.hard_state.vote = g(2)?;
                st.hard_state.commit = g(3)?;
                st.applied = g(4)?;
                let cs: Vec<u8> = t.get(5).map_err(spi_err)?.unwrap_or_default();
                st.conf_state = decode_conf_state(&cs)?;
                st.snapshot_index = g(6)?;
                st.snapshot_term = g(7)?;
                st.last_index = g(8)?;
                let id: Vec<u8> = t.get(9).map_err(spi_err)?.unwrap_or_default();
                st.cluster_id = match <[u8; 16]>::try_from(id.as_slice()) {
                    Ok(b) => u128::from_be_bytes(b),
                    Err(_) if id.is_empty() => 0,
                    Err(_) => return Err(StoreError::Corrupt("raft_kv.state.cluster_id is not 16 bytes".into())),
                };
                st.revision = g(10)?;
                st.compact_revision = g(11)?;
                Ok(st)
            })
        })
        .inspect(|st| {
            self.cleared = Cleared { requests: 0, history: 0, log: st.snapshot_index };
        })
    }

    fn read_entries(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<Entry>> {
        in_txn(|| {
            Spi::connect(|c| {
                let t = c
                    .select(
                        &self.q("SELECT idx, term, kind, data, context FROM raft_kv.log \
                             WHERE idx >= $1 AND idx < $2 ORDER BY idx"),
                        None,
                        &[(lo as i64).into(), (hi as i64).into()],
                    )
                    .map_err(spi_err)?;
                let mut out = Vec::with_capacity(t.len());
                for row in t {
                    let mut e = Entry::default();
                    e.index = row.get::<i64>(1).map_err(spi_err)?.unwrap_or(0) as u64;
                    e.term = row.get::<i64>(2).map_err(spi_err)?.unwrap_or(0) as u64;
                    e.set_entry_type(entry_type(row.get::<i16>(3).map_err(spi_err)?.unwrap_or(0)));
                    e.data = row.get::<Vec<u8>>(4).map_err(spi_err)?.unwrap_or_default().into();
                    e.context = row.get::<Vec<u8>>(5).map_err(spi_err)?.unwrap_or_default().into();
                    out.push(e);
                }
                if out.len() as u64 != hi - lo {
                    return Err(StoreError::Corrupt(format!("log entries {lo}..{hi} are missing")));
                }
                Ok(out)
            })
        })
    }

    fn read_terms(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<u64>> {
        in_txn(|| {
            Spi::connect(|c| {
                let t = c
                    .select(
                        &self.q("SELECT term FROM raft_kv.log WHERE idx >= $1 AND idx < $2 ORDER BY idx"),
                        None,
                        &[(lo as i64).into(), (hi as i64).into()],
                    )
                    .map_err(spi_err)?;
                let mut out = Vec::with_capacity(t.len());
                for row in t {
                    out.push(row.get::<i64>(1).map_err(spi_err)?.unwrap_or(0) as u64);
                }
                Ok(out)
            })
        })
    }

    /// Synchronously (tests), or by the freezer (production; see `freeze.rs`).
    fn freeze_snapshot(&mut self) -> StoreResult<Option<Frozen>> {
        match self.freezer.as_mut() {
            Some(f) => f.freeze(),
            None => {
                let q = |sql: &str| self.q(sql);
                in_txn(|| Spi::connect_mut(|c| freeze_tables(c, &q))).map(Some)
            }
        }
    }

    /// Key-set pagination over the snapshot tables (see [`read_rows`]).
    fn read_snapshot(&mut self, cursor: &Cursor, max_bytes: usize) -> StoreResult<(Vec<Row>, Cursor)> {
        let q = |sql: &str| self.q(sql);
        let read =
            in_txn(|| Spi::connect(|c| read_rows(c, &q, &SNAPSHOT_STORE, cursor, max_bytes, self.snap_row_bytes)))?;
        if !read.0.is_empty() {
            self.snap_row_bytes = read.0.iter().map(Row::bytes).sum::<usize>() / read.0.len();
        }
        Ok(read)
    }

    fn clear_snapshot_store(&mut self) -> StoreResult<()> {
        if let Some(f) = self.freezer.as_mut() {
            // A copy still being made is about to be dropped.
            f.cancel();
        }
        // Both halves: the frozen copy (sent to followers) and the rows received.
        let q = |sql: &str| self.q(sql);
        in_txn(|| {
            Spi::connect_mut(|c| {
                crate::snapshot_tables::clear_frozen(c, &q)?;
                crate::snapshot_tables::clear_incoming(c, &q)
            })
        })
    }

    /// Received rows go to the `incoming_*` tables. Plain inserts: the node stages only rows
    /// past the last one staged (`Position`), so none arrives twice.
    fn stage_snapshot(&mut self, rows: &[Row]) -> StoreResult<()> {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut meta: [Vec<i64>; 4] = Default::default();
        let mut req: [Vec<i64>; 4] = Default::default();
        let mut flags = Vec::new();
        let mut changes = Vec::new();
        for r in rows {
            match r {
                Row::Kv { key, row } => {
                    keys.push(key.as_str());
                    values.push(row.value.as_str());
                    for (col, v) in meta.iter_mut().zip([row.mod_revision, row.create_revision, row.version, row.lease])
                    {
                        col.push(v as i64);
                    }
                }
                Row::Change(ch) => changes.push(ch),
                Row::Request { nonce, seq, node, revision, flag } => {
                    for (col, v) in req.iter_mut().zip([nonce, seq, node, revision]) {
                        col.push(*v as i64);
                    }
                    flags.push(*flag);
                }
            }
        }
        let (plans, schema) = (&mut self.plans, self.schema);
        in_txn(|| {
            Spi::connect_mut(|c| {
                // Staged rows need not survive a crash (a transfer starts over): no flush waited for.
                crate::spi::local_async_commit();
                if !keys.is_empty() {
                    let [m, cr, v, l] = meta;
                    let plan = plans.get(
                        c,
                        schema,
                        STAGE_KV_SQL,
                        &[TEXTARRAY, TEXTARRAY, INT8ARRAY, INT8ARRAY, INT8ARRAY, INT8ARRAY],
                    )?;
                    c.update(plan, None, &[keys.into(), values.into(), m.into(), cr.into(), v.into(), l.into()])
                        .map_err(spi_err)?;
                }
                if !changes.is_empty() {
                    let args = [INT8ARRAY, TEXTARRAY, TEXTARRAY, TEXTARRAY, TEXTARRAY, INT8ARRAY, INT8ARRAY, INT8ARRAY];
                    let plan = plans.get(c, schema, STAGE_CHANGES_SQL, &args)?;
                    c.update(plan, None, &change_columns(&changes)).map_err(spi_err)?;
                }
                if !flags.is_empty() {
                    let [nonce, seq, node, revision] = req;
                    let plan = plans.get(
                        c,
                        schema,
                        STAGE_REQUESTS_SQL,
                        &[INT8ARRAY, INT8ARRAY, INT8ARRAY, INT8ARRAY, BOOLARRAY],
                    )?;
                    c.update(plan, None, &[nonce.into(), seq.into(), node.into(), revision.into(), flags.into()])
                        .map_err(spi_err)?;
                }
                Ok(())
            })
        })
    }

    fn members(&mut self) -> StoreResult<Vec<Member>> {
        in_txn(|| Spi::connect(|c| self.read_members(c)))
    }

    fn leases(&mut self) -> StoreResult<Vec<(u64, LeaseRow)>> {
        let q = |sql: &str| self.q(sql);
        in_txn(|| Spi::connect(|c| crate::snapshot_tables::select_leases(c, &q)))
    }

    /// The keys' rows, the request ids' rows and the store's revisions by primary-key probes
    /// (`probe_rows`); a statement per prefix a transaction reads (rare), and for leases.
    fn lookup(&mut self, needs: &Needs) -> StoreResult<Lookup> {
        in_txn(|| {
            Spi::connect(|c| {
                let mut out = Lookup::default();
                self.found.clear();
                probe_rows(self.schema, needs, &mut out, &mut self.found)?;
                for p in &needs.prefixes {
                    let upper = raft_kv_core::command::prefix_end(p);
                    let t = c
                        .select(
                            &self
                                .q("SELECT key, value, mod_revision, create_revision, version, lease FROM raft_kv.kv \
                                     WHERE key >= $1 AND ($2::text IS NULL OR key < $2)"),
                            None,
                            &[p.as_str().into(), upper.into()],
                        )
                        .map_err(spi_err)?;
                    for r in t {
                        let (key, row) = kv_row(&r)?;
                        out.kv.insert(key, row);
                    }
                }
                if !needs.leases.is_empty() {
                    let ids: Vec<i64> = needs.leases.iter().map(|l| *l as i64).collect();
                    let t = c.select(&self.q(LEASES_SQL), None, &[ids.into()]).map_err(spi_err)?;
                    for r in t {
                        let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
                        out.leases.insert(g(1)?, (LeaseRow { ttl_ms: g(2)?, refreshes: g(3)? }, g(4)?));
                    }
                }
                if needs.lease_total {
                    out.lease_count = c
                        .select(&self.q("SELECT count(*) FROM raft_kv.leases"), None, &[])
                        .map_err(spi_err)?
                        .first()
                        .get::<i64>(1)
                        .map_err(spi_err)?
                        .unwrap_or(0) as u64;
                }
                if !needs.lease_keys.is_empty() {
                    let ids: Vec<i64> = needs.lease_keys.iter().map(|l| *l as i64).collect();
                    let t = c
                        .select(
                            &self
                                .q("SELECT key, value, mod_revision, create_revision, version, lease FROM raft_kv.kv \
                                     WHERE lease = ANY ($1) AND lease <> 0"),
                            None,
                            &[ids.into()],
                        )
                        .map_err(spi_err)?;
                    for r in t {
                        let (key, row) = kv_row(&r)?;
                        out.lease_keys.entry(row.lease).or_default().push(key.clone());
                        out.kv.insert(key, row);
                    }
                }
                Ok(out)
            })
        })
    }

    fn atomically<R>(&mut self, f: &mut dyn FnMut(&mut Self) -> StoreResult<R>) -> StoreResult<R> {
        let r = in_txn(|| f(self));
        self.found.clear();
        if let (Ok(_), Some(c)) = (&r, self.cleared_pending.take()) {
            self.cleared = c;
        }
        r
    }

    fn write(&mut self, b: &WriteBatch, effects: &Effects) -> StoreResult<()> {
        // SAFETY: reads the transaction state; no preconditions.
        let nested = unsafe { pg_sys::IsTransactionState() };
        let mut cleared = self.cleared;
        in_txn(|| {
            Spi::connect_mut(|c| {
                if !b.sync {
                    // Applied state and commit index are re-derived from the log after a crash,
                    // so their commit need not wait for the WAL flush.
                    crate::spi::local_async_commit();
                }
                let schema = self.schema;
                let found = std::mem::take(&mut self.found);
                write_batch(c, b, effects, &mut self.plans, &mut cleared, &found, schema)
            })
        })?;
        if nested {
            self.cleared_pending = Some(cleared);
        } else {
            self.cleared = cleared;
        }
        Ok(())
    }
}

/// The leases a batch names, each with how many keys are attached (the partial index on
/// kv.lease serves the count). Run only for batches with lease operations or leased puts.
const LEASES_SQL: &str = "SELECT l.id, l.ttl_ms, l.refreshes, \
         (SELECT count(*) FROM raft_kv.kv WHERE kv.lease = l.id AND kv.lease <> 0) \
     FROM raft_kv.leases l WHERE l.id = ANY ($1::bigint[])";

/// A batch's lease effects: leases granted or refreshed, and leases gone.
const LEASE_UPSERT_SQL: &str = "INSERT INTO raft_kv.leases (id, ttl_ms, refreshes) \
     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) \
     ON CONFLICT (id) DO UPDATE SET ttl_ms = EXCLUDED.ttl_ms, refreshes = EXCLUDED.refreshes";
const LEASE_DELETE_SQL: &str = "DELETE FROM raft_kv.leases WHERE id = ANY ($1::bigint[])";
/// Forgets history between the last compaction point and a new one (the primary key's leading
/// column serves it; see [`Cleared`]). Every delete below a point is a two-sided range: a kept
/// (generic) plan does not know the bounds, and one-sided, it would expect a third of the
/// table and scan all of it on every call.
const COMPACT_HISTORY_SQL: &str = "DELETE FROM raft_kv.changes WHERE revision >= $1 AND revision < $2";
/// Probes the primary key per element; run only when a batch deletes something, so a plan
/// made while the table was small (a scan) never runs against it once it is large.
const DELETE_SQL: &str = "DELETE FROM raft_kv.kv WHERE key = ANY ($1::text[])";

// The arrays are unnested in the select list, in lockstep: in FROM, unnest's rows would be
// collected in a tuplestore first (12 % of the staging worker's time, profiled).
const STAGE_KV_SQL: &str =
    "INSERT INTO raft_kv.incoming_kv (key, value, mod_revision, create_revision, version, lease) \
     SELECT unnest($1::text[]), unnest($2::text[]), unnest($3::bigint[]), unnest($4::bigint[]), \
     unnest($5::bigint[]), unnest($6::bigint[])";
const STAGE_CHANGES_SQL: &str = "INSERT INTO raft_kv.incoming_changes SELECT unnest($1::bigint[]), \
     unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::text[]), unnest($6::bigint[]), \
     unnest($7::bigint[]), unnest($8::bigint[])";
const STAGE_REQUESTS_SQL: &str = "INSERT INTO raft_kv.incoming_requests (nonce, seq, node, revision, flag) \
     SELECT unnest($1::bigint[]), unnest($2::bigint[]), unnest($3::bigint[]), unnest($4::bigint[]), \
     unnest($5::boolean[])";
const TEXTARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
const INT8ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID);
const BOOLARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::BOOLARRAYOID);

/// `sql` with every `raft_kv.` table reference pointed at `schema`.
fn q_for(schema: &str, sql: &str) -> String {
    if schema == "raft_kv" {
        sql.to_string()
    } else {
        sql.replace("raft_kv.", &format!("{schema}."))
    }
}

const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);

/// Drops a conflicting suffix before an append (run only when there is one). Written as a two-sided
/// range so that its generic plan, not knowing $1, still expects few rows and probes the index.
const LOG_TRUNCATE_SQL: &str = "DELETE FROM raft_kv.log WHERE idx BETWEEN $1 AND 9223372036854775807";
/// Two-sided, as `COMPACT_HISTORY_SQL` is, so that its kept plan probes the revision index.
const PRUNE_REQUESTS_SQL: &str = "DELETE FROM raft_kv.requests WHERE revision >= $1 AND revision < $2";
const COMPACT_LOG_SQL: &str = "DELETE FROM raft_kv.log WHERE idx > $1 AND idx <= $2";
const COMPACT_STATE_SQL: &str =
    "UPDATE raft_kv.state SET snapshot_index = $1, snapshot_term = $2 WHERE id = 1 AND snapshot_index < $1";

/// The kept statements that must touch only the rows they name, whatever a table's size, with
/// their parameters' types: their generic plans are checked against large tables
/// (`tests::kept_statements_never_scan_a_large_table`).
#[cfg(any(test, feature = "pg_test"))]
pub(crate) const KEPT_PROBES: &[(&str, &[PgOid])] = &[
    (LEASE_DELETE_SQL, &[INT8ARRAY]),
    (COMPACT_HISTORY_SQL, &[INT8, INT8]),
    (DELETE_SQL, &[TEXTARRAY]),
    (LOG_TRUNCATE_SQL, &[INT8]),
    (PRUNE_REQUESTS_SQL, &[INT8, INT8]),
    (COMPACT_LOG_SQL, &[INT8, INT8]),
    (COMPACT_STATE_SQL, &[INT8, INT8]),
];

fn write_batch(
    c: &mut pgrx::spi::SpiClient<'_>,
    b: &WriteBatch,
    fx: &Effects,
    plans: &mut Plans,
    cleared: &mut Cleared,
    found: &KeyRows,
    schema: &str,
) -> StoreResult<()> {
    let q = &|sql: &str| q_for(schema, sql);
    if let Some(snap) = &b.snapshot {
        let m = snap.get_metadata();
        let data = SnapshotData::decode(snap.get_data()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        *cleared = Cleared { requests: 0, history: 0, log: m.index };
        let staged = data.kv_rows > 0 || data.request_rows > 0 || data.change_rows > 0;
        if staged {
            // Check before changing anything: a short or stale staging must not be installed.
            let (kv, requests, changes) = crate::snapshot_tables::incoming_counts(c, q)?;
            if (kv, requests, changes) != (data.kv_rows, data.request_rows, data.change_rows) {
                return Err(StoreError::Corrupt(format!(
                    "snapshot {} needs {} rows, {} request ids and {} changes; {kv}, {requests} and {changes} are staged",
                    m.index, data.kv_rows, data.request_rows, data.change_rows
                )));
            }
        }
        for table in ["log", "members", "leases"] {
            c.update(&q(&format!("DELETE FROM raft_kv.{table}")), None, &[]).map_err(spi_err)?;
        }
        if staged {
            crate::snapshot_tables::install_incoming(c, q)?;
        } else {
            for table in ["kv", "requests", "changes"] {
                c.update(&q(&format!("DELETE FROM raft_kv.{table}")), None, &[]).map_err(spi_err)?;
            }
        }
        for mem in &data.members {
            upsert_member(c, q, mem)?;
        }
        if !data.leases.is_empty() {
            let (ids, ttls, refreshes) = lease_columns(data.leases.iter().map(|(id, l)| (*id, Some(*l))));
            c.update(&q(LEASE_UPSERT_SQL), None, &[ids.into(), ttls.into(), refreshes.into()]).map_err(spi_err)?;
        }
        if data.cluster_id != 0 {
            write_cluster_id(c, q, data.cluster_id)?;
        }
        c.update(
            &q("UPDATE raft_kv.state SET snapshot_index = $1, snapshot_term = $2, conf_state = $3, \
             applied_index = $1, commit_index = greatest(commit_index, $1), revision = $4, compact_revision = $5 \
             WHERE id = 1"),
            None,
            &[
                (m.index as i64).into(),
                (m.term as i64).into(),
                encode_conf_state(m.get_conf_state()).into(),
                (data.revision as i64).into(),
                (data.compact_revision as i64).into(),
            ],
        )
        .map_err(spi_err)?;
    }
    if let Some(first) = b.entries.first() {
        // The log's rows are one run of indexes (appends continue or replace a suffix,
        // compaction drops a prefix, a snapshot all), and raft appends only above its commit
        // index, so with no row at the first new index there is no suffix to drop.
        if log_has(schema, first.index)? {
            let truncate = plans.get(c, schema, LOG_TRUNCATE_SQL, &[INT8])?;
            c.update(truncate, None, &[(first.index as i64).into()]).map_err(spi_err)?;
        }
        append_log(schema, &b.entries)?;
    }
    if let Some(id) = b.cluster_id {
        write_cluster_id(c, q, id)?;
    }
    // The ops' effects, as decided in the core: the keys deleted (if any), then the keys
    // written, their history and the request ids recorded; then history compacted (after the
    // batch's own changes, some of which may be below the cut) and request ids forgotten.
    if !fx.leases.is_empty() {
        let (ids, ttls, refreshes) = lease_columns(fx.leases.iter().map(|(id, l)| (*id, *l)));
        let upsert = plans.get(c, schema, LEASE_UPSERT_SQL, &[INT8ARRAY, INT8ARRAY, INT8ARRAY])?;
        c.update(upsert, None, &[ids.into(), ttls.into(), refreshes.into()]).map_err(spi_err)?;
        let gone: Vec<i64> = fx.leases.iter().filter(|(_, l)| l.is_none()).map(|(id, _)| *id as i64).collect();
        if !gone.is_empty() {
            let delete = plans.get(c, schema, LEASE_DELETE_SQL, &[INT8ARRAY])?;
            c.update(delete, None, &[gone.into()]).map_err(spi_err)?;
        }
    }
    let gone: Vec<String> = fx.kv.iter().filter(|(_, now)| now.is_none()).map(|(key, _)| key.clone()).collect();
    if !gone.is_empty() {
        let delete = plans.get(c, schema, DELETE_SQL, &[TEXTARRAY])?;
        c.update(delete, None, &[gone.into()]).map_err(spi_err)?;
    }
    // A snapshot installed above replaced the tables the look-up's rows were found in.
    let empty = KeyRows::new();
    write_effects(schema, fx, if b.snapshot.is_some() { &empty } else { found })?;
    if let Some(cut) = fx.compact_revision {
        let compact = plans.get(c, schema, COMPACT_HISTORY_SQL, &[INT8, INT8])?;
        c.update(compact, None, &[(cleared.history.min(cut) as i64).into(), (cut as i64).into()]).map_err(spi_err)?;
        cleared.history = cut;
    }
    if let Some(cut) = fx.prune_requests_below {
        let prune = plans.get(c, schema, PRUNE_REQUESTS_SQL, &[INT8, INT8])?;
        c.update(prune, None, &[(cleared.requests.min(cut) as i64).into(), (cut as i64).into()]).map_err(spi_err)?;
        cleared.requests = cut;
    }
    for op in &b.members {
        match op {
            MemberOp::Upsert(m) => upsert_member(c, q, m)?,
            MemberOp::Remove(id) => {
                c.update(&q("DELETE FROM raft_kv.members WHERE id = $1"), None, &[(*id as i64).into()])
                    .map_err(spi_err)?;
            }
        }
    }
    if let Some((index, term)) = b.compact_to {
        let compact = plans.get(c, schema, COMPACT_LOG_SQL, &[INT8, INT8])?;
        c.update(compact, None, &[(cleared.log.min(index) as i64).into(), (index as i64).into()]).map_err(spi_err)?;
        cleared.log = cleared.log.max(index);
        let state = plans.get(c, schema, COMPACT_STATE_SQL, &[INT8, INT8])?;
        c.update(state, None, &[(index as i64).into(), (term as i64).into()]).map_err(spi_err)?;
    }
    // After the snapshot's own state update, so the hard state's commit index wins over it.
    if b.hard_state.is_some()
        || b.applied.is_some()
        || b.conf_state.is_some()
        || fx.revision.is_some()
        || fx.compact_revision.is_some()
    {
        write_state(schema, b, fx)?;
    }
    Ok(())
}

/// A row of `SELECT key, value, mod_revision, create_revision, version, lease FROM raft_kv.kv`.
fn kv_row(r: &pgrx::spi::SpiHeapTupleData<'_>) -> StoreResult<(String, KvRow)> {
    let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
    let key: String = r.get(1).map_err(spi_err)?.unwrap_or_default();
    let value: String = r.get(2).map_err(spi_err)?.unwrap_or_default();
    Ok((key, KvRow { value, mod_revision: g(3)?, create_revision: g(4)?, version: g(5)?, lease: g(6)? }))
}

/// Leases as the arrays `unnest` takes (id, ttl_ms, refreshes); leases gone are left out.
fn lease_columns(leases: impl Iterator<Item = (u64, Option<LeaseRow>)>) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let (mut ids, mut ttls, mut refreshes) = (Vec::new(), Vec::new(), Vec::new());
    for (id, l) in leases {
        if let Some(l) = l {
            ids.push(id as i64);
            ttls.push(l.ttl_ms as i64);
            refreshes.push(l.refreshes as i64);
        }
    }
    (ids, ttls, refreshes)
}

/// History rows as the arrays `unnest` takes, in `raft_kv.changes`' column order.
fn change_columns<C: std::borrow::Borrow<Change>>(h: &[C]) -> [pgrx::datum::DatumWithOid<'static>; 8] {
    let num = |f: fn(&Change) -> i64| -> Vec<i64> { h.iter().map(|c| f(c.borrow())).collect() };
    let text = |f: fn(&Change) -> Option<String>| -> Vec<Option<String>> { h.iter().map(|c| f(c.borrow())).collect() };
    let prev_mod: Vec<Option<i64>> = h.iter().map(|c| c.borrow().prev_mod_revision.map(|r| r as i64)).collect();
    [
        num(|c| c.revision as i64).into(),
        text(|c| Some(c.key.clone())).into(),
        text(|c| Some(c.kind.as_str().to_string())).into(),
        text(|c| c.value.clone()).into(),
        text(|c| c.prev_value.clone()).into(),
        num(|c| c.create_revision as i64).into(),
        num(|c| c.version as i64).into(),
        prev_mod.into(),
    ]
}

fn write_cluster_id(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String, id: u128) -> StoreResult<()> {
    c.update(&q("UPDATE raft_kv.state SET cluster_id = $1 WHERE id = 1"), None, &[id.to_be_bytes().to_vec().into()])
        .map_err(spi_err)?;
    Ok(())
}

fn upsert_member(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String, m: &Member) -> StoreResult<()> {
    c.update(
        &q("INSERT INTO raft_kv.members (id, address, promote) VALUES ($1, $2, $3) \
            ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, promote = EXCLUDED.promote"),
        None,
        &[(m.id as i64).into(), m.address.as_str().into(), m.promote.into()],
    )
    .map_err(spi_err)?;
    Ok(())
}

/// What a batch's ops depend on, read by primary key without the executor (`index_probe`):
/// each key's row, each request id's row, and the store's revisions. A statement for this
/// (one per batch, whatever its size) cost 74 µs for a one-write batch in the worker, most of
/// it the executor's start-up and shut-down around the probes.
fn probe_rows(schema: &str, needs: &Needs, out: &mut Lookup, found: &mut KeyRows) -> StoreResult<()> {
    let schema_c = schema_c(schema)?;
    // Opens a table of the schema and finds the attribute numbers of `columns`, closing it
    // again if one is missing.
    let open = |table: &std::ffi::CStr, nkeys: usize, columns: &[&std::ffi::CStr]| -> StoreResult<(Probe, Vec<i16>)> {
        let p = probe(&schema_c, table, nkeys)?;
        let atts: Option<Vec<i16>> = columns.iter().map(|c| p.attnum(c)).collect();
        match atts {
            Some(atts) => Ok((p, atts)),
            None => {
                p.close();
                Err(StoreError::Corrupt(format!("{schema}.{} lacks a column raft_kv reads", table.to_string_lossy())))
            }
        }
    };
    let n = |v: Option<i64>| v.unwrap_or(0) as u64;
    if !needs.keys.is_empty() {
        let cols = [c"value", c"mod_revision", c"create_revision", c"version", c"lease"];
        let (mut p, a) = open(c"kv", 1, &cols)?;
        for key in &needs.keys {
            let here = p.find(&[Key::Text(key)]);
            found.insert(key.clone(), here.then(|| p.tid()));
            if here {
                let row = KvRow {
                    value: p.text(a[0]).unwrap_or_default(),
                    mod_revision: n(p.int8(a[1])),
                    create_revision: n(p.int8(a[2])),
                    version: n(p.int8(a[3])),
                    lease: n(p.int8(a[4])),
                };
                out.kv.insert(key.clone(), row);
            }
        }
        p.close();
    }
    if !needs.ids.is_empty() {
        let (mut p, a) = open(c"requests", 2, &[c"node", c"revision", c"flag"])?;
        for &(nonce, seq) in &needs.ids {
            if p.find(&[Key::Int8(nonce as i64), Key::Int8(seq as i64)]) {
                let found = (n(p.int8(a[0])), n(p.int8(a[1])), p.boolean(a[2]).unwrap_or(false));
                out.requests.insert((nonce, seq), found);
            }
        }
        p.close();
    }
    let (mut p, a) = open(c"state", 1, &[c"revision", c"compact_revision"])?;
    if p.find(&[Key::Int4(1)]) {
        (out.revision, out.compact_revision) = (n(p.int8(a[0])), n(p.int8(a[1])));
    }
    p.close();
    Ok(())
}
