//! Revisions and history at the SQL boundary: reads at a past revision, the change feed
//! (`raft_changes`), the blocking watch (`raft_watch`) and compaction (`raft_compact`).
//!
//! Every read here is one statement that also reads the store's revision and compaction point
//! (`raft_kv.revisions`), so the rows and the bounds they are checked against come from one
//! snapshot: a compaction that commits meanwhile cannot remove rows a read relies on.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use pgrx::{PgBuiltInOids, PgOid};
use raft_kv_core::command::prefix_end;
use raft_kv_core::types::KvRow;

use crate::shmem::{self, Op};
use crate::sql_boundary::{check_key, consistency, fresh_select, raise, read_barrier, request, require_preload, TEXT};

const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
const INT4: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT4OID);

/// Largest `max_rows` one call of `raft_changes` or `raft_watch` returns.
const MAX_ROWS_CEILING: i32 = 100_000;

/// The store's revision and compaction point as one snapshot saw them.
#[derive(Clone, Copy)]
struct Bounds {
    revision: u64,
    compact: u64,
}

impl Bounds {
    /// `at` must still be retained, and not be in this node's future.
    fn check_readable(self, at: u64) {
        if at < self.compact {
            compacted(at, self.compact)
        }
        if at > self.revision {
            raise(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("raft_kv revision {at} is ahead of this node's revision {}", self.revision),
                None,
                Some("Read at a revision a write returned, or with consistency 'linearizable'."),
            )
        }
    }
}

fn compacted(at: u64, compact: u64) -> ! {
    raise(
        Code::ERRCODE_SNAPSHOT_TOO_OLD,
        format!("raft_kv revision {at} has been compacted"),
        Some(&format!("History is kept from revision {compact}.")),
        Some("Read the current state (raft_scan) and follow raft_changes from its revision + 1."),
    )
}

pub(crate) fn revision_arg(name: &str, v: Option<i64>) -> Option<u64> {
    match v {
        None => None,
        Some(r) if r >= 1 => Some(r as u64),
        Some(r) => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("raft_kv {name} must be at least 1, got {r}"),
            None,
            None,
        ),
    }
}

fn row_of(r: &pgrx::spi::SpiHeapTupleData<'_>, from: usize) -> Result<KvRow, pgrx::spi::SpiError> {
    let g = |i: usize| r.get::<i64>(from + i).map(|v| v.unwrap_or(0) as u64);
    Ok(KvRow {
        value: r.get::<String>(from)?.unwrap_or_default(),
        mod_revision: g(1)?,
        create_revision: g(2)?,
        version: g(3)?,
        // Reads report no lease (the history does not record them; see raft_lease_ttl).
        lease: 0,
    })
}

/// The key's state at revision `at` (the current one when `None`), with its metadata.
pub(crate) fn get_at(key: &str, at: Option<u64>) -> Option<KvRow> {
    let Some(at) = at else {
        let sql =
            "SELECT value, mod_revision, create_revision, version FROM raft_kv.kv WHERE key OPERATOR(pg_catalog.=) $1";
        return fresh_select(sql, &[TEXT], &[key.into()], |mut t| t.next().map(|r| row_of(&r, 1)).transpose());
    };
    // The key's first change after `at` says what it was at `at`; without one, it is as now.
    let sql = "WITH later AS (SELECT * FROM raft_kv.changes \
                 WHERE key OPERATOR(pg_catalog.=) $1 AND revision OPERATOR(pg_catalog.>) $2 ORDER BY revision LIMIT 1) \
               SELECT 0, NULL::pg_catalog.text, s.revision, s.compact_revision, NULL::pg_catalog.int8 FROM raft_kv.revisions s \
               UNION ALL \
               SELECT 1, l.prev_value, l.prev_mod_revision, l.create_revision, \
                      CASE WHEN l.kind OPERATOR(pg_catalog.=) 'put' THEN l.version OPERATOR(pg_catalog.-) 1 ELSE l.version END \
                 FROM later l WHERE l.prev_mod_revision IS NOT NULL \
               UNION ALL \
               SELECT 1, k.value, k.mod_revision, k.create_revision, k.version FROM raft_kv.kv k \
                 WHERE k.key OPERATOR(pg_catalog.=) $1 AND NOT EXISTS (SELECT FROM later)";
    let (bounds, row) = fresh_select(sql, &[TEXT, INT8], &[key.into(), (at as i64).into()], |t| {
        let mut bounds = Bounds { revision: 0, compact: 0 };
        let mut row = None;
        for r in t {
            if r.get::<i32>(1)? == Some(0) {
                bounds = Bounds {
                    revision: r.get::<i64>(3)?.unwrap_or(0) as u64,
                    compact: r.get::<i64>(4)?.unwrap_or(0) as u64,
                };
            } else {
                row = Some(row_of(&r, 2)?);
            }
        }
        Ok((bounds, row))
    });
    bounds.check_readable(at);
    row
}

