//! The snapshot store's SQL: freezing `raft_kv.kv`, `raft_kv.requests` and the retained
//! history (`raft_kv.changes`) into the unlogged snapshot tables with what they belong to
//! (`raft_kv.snapshot_meta`), reading it back, and making a received snapshot's staged rows
//! (`raft_kv.incoming_*`) the live ones.

use raft_kv_core::lease::LeaseRow;
use raft_kv_core::snapshot::{Cursor, Frozen, Row};
use raft_kv_core::storage::{decode_conf_state, encode_conf_state, StoreError, StoreResult};
use raft_kv_core::types::{Change, ChangeKind, KvRow, Member, SnapshotData};

use crate::spi::spi_err;

/// Copies kv and request ids into the snapshot tables, with the applied index, conf state and
/// members they belong to, all read in the caller's transaction (which must see one snapshot:
/// the worker's own, or a REPEATABLE READ one in the freeze worker).
pub fn freeze_tables(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<Frozen> {
    clear_frozen(c, q)?;
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
                rows.push(Row::Change(change_from_row(&r)?));
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

/// Each live table a received snapshot replaces, and its twin the rows are staged in.
const TWINS: [(&str, &str); 3] =
    [("kv", "incoming_kv"), ("changes", "incoming_changes"), ("requests", "incoming_requests")];

/// Empties the frozen copy's tables.
pub fn clear_frozen(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<()> {
    c.update(&q("TRUNCATE raft_kv.snapshot_kv, raft_kv.snapshot_requests, raft_kv.snapshot_changes"), None, &[])
        .map_err(spi_err)?;
    Ok(())
}

/// Empties the tables a snapshot is received into.
pub fn clear_incoming(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<()> {
    c.update(&q("TRUNCATE raft_kv.incoming_kv, raft_kv.incoming_requests, raft_kv.incoming_changes"), None, &[])
        .map_err(spi_err)?;
    Ok(())
}

/// How many rows are staged: (kv, request ids, history).
pub fn incoming_counts(c: &pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<(u64, u64, u64)> {
    let t = c
        .select(
            &q("SELECT (SELECT count(*) FROM raft_kv.incoming_kv), (SELECT count(*) FROM raft_kv.incoming_requests), \
                (SELECT count(*) FROM raft_kv.incoming_changes)"),
            None,
            &[],
        )
        .map_err(spi_err)?;
    let t = t.first();
    let g = |i| t.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
    Ok((g(1)?, g(2)?, g(3)?))
}

/// Replaces the live kv, history and request ids with the staged rows, in the caller's
/// transaction. Swapping each live table with its twin (renaming both, and their indexes)
/// writes nothing again; it needs every table locked at once, so where a reader holds one it
/// copies the rows instead, as a swap must not make the loop wait for a client.
pub fn install_incoming(c: &mut pgrx::spi::SpiClient<'_>, q: &dyn Fn(&str) -> String) -> StoreResult<()> {
    match swappable(c, q)? {
        Some(indexes) => {
            c.update(&q("TRUNCATE raft_kv.kv, raft_kv.changes, raft_kv.requests"), None, &[]).map_err(spi_err)?;
            let schema = q("raft_kv.");
            let schema = schema.trim_end_matches('.');
            let swap = |c: &mut pgrx::spi::SpiClient<'_>, what: &str, a: &str, b: &str| -> StoreResult<()> {
                use pgrx::spi::quote_identifier as ident;
                let (qa, qb, tmp) = (ident(a), ident(b), ident(format!("{a}_swapping")));
                let s = ident(schema);
                for sql in [
                    format!("ALTER {what} {s}.{qa} RENAME TO {tmp}"),
                    format!("ALTER {what} {s}.{qb} RENAME TO {qa}"),
                    format!("ALTER {what} {s}.{tmp} RENAME TO {qb}"),
                ] {
                    c.update(&sql, None, &[]).map_err(spi_err)?;
                }
                Ok(())
            };
            for ((live, incoming), pairs) in TWINS.iter().zip(&indexes) {
                swap(c, "TABLE", live, incoming)?;
                for (a, b) in pairs {
                    swap(c, "INDEX", a, b)?;
                }
            }
            Ok(())
        }
        None => {
            pgrx::log!("raft_kv: installing the snapshot by copying its rows (its tables could not be swapped now)");
            for (live, incoming) in TWINS {
                c.update(&q(&format!("DELETE FROM raft_kv.{live}")), None, &[]).map_err(spi_err)?;
                c.update(&q(&format!("INSERT INTO raft_kv.{live} SELECT * FROM raft_kv.{incoming}")), None, &[])
                    .map_err(spi_err)?;
            }
            clear_incoming(c, q)
        }
    }
}

/// The index pairs of each twin, if a swap can be done now: each pair agrees in persistence,
/// owner, rights and row security, each index has exactly one twin, no event trigger would
/// fire on the renames, and all six tables are locked (without waiting).
fn swappable(
    c: &mut pgrx::spi::SpiClient<'_>,
    q: &dyn Fn(&str) -> String,
) -> StoreResult<Option<Vec<Vec<(String, String)>>>> {
    use pgrx::pg_sys;
    let triggers = c
        .select("SELECT count(*) FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D'", None, &[])
        .map_err(spi_err)?
        .first()
        .get::<i64>(1)
        .map_err(spi_err)?
        .unwrap_or(0);
    if triggers > 0 {
        return Ok(None);
    }
    let mut oids = Vec::new();
    let mut indexes = Vec::new();
    for (live, incoming) in TWINS {
        let t = c
            .select(
                "SELECT l.oid, i.oid, l.relpersistence = i.relpersistence AND l.relowner = i.relowner \
                        AND l.relacl IS NOT DISTINCT FROM i.relacl AND l.relrowsecurity = i.relrowsecurity \
                        AND NOT l.relforcerowsecurity AND NOT i.relforcerowsecurity, \
                        (SELECT count(*) FROM pg_catalog.pg_index WHERE indrelid = l.oid), \
                        (SELECT count(*) FROM pg_catalog.pg_index WHERE indrelid = i.oid) \
                 FROM pg_catalog.pg_class l, pg_catalog.pg_class i \
                 WHERE l.oid = pg_catalog.to_regclass($1) AND i.oid = pg_catalog.to_regclass($2)",
                None,
                &[q(&format!("raft_kv.{live}")).into(), q(&format!("raft_kv.{incoming}")).into()],
            )
            .map_err(spi_err)?;
        if t.is_empty() {
            return Ok(None);
        }
        let t = t.first();
        let (l, i) = (t.get::<pg_sys::Oid>(1).map_err(spi_err)?, t.get::<pg_sys::Oid>(2).map_err(spi_err)?);
        let (Some(l), Some(i)) = (l, i) else { return Ok(None) };
        let alike = t.get::<bool>(3).map_err(spi_err)?.unwrap_or(false);
        let counts = (t.get::<i64>(4).map_err(spi_err)?, t.get::<i64>(5).map_err(spi_err)?);
        if !alike || counts.0 != counts.1 {
            return Ok(None);
        }
        // Twins: the same columns, operator classes, collations, uniqueness and predicate.
        let mut pairs = Vec::new();
        let rows = c
            .select(
                "SELECT lc.relname::text, ic.relname::text \
                 FROM pg_catalog.pg_index l JOIN pg_catalog.pg_index i \
                   ON i.indrelid = $2 AND i.indkey = l.indkey AND i.indclass = l.indclass \
                  AND i.indcollation = l.indcollation AND i.indisunique = l.indisunique \
                  AND i.indisprimary = l.indisprimary \
                  AND pg_catalog.pg_get_expr(i.indpred, i.indrelid) IS NOT DISTINCT FROM \
                      pg_catalog.pg_get_expr(l.indpred, l.indrelid) \
                  AND i.indexprs IS NULL AND l.indexprs IS NULL \
                 JOIN pg_catalog.pg_class lc ON lc.oid = l.indexrelid \
                 JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
                 WHERE l.indrelid = $1",
                None,
                &[l.into(), i.into()],
            )
            .map_err(spi_err)?;
        for r in rows {
            let a = r.get::<String>(1).map_err(spi_err)?.unwrap_or_default();
            let b = r.get::<String>(2).map_err(spi_err)?.unwrap_or_default();
            pairs.push((a, b));
        }
        let distinct = |f: fn(&(String, String)) -> &String| {
            pairs.iter().map(f).collect::<std::collections::HashSet<_>>().len() == pairs.len()
        };
        if pairs.len() as i64 != counts.0.unwrap_or(-1) || !distinct(|p| &p.0) || !distinct(|p| &p.1) {
            return Ok(None);
        }
        indexes.push(pairs);
        oids.extend([l, i]);
    }
    let mut locked = Vec::new();
    for oid in oids {
        // SAFETY: in a transaction; a lock taken here is held to its end, or released below.
        if unsafe { pg_sys::ConditionalLockRelationOid(oid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) } {
            locked.push(oid);
        } else {
            for oid in locked {
                // SAFETY: releases only the lock taken above, in this transaction.
                unsafe { pg_sys::UnlockRelationOid(oid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
            }
            return Ok(None);
        }
    }
    Ok(Some(indexes))
}

/// A history row as `SELECT revision, key, kind, value, prev_value, create_revision, version,
/// prev_mod_revision` returns it.
fn change_from_row(r: &pgrx::spi::SpiHeapTupleData<'_>) -> StoreResult<Change> {
    let g = |i| r.get::<i64>(i).map_err(spi_err).map(|v| v.unwrap_or(0) as u64);
    let kind: String = r.get(3).map_err(spi_err)?.unwrap_or_default();
    Ok(Change {
        revision: g(1)?,
        key: r.get(2).map_err(spi_err)?.unwrap_or_default(),
        kind: ChangeKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("history kind {kind:?}")))?,
        value: r.get(4).map_err(spi_err)?,
        prev_value: r.get(5).map_err(spi_err)?,
        create_revision: g(6)?,
        version: g(7)?,
        prev_mod_revision: r.get::<i64>(8).map_err(spi_err)?.map(|v| v as u64),
    })
}
