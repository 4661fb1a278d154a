//! The Raft [`Backend`] over the extension's tables, through SPI on the worker's main thread.
//!
//! Each `write` is one transaction, so a Ready's log entries, hard state, applied entries
//! and applied index commit together, and Postgres's WAL makes them durable at COMMIT.

use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use raft_kv_core::command::ApplyResult;
use raft_kv_core::eraftpb::{Entry, EntryType};
use raft_kv_core::state_machine::{dedup_prune_below, Member, SnapshotData};
use raft_kv_core::storage::{
    decode_conf_state, encode_conf_state, Backend, KvOp, MemberOp, PersistedState, StoreError, StoreResult, WriteBatch,
};

/// The Raft backend over the tables of one schema (`raft_kv` in production; tests point it at
/// a scratch copy).
pub struct PgBackend {
    schema: &'static str,
    /// The applied index as last loaded or written (pruning decisions depend on it).
    applied: u64,
}

impl PgBackend {
    pub fn new(schema: &'static str) -> Self {
        PgBackend { schema, applied: 0 }
    }

    fn read_members(&self, c: &pgrx::spi::SpiClient<'_>) -> StoreResult<Vec<Member>> {
        let mut out = Vec::new();
        for r in c
            .select(&self.q("SELECT id, address, promote FROM raft_kv.members ORDER BY id"), None, &[])
            .map_err(spi_err)?
        {
            out.push(Member {
                id: r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0) as u64,
                address: r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
                promote: r.get::<bool>(3).map_err(spi_err)?.unwrap_or(false),
            });
        }
        Ok(out)
    }

    /// `sql` with every `raft_kv.` table reference pointed at this backend's schema.
    fn q(&self, sql: &str) -> String {
        if self.schema == "raft_kv" {
            sql.to_string()
        } else {
            sql.replace("raft_kv.", &format!("{}.", self.schema))
        }
    }
}

fn spi_err(e: SpiError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Runs `f` in the current transaction, or in a new one committed at the end.
pub fn in_txn<R>(f: impl FnOnce() -> R) -> R {
    if unsafe { pg_sys::IsTransactionState() } {
        f()
    } else {
        BackgroundWorker::transaction(AssertUnwindSafe(f))
    }
}

fn entry_type(kind: i16) -> EntryType {
    match kind {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    }
}

fn kind_of(e: &Entry) -> i16 {
    match e.get_entry_type() {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
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
                             COALESCE((SELECT max(idx) FROM raft_kv.log), snapshot_index) \
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
                Ok(st)
            })
            .inspect(|st: &PersistedState| {
                self.applied = st.applied;
            })
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

    /// Reads the whole state machine (the applied state: it is what the tables hold between
    /// transactions). Held in memory while the snapshot is built and sent.
    fn snapshot_data(&mut self) -> StoreResult<SnapshotData> {
        in_txn(|| {
            Spi::connect(|c| {
                let mut d = SnapshotData::default();
                for r in c.select(&self.q("SELECT key, value, revision FROM raft_kv.kv"), None, &[]).map_err(spi_err)? {
                    let k: String = r.get(1).map_err(spi_err)?.unwrap_or_default();
                    let v: String = r.get(2).map_err(spi_err)?.unwrap_or_default();
                    let rev: i64 = r.get(3).map_err(spi_err)?.unwrap_or(0);
                    d.kv.insert(k, (v, rev as u64));
                }
                let sql = self.q("SELECT nonce, seq, node, revision, flag FROM raft_kv.requests");
                for r in c.select(&sql, None, &[]).map_err(spi_err)? {
                    let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
                    let flag = r.get::<bool>(5).map_err(spi_err)?.unwrap_or(false);
                    d.requests.insert((g(1)?, g(2)?), (g(3)?, g(4)?, flag));
                }
                d.members = self.read_members(c)?;
                Ok(d)
            })
        })
    }

    fn members(&mut self) -> StoreResult<Vec<Member>> {
        in_txn(|| Spi::connect(|c| self.read_members(c)))
    }

    fn write(&mut self, b: &WriteBatch) -> StoreResult<Vec<ApplyResult>> {
        in_txn(|| {
            Spi::connect_mut(|c| {
                if !b.sync {
                    // Applied state and commit index are re-derived from the log after a crash,
                    // so their commit need not wait for the WAL flush.
                    c.update("SET LOCAL synchronous_commit = off", None, &[]).map_err(spi_err)?;
                }
                write_batch(c, b, self.applied, &|sql| self.q(sql))
            })
        })
        .inspect(|_| {
            if let Some(a) = b.applied {
                self.applied = a;
            }
        })
    }
}