/// The keys changed at `revision`, each with whether it was deleted.
pub(crate) fn changes_at(revision: u64) -> Vec<(String, bool)> {
    let sql = "SELECT key, kind OPERATOR(pg_catalog.=) 'delete' FROM raft_kv.changes WHERE revision OPERATOR(pg_catalog.=) $1";
    fresh_select(sql, &[INT8], &[(revision as i64).into()], |t| {
        let mut out = Vec::with_capacity(t.len());
        for r in t {
            out.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<bool>(2)?.unwrap_or(false)));
        }
        Ok(out)
    })
}

/// The current keys under a prefix, as a key range, so the primary-key index serves it (keys
/// sort bytewise: the column's collation is "C"): `$1` the prefix, `$2` its end. Two
/// statements, not one with "$2 IS NULL OR": a kept generic plan can only bound the index scan
/// by a condition it always has, and would otherwise read to the table's end. The column list
/// is `raft_scan`'s result type.
pub(crate) const SCAN_RANGE_SQL: &str = "SELECT key, value, mod_revision, create_revision, version FROM raft_kv.kv \
     WHERE key OPERATOR(pg_catalog.>=) $1 AND key OPERATOR(pg_catalog.<) $2 ORDER BY key";
/// [`SCAN_RANGE_SQL`] for a prefix with no end (empty, or all U+10FFFF).
pub(crate) const SCAN_FROM_SQL: &str = "SELECT key, value, mod_revision, create_revision, version FROM raft_kv.kv \
     WHERE key OPERATOR(pg_catalog.>=) $1 ORDER BY key";

/// Every key starting with `prefix` now, in key order, with a new snapshot (after a read
/// barrier).
fn scan_now(prefix: &str) -> Vec<(String, KvRow)> {
    let read = |t: pgrx::spi::SpiTupleTable| {
        let mut rows = Vec::with_capacity(t.len());
        for r in t {
            rows.push((r.get::<String>(1)?.unwrap_or_default(), row_of(&r, 2)?));
        }
        Ok(rows)
    };
    match prefix_end(prefix) {
        Some(upper) => fresh_select(SCAN_RANGE_SQL, &[TEXT, TEXT], &[prefix.into(), upper.as_str().into()], read),
        None => fresh_select(SCAN_FROM_SQL, &[TEXT], &[prefix.into()], read),
    }
}

/// Every key starting with `prefix` at revision `at` (now when `None`), in key order.
pub(crate) fn scan_at(prefix: &str, at: Option<u64>) -> Vec<(String, KvRow)> {
    let Some(at) = at else { return scan_now(prefix) };
    let upper = prefix_end(prefix);
    let sql = "WITH later AS (SELECT DISTINCT ON (key) * FROM raft_kv.changes \
                 WHERE revision OPERATOR(pg_catalog.>) $3 AND key OPERATOR(pg_catalog.>=) $1 \
                   AND ($2::text IS NULL OR key OPERATOR(pg_catalog.<) $2) ORDER BY key, revision) \
               SELECT 0, NULL::text, NULL::text, s.revision, s.compact_revision, NULL::bigint FROM raft_kv.revisions s \
               UNION ALL \
               SELECT 1, l.key, l.prev_value, l.prev_mod_revision, l.create_revision, \
                      CASE l.kind WHEN 'put' THEN l.version OPERATOR(pg_catalog.-) 1 ELSE l.version END \
                 FROM later l WHERE l.prev_mod_revision IS NOT NULL \
               UNION ALL \
               SELECT 1, k.key, k.value, k.mod_revision, k.create_revision, k.version FROM raft_kv.kv k \
                 WHERE k.key OPERATOR(pg_catalog.>=) $1 AND ($2::text IS NULL OR k.key OPERATOR(pg_catalog.<) $2) \
                   AND NOT EXISTS (SELECT FROM later l WHERE l.key OPERATOR(pg_catalog.=) k.key)";
    let (bounds, mut rows) =
        fresh_select(sql, &[TEXT, TEXT, INT8], &[prefix.into(), upper.as_deref().into(), (at as i64).into()], |t| {
            let mut bounds = Bounds { revision: 0, compact: 0 };
            let mut rows = Vec::new();
            for r in t {
                if r.get::<i32>(1)? == Some(0) {
                    bounds = Bounds {
                        revision: r.get::<i64>(4)?.unwrap_or(0) as u64,
                        compact: r.get::<i64>(5)?.unwrap_or(0) as u64,
                    };
                } else {
                    rows.push((r.get::<String>(2)?.unwrap_or_default(), row_of(&r, 3)?));
                }
            }
            Ok((bounds, rows))
        });
    bounds.check_readable(at);
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// `key`'s value and metadata (no row when absent), with the consistency choices of
/// `raft_get`; `at_revision` reads the state as of that revision.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_get_kv(
    key: Option<&str>,
    consistency: default!(Option<&str>, "'linearizable'"),
    at_revision: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(key, String),
        name!(value, String),
        name!(mod_revision, i64),
        name!(create_revision, i64),
        name!(version, i64),
    ),
