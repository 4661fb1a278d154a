//! `raft_get`'s hot path: one key's value read through `raft_kv.kv`'s primary-key index
//! without the executor (`index_probe`). In a profile of backends serving linearizable reads,
//! `ExecutorStart` for the kept one-row plan took 12 % of their time, the scan itself 10 %.
//!
//! It reads what the kept plan would: the same index, snapshot and operator (text equality
//! under the key's "C" collation), with the caller's privileges. Where the caller lacks plain
//! SELECT on the table, or row-level security applies to it, it declines and the caller runs
//! the kept plan, whose permission checks and error messages are Postgres's own.

use pgrx::pg_sys;

use crate::index_probe::{relid, Key, Probe, Snap};

/// The value stored under `key` (`Some(None)`: no such key), read with a new snapshot when
/// `fresh` (after a read barrier) or else the calling statement's; `None` when the probe
/// declines (no privilege, row-level security, the table or its key missing).
pub fn value_of(key: &str, fresh: bool) -> Option<Option<String>> {
    let relid = relid(c"raft_kv", c"kv")?;
    // SAFETY: catalog look-ups for the current user, inside a transaction.
    let plain = unsafe {
        pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
            && pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true)
                == pg_sys::CheckEnableRlsResult::RLS_NONE as i32
    };
    if !plain {
        return None;
    }
    // A linearizable read needs a snapshot taken now, after the barrier; a local one reads as
    // a SELECT in the calling statement would.
    let snap = if fresh { Snap::New } else { Snap::Statement };
    // SAFETY: called from a SQL function, inside a transaction; closed below, or released by
    // the transaction's abort if an ERROR comes first.
    let mut p = unsafe { Probe::open(relid, 1, snap) }?;
    let value = p.attnum(c"value").map(|att| if p.find(&[Key::Text(key)]) { p.text(att) } else { None });
    p.close();
    value
}
