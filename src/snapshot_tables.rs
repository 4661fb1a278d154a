//! The snapshot store's SQL: freezing `raft_kv.kv`, `raft_kv.requests` and the retained
//! history (`raft_kv.changes`) into the unlogged snapshot tables with what they belong to
//! (`raft_kv.snapshot_meta`), and reading it back.

use raft_kv_core::lease::LeaseRow;
use raft_kv_core::snapshot::Frozen;
use raft_kv_core::storage::{decode_conf_state, encode_conf_state, StoreError, StoreResult};
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
