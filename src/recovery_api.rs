//! Backup and disaster recovery at the SQL boundary: `raft_backup()` copies the state at one
//! applied index from any node, `raft_restore()` seeds a brand-new one-node cluster with it,
//! and `raft_force_new_cluster()` turns the survivor of a lost majority into a one-node
//! cluster (etcd's `snapshot save`, `snapshot restore` and `--force-new-cluster`). The
//! record format and the rules are in `raft_kv_core::backup` and `raft_kv_core::node`.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::backup::{Header, Record};
use raft_kv_core::snapshot::Cursor;

use crate::cluster_api::admin;
use crate::shmem::Op;
use crate::snapshot_tables::{read_rows, select_leases, LIVE_TABLES};
use crate::spi::spi_err;
use crate::sql_boundary::{raise, require_preload};

/// Bytes of rows per backup record.
const RECORD_BYTES: usize = 1 << 20;

/// The rows of one consistent snapshot, record by record (see `raft_kv_core::backup`).
struct BackupRecords {
    header: Option<Header>,
    cursor: Cursor,
    seq: i32,
    row_bytes: usize,
    done: bool,
}

impl BackupRecords {
    fn next_record(&mut self) -> Option<Record> {
        if let Some(h) = self.header.take() {
            return Some(Record::Header(h));
        }
        if self.done {
            return None;
        }
        // Every read runs in the calling statement's snapshot (read-only SPI does not take a
        // new one), so the records describe one applied index.
        let q = |sql: &str| sql.to_string();
        loop {
            if self.cursor == Cursor::Done {
                self.done = true;
                return Some(Record::End { records: self.seq as u32 + 1 });
            }
            let (rows, next) =
                Spi::connect(|c| read_rows(c, &q, &LIVE_TABLES, &self.cursor, RECORD_BYTES, self.row_bytes))
                    .unwrap_or_else(|e| raise(Code::ERRCODE_INTERNAL_ERROR, format!("raft_backup: {e}"), None, None));
            self.cursor = next;
            if !rows.is_empty() {
                self.row_bytes = rows.iter().map(|r| r.bytes()).sum::<usize>() / rows.len();
                return Some(Record::Rows(rows));
            }
        }
    }
}

impl Iterator for BackupRecords {
    type Item = (i32, Vec<u8>);
    fn next(&mut self) -> Option<Self::Item> {
        let r = self.next_record()?;
        let seq = self.seq;
        self.seq += 1;
        Some((seq, r.encode()))
    }
}

/// The header: where the copy is taken, read in the same snapshot as the rows.
fn backup_header() -> Header {
    Spi::connect(|c| {
        let st = c
            .select(
                "SELECT applied_index, revision, compact_revision, cluster_id, \
                        (SELECT count(*) FROM raft_kv.kv), (SELECT count(*) FROM raft_kv.requests), \
                        (SELECT count(*) FROM raft_kv.changes) \
                 FROM raft_kv.state WHERE id = 1",
                None,
                &[],
            )
            .map_err(spi_err)?;
        let st = st.first();
        let g = |i| st.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
        let id = st.get::<Vec<u8>>(4).map_err(spi_err)?.unwrap_or_default();
        Ok::<_, raft_kv_core::storage::StoreError>(Header {
            source_cluster: <[u8; 16]>::try_from(id.as_slice()).map(u128::from_be_bytes).unwrap_or(0),
            node: crate::guc::NODE_ID.get().max(0) as u64,
            index: g(1)?,
            revision: g(2)?,
            compact_revision: g(3)?,
            kv_rows: g(5)?,
            request_rows: g(6)?,
            change_rows: g(7)?,
            leases: select_leases(c, &|s| s.to_string())?,
        })
    })
    .unwrap_or_else(|e| raise(Code::ERRCODE_INTERNAL_ERROR, format!("raft_backup: {e}"), None, None))
}

/// A consistent copy of this node's state at its applied index: every key with its revisions
/// and lease, the history kept, the leases and the request ids, as numbered records. Save it
/// with `\copy (SELECT * FROM raft_backup()) TO 'file' (FORMAT binary)`; nothing stops
/// meanwhile (it reads one MVCC snapshot).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_backup() -> TableIterator<'static, (name!(seq, i32), name!(record, Vec<u8>))> {
    // SAFETY: reads this backend's transaction state; no preconditions.
    let (xid, iso) = unsafe { (pg_sys::GetCurrentTransactionIdIfAny(), pg_sys::XactIsoLevel) };
    if xid != pg_sys::InvalidTransactionId && iso < pg_sys::XACT_REPEATABLE_READ as i32 {
        // Read-write SPI would take a new snapshot per statement: the records could disagree.
        raise(
            Code::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "raft_backup() needs one snapshot: call it outside a READ COMMITTED transaction that has written".into(),
            None,
            Some("Run it as a statement of its own, or in a REPEATABLE READ transaction."),
        )
    }
    let header = backup_header();
    let records = BackupRecords { header: Some(header), cursor: Cursor::start(), seq: 0, row_bytes: 64, done: false };
    TableIterator::new(records)
}

fn require_superuser(what: &str) {
    // SAFETY: reads the session's user; no preconditions.
    if !unsafe { pg_sys::superuser() } {
        raise(Code::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("only a superuser may run {what}"), None, None)
    }
}

/// Seeds a brand-new one-node cluster (this node, whose `raft_kv.peers` lists only itself)
/// with the backup loaded into `raft_kv.restore`; returns the restored revision. Add the other
/// nodes afterwards with `raft_join`: they receive the restored state as a snapshot.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_restore() -> i64 {
    require_preload();
    require_superuser("raft_restore()");
    let staged = Spi::get_one::<i64>("SELECT count(*) FROM raft_kv.restore").ok().flatten().unwrap_or(0);
    if staged == 0 {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "raft_kv.restore is empty: load the backup into it first".into(),
            None,
            Some("\\copy raft_kv.restore FROM 'file' (FORMAT binary)"),
        )
    }
    admin(Op::Restore, 0, "", false).revision
}

/// On the survivor of a lost majority: makes this node the only voter of its cluster,
/// keeping its data, cluster id and every entry it holds; its worker restarts and leads alone.
/// Refused while a leader is known or a quorum of voters is reachable. Returns the log index
/// the new configuration starts at.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_force_new_cluster() -> i64 {
    require_preload();
    require_superuser("raft_force_new_cluster()");
    admin(Op::ForceNewCluster, 0, "", false).revision
}
