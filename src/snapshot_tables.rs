//! The snapshot store's SQL: freezing `raft_kv.kv`, `raft_kv.requests` and the retained
//! history (`raft_kv.changes`) into the unlogged snapshot tables with what they belong to
//! (`raft_kv.snapshot_meta`), and reading it back.

use raft_kv_core::lease::LeaseRow;
use raft_kv_core::snapshot::{Cursor, Frozen, Row};
use raft_kv_core::storage::{decode_conf_state, encode_conf_state, StoreError, StoreResult};
use raft_kv_core::types::KvRow;
use raft_kv_core::types::{Member, SnapshotData};

use crate::spi::spi_err;

/// Copies kv and request ids into the snapshot tables, with the applied index, conf state and
/// members they belong to, all read in the caller's transaction (which must see one snapshot:
/// the worker's own, or a REPEATABLE READ one in the freeze worker).
pub fn freeze_tables(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<Frozen> {
    c.update(&q("TRUNCATE raft_kv.snapshot_kv, raft_kv.snapshot_requests, raft_kv.snapshot_changes"), None, &[])
        .map_err(spi_err)?;
    let kv = c
        .update(
            &q("INSERT INTO raft_kv.snapshot_kv SELECT key, value, mod_revision, create_revision, version, lease \
                FROM raft_kv.kv"),
            None,
            &[],
        )
        .map_err(spi_err)?
        .len();
    let changes = c
        .update(
            &q("INSERT INTO raft_kv.snapshot_changes SELECT revision, key, kind, value, prev_value, create_revision, \
                version, prev_mod_revision FROM raft_kv.changes"),
            None,
            &[],
        )
        .map_err(spi_err)?
        .len();
    let requests = c
        .update(
            &q("INSERT INTO raft_kv.snapshot_requests SELECT nonce, seq, node, revision, flag FROM raft_kv.requests"),
            None,
            &[],
        )
        .map_err(spi_err)?
        .len();
    let t = c
        .select(
            &q("SELECT applied_index, conf_state, revision, compact_revision FROM raft_kv.state WHERE id = 1"),
            None,
            &[],
        )
        .map_err(spi_err)?;
    let t = t.first();
    let index = t.get::<i64>(1).map_err(spi_err)?.unwrap_or(0) as u64;
    let conf_state = decode_conf_state(&t.get::<Vec<u8>>(2).map_err(spi_err)?.unwrap_or_default())?;
    let revision = t.get::<i64>(3).map_err(spi_err)?.unwrap_or(0) as u64;
    let compact_revision = t.get::<i64>(4).map_err(spi_err)?.unwrap_or(0) as u64;
    let members = select_members(c, q)?;
    let leases = select_leases(c, q)?;
    Ok(Frozen {
        leases,
        index,
        kv_rows: kv as u64,
        request_rows: requests as u64,
        change_rows: changes as u64,
        revision,
        compact_revision,
        conf_state,
        members,
    })
}

/// Every lease (at most `MAX_LEASES`: they travel inside the snapshot message).
pub fn select_leases(c: &pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<Vec<(u64, LeaseRow)>> {
    let mut out = Vec::new();
    for r in c.select(&q("SELECT id, ttl_ms, refreshes FROM raft_kv.leases ORDER BY id"), None, &[]).map_err(spi_err)? {
        let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
        out.push((g(1)?, LeaseRow { ttl_ms: g(2)?, refreshes: g(3)? }));
    }
    Ok(out)
}

pub fn select_members(c: &pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<Vec<Member>> {
    let mut out = Vec::new();
    for r in c.select(&q("SELECT id, address, promote FROM raft_kv.members ORDER BY id"), None, &[]).map_err(spi_err)? {
        out.push(Member {
            id: r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0) as u64,
            address: r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
            promote: r.get::<bool>(3).map_err(spi_err)?.unwrap_or(false),
        });
    }
    Ok(out)
}

/// Records what the freeze worker copied, for the Raft worker to pick up.
pub fn write_frozen(c: &mut pgrx::spi::SpiClient<'_>, f: &Frozen) -> StoreResult<()> {
    let members = encode_members(&f.members);
    let leases = SnapshotData { leases: f.leases.clone(), ..Default::default() }.encode();
    c.update(
        "INSERT INTO raft_kv.snapshot_meta (applied_index, kv_rows, request_rows, conf_state, members, \
         change_rows, revision, compact_revision, leases) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        None,
        &[
            (f.index as i64).into(),
            (f.kv_rows as i64).into(),
            (f.request_rows as i64).into(),
            encode_conf_state(&f.conf_state).into(),
            members.into(),
            (f.change_rows as i64).into(),
            (f.revision as i64).into(),
            (f.compact_revision as i64).into(),
            leases.into(),
        ],
    )
    .map_err(spi_err)?;
    Ok(())
}

pub fn read_frozen(c: &pgrx::spi::SpiClient<'_>) -> StoreResult<Option<Frozen>> {
    let t = c
        .select(
            "SELECT applied_index, kv_rows, request_rows, conf_state, members, change_rows, revision, \
             compact_revision, leases FROM raft_kv.snapshot_meta",
            None,
            &[],
        )
        .map_err(spi_err)?;
    if t.is_empty() {
        return Ok(None);
    }
    let t = t.first();
    let g = |i| t.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
    let members: Vec<u8> = t.get(5).map_err(spi_err)?.unwrap_or_default();
    let leases: Vec<u8> = t.get(9).map_err(spi_err)?.unwrap_or_default();
    Ok(Some(Frozen {
        index: g(1)?,
        kv_rows: g(2)?,
        request_rows: g(3)?,
        change_rows: g(6)?,
        revision: g(7)?,
        compact_revision: g(8)?,
        conf_state: decode_conf_state(&t.get::<Vec<u8>>(4).map_err(spi_err)?.unwrap_or_default())?,
        members: SnapshotData::decode(&members)
            .map_err(|e| StoreError::Corrupt(format!("frozen members: {e}")))?
            .members,
        leases: SnapshotData::decode(&leases).map_err(|e| StoreError::Corrupt(format!("frozen leases: {e}")))?.leases,
    }))
}

/// Members in the encoding snapshots already use.
fn encode_members(members: &[Member]) -> Vec<u8> {
    SnapshotData { members: members.to_vec(), ..Default::default() }.encode()
}

/// The tables rows are read from: the snapshot store, or (for a backup) the live tables.
pub struct RowTables {
    pub kv: &'static str,
    pub requests: &'static str,
    pub changes: &'static str,
}

pub const SNAPSHOT_STORE: RowTables =
    RowTables { kv: "raft_kv.snapshot_kv", requests: "raft_kv.snapshot_requests", changes: "raft_kv.snapshot_changes" };
pub const LIVE_TABLES: RowTables =
    RowTables { kv: "raft_kv.kv", requests: "raft_kv.requests", changes: "raft_kv.changes" };

/// Rows of `t` after `cursor` by key-set pagination, about `max_bytes` of them (a running sum
/// stops a chunk there, so large values never arrive in bulk), and where to continue.
/// `row_bytes` is the average size of the rows read last, so the query reads about as many
/// rows as fit.
pub fn read_rows(
    c: &pgrx::spi::SpiClient<'_>,
    q: &dyn Fn(&str) -> String,
    t: &RowTables,
    cursor: &Cursor,
    max_bytes: usize,
    row_bytes: usize,
) -> StoreResult<(Vec<Row>, Cursor)> {
    // Enough rows for the chunk at the last rows' size, and some to spare.
    let limit = (2 * max_bytes / row_bytes.max(16)).clamp(16, 10_000) as i64;
    let (kv, requests, changes) = (t.kv, t.requests, t.changes);
    match cursor {
        Cursor::Kv(after) => {
            let filter = if after.is_some() { "WHERE key > $2" } else { "WHERE $2::text IS NULL" };
            let sql = q(&format!(
                "SELECT key, value, mod_revision, create_revision, version, lease FROM ( \
                   SELECT *, octet_length(key) + octet_length(value) + 32 AS size, \
                          sum(octet_length(key) + octet_length(value) + 32) \
                            OVER (ORDER BY key ROWS UNBOUNDED PRECEDING) AS upto \
                   FROM {kv} {filter} ORDER BY key LIMIT $3) s \
                 WHERE upto - size < $1 ORDER BY key"
            ));
            let t = c
                .select(&sql, None, &[(max_bytes as i64).into(), after.as_deref().into(), limit.into()])
                .map_err(spi_err)?;
            let mut rows = Vec::with_capacity(t.len());
            for r in t {
                let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
                rows.push(Row::Kv {
                    key: r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
                    row: KvRow {
                        value: r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
                        mod_revision: g(3)?,
                        create_revision: g(4)?,
                        version: g(5)?,
                        lease: g(6)?,
                    },
                });
            }
            let next = match rows.last() {
                Some(Row::Kv { key, .. }) => Cursor::Kv(Some(key.clone())),
                _ => Cursor::Requests(None),
            };
            Ok((rows, next))
        }
        Cursor::Requests(after) => {
            let (n, s) = after.map_or((i64::MIN, i64::MIN), |(n, s)| (n as i64, s as i64));
            // From the start: everything at or above the smallest key.
            let op = if after.is_some() { ">" } else { ">=" };
            let sql = q(&format!(
                "SELECT nonce, seq, node, revision, flag FROM {requests} \
                 WHERE (nonce, seq) {op} ($1, $2) ORDER BY nonce, seq LIMIT $3"
            ));
            let limit = (max_bytes / 40).max(1) as i64;
            let t = c.select(&sql, None, &[n.into(), s.into(), limit.into()]).map_err(spi_err)?;
            let mut rows = Vec::with_capacity(t.len());
            for r in t {
                let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
                rows.push(Row::Request {
                    nonce: g(1)?,
                    seq: g(2)?,
                    node: g(3)?,
                    revision: g(4)?,
                    flag: r.get::<bool>(5).map_err(spi_err)?.unwrap_or(false),
                });
            }
            let next = match rows.last() {
                Some(&Row::Request { nonce, seq, .. }) => Cursor::Requests(Some((nonce, seq))),
                _ => Cursor::Changes(None),
            };
            Ok((rows, next))
        }
        Cursor::Changes(after) => {
            let (rev, key) = after.clone().map_or((-1, String::new()), |(r, k)| (r as i64, k));
            let sql = q(&format!(
                "SELECT revision, key, kind, value, prev_value, create_revision, version, prev_mod_revision FROM ( \
                   SELECT *, octet_length(key) + coalesce(octet_length(value), 0) \
                             + coalesce(octet_length(prev_value), 0) + 48 AS size, \
                          sum(octet_length(key) + coalesce(octet_length(value), 0) \
                             + coalesce(octet_length(prev_value), 0) + 48) \
                            OVER (ORDER BY revision, key ROWS UNBOUNDED PRECEDING) AS upto \
                   FROM {changes} WHERE (revision, key) > ($2, $3) \
                   ORDER BY revision, key LIMIT $4) s \
                 WHERE upto - size < $1 ORDER BY revision, key"
            ));
            let t = c
                .select(&sql, None, &[(max_bytes as i64).into(), rev.into(), key.as_str().into(), limit.into()])
                .map_err(spi_err)?;
            let mut rows = Vec::with_capacity(t.len());
            for r in t {
                rows.push(Row::Change(crate::storage::change_from_row(&r)?));
            }
            let next = match rows.last() {
                Some(Row::Change(ch)) => Cursor::Changes(Some((ch.revision, ch.key.clone()))),
                _ => Cursor::Done,
            };
            Ok((rows, next))
        }
        Cursor::Done => Ok((Vec::new(), Cursor::Done)),
    }
}
