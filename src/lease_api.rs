//! Leases at the SQL boundary: grant, keep alive, revoke, inspect (see `raft_kv_core::lease`).
//!
//! Every change goes through the log; the remaining TTL a function reports is this node's
//! view of the deadline (exact on the leader, which decides expiry; on a follower counted from
//! when it applied the last keepalive, so never shorter than the leader's).

use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use pgrx::{PgBuiltInOids, PgOid};
use raft_kv_core::lease::{Refusal, MAX_KEYS_PER_LEASE, MAX_LEASES, MAX_TTL_MS};

use crate::guc;
use crate::requests::Reply;
use crate::shmem::{self, Op};
use crate::sql_boundary::{consistency, fresh_select, raise, read_barrier, request_on, require_preload};

const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);

/// The shortest TTL granted: two base election timeouts, so a lease outlives a failover's
/// election. A shorter request is raised to it.
pub(crate) fn min_ttl_ms() -> u64 {
    2 * guc::ELECTION_TICKS.get().max(1) as u64 * guc::TICK_MS.get().max(1) as u64
}

fn interval_ms(ms: u64) -> Interval {
    Interval::from_micros(ms.saturating_mul(1000).min(i64::MAX as u64) as i64)
}

/// The lease id argument: positive, not NULL.
pub(crate) fn lease_arg(id: Option<i64>) -> u64 {
    match id {
        Some(id) if id > 0 => id as u64,
        Some(id) => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("raft_kv lease id must be positive, got {id}"),
            None,
            None,
        ),
        None => raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv lease id must not be NULL".into(), None, None),
    }
}

/// The ERROR for a request the state machine refused because of a lease.
pub(crate) fn refused(r: Option<Refusal>, lease: u64) -> ! {
    match r {
        Some(Refusal::LeaseFull) => raise(
            Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("raft_kv lease {lease} already has {MAX_KEYS_PER_LEASE} keys attached"),
            Some("Nothing was written."),
            None,
        ),
        Some(Refusal::TooManyLeases) => raise(
            Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("raft_kv holds {MAX_LEASES} leases, the most it allows"),
            Some("No lease was granted."),
            Some("Revoke leases that are no longer used."),
        ),
        // A retry of a refused request is answered without the reason: it was the lease.
        _ => raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!("raft_kv lease {lease} not found"),
            Some("It was never granted, or it was revoked, or it expired. Nothing was changed."),
            Some("Grant a new lease with raft_lease_grant()."),
        ),
    }
}

fn lease_request(op: Op, id: u64, arg: u64) -> Reply {
    request_on(op, "", "", None, None, (id, arg))
}

/// A keepalive or revoke of the lease `id` argument, which must exist.
fn existing_lease_op(op: Op, id: Option<i64>) -> (u64, Reply) {
    require_preload();
    let id = lease_arg(id);
    let r = lease_request(op, id, 0);
    if !r.flag {
        refused(r.refused, id)
    }
    (id, r)
}

/// A random positive lease id (the top bit clear, never 0).
fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: fills the 8-byte buffer it is given.
    unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    (u64::from_le_bytes(b) >> 1).max(1)
}

/// Grants a lease of `ttl` and returns its id. A TTL under the minimum (two election
/// timeouts) is raised to it, with a NOTICE saying so.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_lease_grant(ttl: Option<Interval>) -> i64 {
    require_preload();
    let Some(ttl) = ttl else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv lease TTL must not be NULL".into(), None, None)
    };
    let micros = ttl.as_micros();
    if micros <= 0 || micros / 1000 > MAX_TTL_MS as i128 {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "raft_kv lease TTL must be positive and at most 30 days".into(),
            None,
            None,
        )
    }
    let asked = (micros as u64).div_ceil(1000);
    let min = min_ttl_ms();
    let ttl_ms = asked.max(min);
    if ttl_ms > asked {
        pgrx::notice!("raft_kv lease TTL raised from {asked} ms to the minimum of {min} ms (two election timeouts)");
    }
    // A random id that happens to exist is refused; draw again.
    for _ in 0..3 {
        let id = random_id();
        let r = lease_request(Op::LeaseGrant, id, ttl_ms);
        match (r.flag, r.refused) {
            (true, _) => return id as i64,
            (false, Some(Refusal::LeaseExists)) => continue,
            (false, other) => refused(other, id),
        }
    }
    raise(Code::ERRCODE_INTERNAL_ERROR, "raft_kv could not draw an unused lease id".into(), None, None)
}