fn write_batch(
    c: &mut pgrx::spi::SpiClient<'_>,
    b: &WriteBatch,
    prev_applied: u64,
    q: &dyn Fn(&str) -> String,
) -> StoreResult<Vec<ApplyResult>> {
    if let Some(snap) = &b.snapshot {
        let m = snap.get_metadata();
        let data = SnapshotData::decode(snap.get_data()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        for table in ["log", "kv", "requests", "members"] {
            c.update(&q(&format!("DELETE FROM raft_kv.{table}")), None, &[]).map_err(spi_err)?;
        }
        let kv: Vec<_> = data.kv.into_iter().collect();
        for chunk in kv.chunks(1000) {
            let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
            let values: Vec<&str> = chunk.iter().map(|(_, (v, _))| v.as_str()).collect();
            let revs: Vec<i64> = chunk.iter().map(|(_, (_, r))| *r as i64).collect();
            c.update(
                &q("INSERT INTO raft_kv.kv (key, value, revision) SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"),
                None,
                &[keys.into(), values.into(), revs.into()],
            )
            .map_err(spi_err)?;
        }
        let reqs: Vec<_> = data.requests.into_iter().collect();
        for chunk in reqs.chunks(1000) {
            let col = |f: &dyn Fn(&((u64, u64), (u64, u64, bool))) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
            let flags: Vec<bool> = chunk.iter().map(|(_, (_, _, f))| *f).collect();
            c.update(
                &q("INSERT INTO raft_kv.requests (nonce, seq, node, revision, flag) \
                    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::boolean[])"),
                None,
                &[
                    col(&|r| r.0 .0 as i64).into(),
                    col(&|r| r.0 .1 as i64).into(),
                    col(&|r| r.1 .0 as i64).into(),
                    col(&|r| r.1 .1 as i64).into(),
                    flags.into(),
                ],
            )
            .map_err(spi_err)?;
        }
        for mem in &data.members {
            upsert_member(c, q, mem)?;
        }
        c.update(
            &q("UPDATE raft_kv.state SET snapshot_index = $1, snapshot_term = $2, conf_state = $3, \
             applied_index = $1, commit_index = greatest(commit_index, $1) WHERE id = 1"),
            None,
            &[(m.index as i64).into(), (m.term as i64).into(), encode_conf_state(m.get_conf_state()).into()],
        )
        .map_err(spi_err)?;
    }
    if let Some(first) = b.entries.first() {
        c.update(&q("DELETE FROM raft_kv.log WHERE idx >= $1"), None, &[(first.index as i64).into()])
            .map_err(spi_err)?;
        let idx: Vec<i64> = b.entries.iter().map(|e| e.index as i64).collect();
        let term: Vec<i64> = b.entries.iter().map(|e| e.term as i64).collect();
        let kind: Vec<i16> = b.entries.iter().map(kind_of).collect();
        let data: Vec<Vec<u8>> = b.entries.iter().map(|e| e.data.to_vec()).collect();
        let ctx: Vec<Vec<u8>> = b.entries.iter().map(|e| e.context.to_vec()).collect();
        c.update(
            &q("INSERT INTO raft_kv.log (idx, term, kind, data, context) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::bytea[], $5::bytea[])"),
            None,
            &[idx.into(), term.into(), kind.into(), data.into(), ctx.into()],
        )
        .map_err(spi_err)?;
    }
    if let Some(hs) = &b.hard_state {
        c.update(
            &q("UPDATE raft_kv.state SET term = $1, vote = $2, commit_index = $3 WHERE id = 1"),
            None,
            &[(hs.term as i64).into(), (hs.vote as i64).into(), (hs.commit as i64).into()],
        )
        .map_err(spi_err)?;
    }
    let mut results = Vec::with_capacity(b.ops.len());
    for o in &b.ops {
        let id: [DatumWithOid; 2] = [(o.id.nonce as i64).into(), (o.id.seq as i64).into()];
        let seen = c
            .select(&q("SELECT revision, flag FROM raft_kv.requests WHERE nonce = $1 AND seq = $2"), None, &id)
            .map_err(spi_err)?;
        if !seen.is_empty() {
            let seen = seen.first();
            let revision = seen.get::<i64>(1).map_err(spi_err)?.unwrap_or(0) as u64;
            let flag = seen.get::<bool>(2).map_err(spi_err)?.unwrap_or(false);
            results.push(ApplyResult { revision, flag, duplicate: true });
            continue;
        }
        let rev = o.index as i64;
        let flag = match &o.op {
            KvOp::Put { key, value } => {
                c.update(
                    &q("INSERT INTO raft_kv.kv (key, value, revision) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision"),
                    None,
                    &[key.as_str().into(), value.as_str().into(), rev.into()],
                )
                .map_err(spi_err)?;
                true
            }
            KvOp::Delete { key } => {
                let t = c
                    .update(&q("DELETE FROM raft_kv.kv WHERE key = $1"), None, &[key.as_str().into()])
                    .map_err(spi_err)?;
                t.len() > 0
            }
            KvOp::Cas { key, expected: None, value } => {
                let t = c
                    .update(
                        &q("INSERT INTO raft_kv.kv (key, value, revision) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING"),
                        None,
                        &[key.as_str().into(), value.as_str().into(), rev.into()],
                    )
                    .map_err(spi_err)?;
                t.len() > 0
            }
            KvOp::Cas { key, expected: Some(expected), value } => {
                let t = c
                    .update(
                        &q("UPDATE raft_kv.kv SET value = $2, revision = $3 WHERE key = $1 AND value = $4"),
                        None,
                        &[key.as_str().into(), value.as_str().into(), rev.into(), expected.as_str().into()],
                    )
                    .map_err(spi_err)?;
                t.len() > 0
            }
        };
        let [nonce, seq] = id;
        c.update(
            &q("INSERT INTO raft_kv.requests (nonce, seq, node, revision, flag) VALUES ($1, $2, $3, $4, $5)"),
            None,
            &[nonce, seq, (o.id.node as i64).into(), rev.into(), flag.into()],
        )
        .map_err(spi_err)?;
        results.push(ApplyResult { revision: o.index, flag, duplicate: false });
    }
    if let Some(applied) = b.applied {
        if let Some(cut) = dedup_prune_below(prev_applied, applied) {
            c.update(&q("DELETE FROM raft_kv.requests WHERE revision < $1"), None, &[(cut as i64).into()])
                .map_err(spi_err)?;
        }
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
        c.update(&q("DELETE FROM raft_kv.log WHERE idx <= $1"), None, &[(index as i64).into()]).map_err(spi_err)?;
        c.update(
            &q("UPDATE raft_kv.state SET snapshot_index = $1, snapshot_term = $2 WHERE id = 1 AND snapshot_index < $1"),
            None,
            &[(index as i64).into(), (term as i64).into()],
        )
        .map_err(spi_err)?;
    }
    if b.applied.is_some() || b.conf_state.is_some() {
        let cs = b.conf_state.as_ref().map(encode_conf_state);
        c.update(
            &q("UPDATE raft_kv.state SET applied_index = coalesce($1, applied_index), \
             conf_state = coalesce($2, conf_state) WHERE id = 1"),
            None,
            &[b.applied.map(|a| a as i64).into(), cs.into()],
        )
        .map_err(spi_err)?;
    }
    Ok(results)
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