> {
    require_preload();
    let key = check_key(key);
    let at = revision_arg("at_revision", at_revision);
    read_barrier(self::consistency(consistency));
    let row = get_at(key, at);
    TableIterator::new(
        row.map(|r| (key.to_string(), r.value, r.mod_revision as i64, r.create_revision as i64, r.version as i64)),
    )
}

/// revision, key, kind, value, prev_value, create_revision, version, prev_mod_revision.
type ChangeRow = (i64, String, String, Option<String>, Option<String>, i64, i64, Option<i64>);

/// Changes with revision >= `since` under `prefix`, at most `limit` rows, and the bounds.
fn read_changes(since: u64, prefix: &str, limit: i32) -> (Bounds, Vec<ChangeRow>) {
    let upper = prefix_end(prefix);
    let sql =
        "SELECT 0, s.revision, NULL::text, NULL::text, NULL::text, NULL::text, s.compact_revision, NULL::bigint, \
                      NULL::bigint FROM raft_kv.revisions s \
               UNION ALL \
               (SELECT 1, c.revision, c.key, c.kind, c.value, c.prev_value, c.create_revision, c.version, \
                       c.prev_mod_revision FROM raft_kv.changes c \
                 WHERE c.revision OPERATOR(pg_catalog.>=) $1 AND c.key OPERATOR(pg_catalog.>=) $2 \
                   AND ($3::text IS NULL OR c.key OPERATOR(pg_catalog.<) $3) \
                 ORDER BY c.revision, c.key LIMIT $4)";
    fresh_select(
        sql,
        &[INT8, TEXT, TEXT, INT4],
        &[(since as i64).into(), prefix.into(), upper.as_deref().into(), limit.into()],
        |t| {
            let mut bounds = Bounds { revision: 0, compact: 0 };
            let mut rows = Vec::new();
            for r in t {
                let g = |i| r.get::<i64>(i).map(|v| v.unwrap_or(0));
                if r.get::<i32>(1)? == Some(0) {
                    bounds = Bounds { revision: g(2)? as u64, compact: g(7)? as u64 };
                } else {
                    rows.push((
                        g(2)?,
                        r.get::<String>(3)?.unwrap_or_default(),
                        r.get::<String>(4)?.unwrap_or_default(),
                        r.get::<String>(5)?,
                        r.get::<String>(6)?,
                        g(7)?,
                        g(8)?,
                        r.get::<i64>(9)?,
                    ));
                }
            }
            Ok((bounds, rows))
        },
    )
}

/// Up to `max_rows` changes from `since` on, never part of a revision (a single revision
/// larger than `max_rows` is returned whole), and the bounds of the read.
fn changes_page(since: u64, prefix: &str, max_rows: i32) -> (Bounds, Vec<ChangeRow>) {
    let (bounds, mut rows) = read_changes(since, prefix, max_rows + 1);
    if since < bounds.compact {
        compacted(since, bounds.compact)
    }
    if rows.len() > max_rows as usize {
        let cut = rows[max_rows as usize].0;
        rows.retain(|r| r.0 < cut);
        if rows.is_empty() {
            // One revision holds more than max_rows changes: return it whole.
            let (again, all) = read_changes(cut as u64, prefix, i32::MAX);
            if cut as u64 >= again.compact {
                return (bounds, all.into_iter().filter(|r| r.0 == cut).collect());
            }
            compacted(since, again.compact)
        }
    }
    (bounds, rows)
}

fn check_max_rows(max_rows: Option<i32>) -> i32 {
    match max_rows {
        Some(n) if (1..=MAX_ROWS_CEILING).contains(&n) => n,
        other => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("raft_kv max_rows must be 1 to {MAX_ROWS_CEILING}, got {other:?}"),
            None,
            None,
        ),
    }
}

fn check_prefix(prefix: Option<&str>) -> &str {
    prefix.unwrap_or_else(|| {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv prefix must not be NULL".into(), None, None)
    })
}

fn check_since(since: Option<i64>) -> u64 {
    match since {
        None => {
            raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv since_revision must not be NULL".into(), None, None)
        }
        s => revision_arg("since_revision", s).expect("not NULL"),
    }
}