/// Restarts lease `id`'s TTL (through the log, answered once applied here); returns the TTL
/// it now has. Unknown, revoked or expired leases raise an ERROR.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_lease_keepalive(id: Option<i64>) -> Interval {
    let (id, _) = existing_lease_op(Op::LeaseKeepAlive, id);
    let remaining = shmem::lease_remaining_ms(id).unwrap_or_else(|| lease_row(id).map_or(0, |(ttl, _)| ttl));
    interval_ms(remaining)
}

/// Revokes lease `id`: it and every key attached to it are deleted, at one revision, which is
/// returned (the store's revision when no key was attached).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_lease_revoke(id: Option<i64>) -> i64 {
    existing_lease_op(Op::LeaseRevoke, id).1.revision
}

/// The granted TTL and this node's stored state of a lease, if it exists.
fn lease_row(id: u64) -> Option<(u64, u64)> {
    let sql = "SELECT ttl_ms, refreshes FROM raft_kv.leases WHERE id OPERATOR(pg_catalog.=) $1";
    fresh_select(sql, &[INT8], &[(id as i64).into()], |t| {
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok(Some((r.get::<i64>(1)?.unwrap_or(0) as u64, r.get::<i64>(2)?.unwrap_or(0) as u64)))
    })
}

/// Lease `id`: its granted TTL, the TTL left, and the keys attached to it. Linearizable by
/// default (a lease revoked or expired anywhere before the call is not found).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_lease_ttl(
    id: Option<i64>,
    consistency: default!(Option<&str>, "'linearizable'"),
) -> TableIterator<
    'static,
    (name!(id, i64), name!(granted_ttl, Interval), name!(remaining_ttl, Interval), name!(keys, Vec<String>)),
> {
    require_preload();
    let id = lease_arg(id);
    read_barrier(self::consistency(consistency));
    let Some((ttl, _)) = lease_row(id) else { refused(None, id) };
    let sql = "SELECT key FROM raft_kv.kv WHERE lease OPERATOR(pg_catalog.=) $1 \
               AND lease OPERATOR(pg_catalog.<>) 0 ORDER BY key";
    let keys = fresh_select(sql, &[INT8], &[(id as i64).into()], |t| {
        let mut keys = Vec::new();
        for r in t {
            keys.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(keys)
    });
    let remaining = shmem::lease_remaining_ms(id).unwrap_or(ttl);
    TableIterator::once((id as i64, interval_ms(ttl), interval_ms(remaining), keys))
}

/// Every lease: id, granted TTL, TTL left (this node's view) and how many keys it holds.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn raft_leases(
    consistency: default!(Option<&str>, "'linearizable'"),
) -> TableIterator<
    'static,
    (name!(id, i64), name!(granted_ttl, Interval), name!(remaining_ttl, Interval), name!(keys, i64)),
> {
    require_preload();
    read_barrier(self::consistency(consistency));
    let sql = "SELECT l.id, l.ttl_ms, (SELECT count(*) FROM raft_kv.kv k WHERE k.lease OPERATOR(pg_catalog.=) l.id \
                 AND k.lease OPERATOR(pg_catalog.<>) 0) FROM raft_kv.leases l ORDER BY l.id";
    let rows = fresh_select(sql, &[], &[], |t| {
        let mut rows = Vec::new();
        for r in t {
            let id = r.get::<i64>(1)?.unwrap_or(0);
            let ttl = r.get::<i64>(2)?.unwrap_or(0) as u64;
            let remaining = shmem::lease_remaining_ms(id as u64).unwrap_or(ttl);
            rows.push((id, interval_ms(ttl), interval_ms(remaining), r.get::<i64>(3)?.unwrap_or(0)));
        }
        Ok(rows)
    });
    TableIterator::new(rows)
}