/// The change feed: every change to a key under `prefix` with revision >= `since_revision`,
/// in revision order (a revision's keys in key order), at most `max_rows` rows but never part
/// of a revision. To follow it, call again with the last revision seen + 1: no change is
/// missed or repeated, across reconnects, restarts and leader changes. A revision below the
/// compaction point raises SQLSTATE 72000 (snapshot_too_old).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_changes(
    since_revision: Option<i64>,
    prefix: default!(Option<&str>, "''"),
    max_rows: default!(Option<i32>, "1000"),
    consistency: default!(Option<&str>, "'linearizable'"),
) -> TableIterator<
    'static,
    (
        name!(revision, i64),
        name!(key, String),
        name!(kind, String),
        name!(value, Option<String>),
        name!(prev_value, Option<String>),
        name!(create_revision, i64),
        name!(version, i64),
        name!(prev_mod_revision, Option<i64>),
    ),
> {
    require_preload();
    let since = check_since(since_revision);
    let prefix = check_prefix(prefix);
    let max_rows = check_max_rows(max_rows);
    read_barrier(self::consistency(consistency));
    TableIterator::new(changes_page(since, prefix, max_rows).1)
}

/// Like `raft_changes` on this node's applied state, but waits (up to `timeout`) until there
/// is something to return: woken by the worker each time it applies, never by polling.
/// Returns no rows when the timeout passes first.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_watch(
    prefix: Option<&str>,
    since_revision: Option<i64>,
    timeout: default!(Option<pgrx::datum::Interval>, "'30 seconds'"),
    max_rows: default!(Option<i32>, "1000"),
) -> TableIterator<
    'static,
    (
        name!(revision, i64),
        name!(key, String),
        name!(kind, String),
        name!(value, Option<String>),
        name!(prev_value, Option<String>),
        name!(create_revision, i64),
        name!(version, i64),
        name!(prev_mod_revision, Option<i64>),
    ),
> {
    require_preload();
    let prefix = check_prefix(prefix);
    let since = check_since(since_revision);
    let max_rows = check_max_rows(max_rows);
    let timeout_us = timeout.map(|t| t.as_micros()).unwrap_or(30_000_000);
    if !(0..=3_600_000_000i128).contains(&timeout_us) {
        raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, "raft_kv watch timeout must be 0 to 1 hour".into(), None, None)
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_micros(timeout_us as u64);
    let mut from = since;
    loop {
        // Raises the compacted error for `since` on the first pass; later passes start past
        // revisions already read, whose compaction no longer matters.
        let (bounds, rows) = changes_page(from, prefix, max_rows);
        if !rows.is_empty() {
            return TableIterator::new(rows);
        }
        // Nothing matches up to bounds.revision: only later revisions can.
        from = from.max(bounds.revision + 1);
        if !wait_for_revision_above(bounds.revision, deadline) {
            return TableIterator::new(Vec::new());
        }
    }
}

/// Sleeps on the worker's condition variable until the published revision passes `seen`;
/// false at the deadline. Cancel and statement_timeout interrupt it as usual.
pub(crate) fn wait_for_revision_above(seen: u64, deadline: std::time::Instant) -> bool {
    let cv = shmem::watch_cv();
    // SAFETY: the condition variable lives in shared memory and was initialised there; this
    // backend sleeps on one variable at a time and cancels the sleep before returning (and an
    // ERROR cancels it during abort).
    unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    let passed = loop {
        if shmem::revisions().0 > seen {
            break true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break false;
        }
        // SAFETY: as above; waits on MyLatch, and checks for interrupts when woken.
        unsafe {
            pg_sys::ConditionVariableTimedSleep(cv, left.as_millis().max(1) as i64, pg_sys::PG_WAIT_EXTENSION);
        }
    };
    // SAFETY: ends the sleep prepared above.
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    passed
}

/// Forgets history below `revision` on every node (through the log), like etcd's compact.
/// Returns the compaction point after the call; one at or past `revision` already changes
/// nothing. A revision beyond the store's raises an error.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_compact(revision: Option<i64>) -> i64 {
    require_preload();
    let Some(at) = revision_arg("revision", revision) else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv revision must not be NULL".into(), None, None)
    };
    let reply = request(Op::Compact, "", &at.to_string(), None, None);
    if !reply.flag {
        // Not moved: either past the store's revision when it applied, or compacted already.
        if at > reply.revision as u64 {
            raise(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("raft_kv cannot compact at revision {at}: the store's revision is {}", reply.revision),
                None,
                None,
            )
        }
        // Already compacted at or past it.
        return shmem::revisions().1.max(at) as i64;
    }
    at as i64
}
