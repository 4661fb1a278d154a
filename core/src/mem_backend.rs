//! The in-memory [`Backend`], for unit tests and the simulation (behind the `test-support`
//! feature: the extension never ships it), with bugs the simulation can inject.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use raft::eraftpb::Entry;

use crate::apply::{Effects, Lookup, Needs};
use crate::lease::LeaseRow;
use crate::snapshot::{Cursor, Frozen, Row};
use crate::storage::{Backend, PersistedState, StoreError, StoreResult, WriteBatch};
use crate::types::{Change, KvRow, Member, SnapshotData};

/// A node's key-value state with leases, as the simulation compares it.
pub type StateView = (BTreeMap<String, (String, u64, u64)>, BTreeMap<u64, LeaseRow>);

/// The durable state of [`MemBackend`], shared so a test can "crash" a node (drop it) and
/// restart it on what was persisted.
#[derive(Debug, Default, Clone)]
pub struct MemState {
    pub state: PersistedState,
    pub log: BTreeMap<u64, Entry>,
    pub kv: BTreeMap<String, KvRow>,
    /// Applied request ids (nonce, seq) → (node, revision, flag).
    pub requests: BTreeMap<(u64, u64), (u64, u64, bool)>,
    pub members: BTreeMap<u64, Member>,
    /// The history by (revision, key), kept from `compact_revision` on.
    pub changes: BTreeMap<(u64, String), Change>,
    pub revision: u64,
    pub compact_revision: u64,
    pub leases: BTreeMap<u64, LeaseRow>,
    /// The snapshot store: a frozen copy to send, or rows being received.
    pub snap_kv: BTreeMap<String, KvRow>,
    pub snap_requests: BTreeMap<(u64, u64), (u64, u64, bool)>,
    pub snap_changes: BTreeMap<(u64, String), Change>,
    /// The frozen copy's revision and compaction point.
    pub snap_revisions: (u64, u64),
    pub snap_leases: Vec<(u64, LeaseRow)>,
}

/// Bugs the simulation can inject into [`MemBackend`] to show it would catch them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InjectedBug {
    #[default]
    None,
    /// Never persist the hard state (term, vote, commit).
    SkipHardState,
    /// Persist the hard state without the vote.
    ForgetVote,
}

/// In-memory [`Backend`]; every `write` is atomic and durable (for the process's lifetime).
#[derive(Debug, Clone, Default)]
pub struct MemBackend {
    pub inner: Arc<Mutex<MemState>>,
    /// Test hook: a deliberately injected durability bug the simulation must catch.
    pub bug: InjectedBug,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }
    /// Each key's value, mod revision and lease, and every lease: what nodes must agree on.
    pub fn kv_with_leases(&self) -> StateView {
        let s = self.inner.lock().unwrap();
        let kv = s.kv.iter().map(|(k, r)| (k.clone(), (r.value.clone(), r.mod_revision, r.lease))).collect();
        (kv, s.leases.clone())
    }
    /// Each key's value and mod revision.
    pub fn kv(&self) -> BTreeMap<String, (String, u64)> {
        self.inner.lock().unwrap().kv.iter().map(|(k, r)| (k.clone(), (r.value.clone(), r.mod_revision))).collect()
    }
}

impl Backend for MemBackend {
    fn load(&mut self) -> StoreResult<PersistedState> {
        let s = self.inner.lock().unwrap();
        Ok(PersistedState { revision: s.revision, compact_revision: s.compact_revision, ..s.state.clone() })
    }

    fn read_entries(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<Entry>> {
        let s = self.inner.lock().unwrap();
        let v: Vec<Entry> = s.log.range(lo..hi).map(|(_, e)| e.clone()).collect();
        if v.len() as u64 != hi - lo {
            return Err(StoreError::Backend(format!("entries {lo}..{hi} missing")));
        }
        Ok(v)
    }

    fn read_terms(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<u64>> {
        Ok(self.read_entries(lo, hi)?.iter().map(|e| e.term).collect())
    }

    fn lookup(&mut self, needs: &Needs) -> StoreResult<Lookup> {
        let s = self.inner.lock().unwrap();
        let mut kv: std::collections::HashMap<String, KvRow> =
            needs.keys.iter().filter_map(|k| Some((k.clone(), s.kv.get(k)?.clone()))).collect();
        for p in &needs.prefixes {
            kv.extend(
                s.kv.range(p.clone()..)
                    .take_while(|(k, _)| k.starts_with(p.as_str()))
                    .map(|(k, r)| (k.clone(), r.clone())),
            );
        }
        let attached = |lease: u64| s.kv.iter().filter(move |(_, r)| r.lease == lease).map(|(k, _)| k.clone());
        let mut lease_keys = std::collections::HashMap::new();
        for &l in &needs.lease_keys {
            let keys: Vec<String> = attached(l).collect();
            kv.extend(keys.iter().map(|k| (k.clone(), s.kv[k].clone())));
            lease_keys.insert(l, keys);
        }
        Ok(Lookup {
            kv,
            requests: needs.ids.iter().filter_map(|id| Some((*id, *s.requests.get(id)?))).collect(),
            revision: s.revision,
            compact_revision: s.compact_revision,
            leases: needs
                .leases
                .iter()
                .filter_map(|l| Some((*l, (*s.leases.get(l)?, attached(*l).count() as u64))))
                .collect(),
            lease_count: s.leases.len() as u64,
            lease_keys,
        })
    }

    fn write(&mut self, b: &WriteBatch, fx: &Effects) -> StoreResult<()> {
        let mut s = self.inner.lock().unwrap();
        if let Some(snap) = &b.snapshot {
            let m = snap.get_metadata();
            s.log.clear();
            s.state.snapshot_index = m.index;
            s.state.snapshot_term = m.term;
            s.state.conf_state = m.get_conf_state().clone();
            s.state.applied = m.index;
            s.state.last_index = m.index;
            s.state.hard_state.commit = s.state.hard_state.commit.max(m.index);
            let data = SnapshotData::decode(snap.get_data()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let staged = (s.snap_kv.len() as u64, s.snap_requests.len() as u64, s.snap_changes.len() as u64);
            if staged != (data.kv_rows, data.request_rows, data.change_rows) {
                return Err(StoreError::Corrupt(format!(
                    "snapshot {} needs {} rows, {} request ids and {} changes, {staged:?} are staged",
                    m.index, data.kv_rows, data.request_rows, data.change_rows
                )));
            }
            s.kv = std::mem::take(&mut s.snap_kv);
            s.requests = std::mem::take(&mut s.snap_requests);
            s.changes = std::mem::take(&mut s.snap_changes);
            s.revision = data.revision;
            s.compact_revision = data.compact_revision;
            s.leases = data.leases.iter().copied().collect();
            s.members = data.members.into_iter().map(|m| (m.id, m)).collect();
            if data.cluster_id != 0 {
                s.state.cluster_id = data.cluster_id;
            }
        }
        if let Some(first) = b.entries.first() {
            let _ = s.log.split_off(&first.index);
            for e in &b.entries {
                s.log.insert(e.index, e.clone());
            }
            s.state.last_index = b.entries.last().unwrap().index;
        }
        if let Some(hs) = &b.hard_state {
            match self.bug {
                InjectedBug::None => s.state.hard_state = hs.clone(),
                InjectedBug::SkipHardState => {}
                InjectedBug::ForgetVote => {
                    s.state.hard_state = hs.clone();
                    s.state.hard_state.vote = 0;
                }
            }
        }
        for (key, now) in &fx.kv {
            match now {
                Some(v) => s.kv.insert(key.clone(), v.clone()),
                None => s.kv.remove(key),
            };
        }
        for (id, now) in &fx.leases {
            match now {
                Some(l) => s.leases.insert(*id, *l),
                None => s.leases.remove(id),
            };
        }
        s.requests.extend(fx.requests.iter().map(|(k, v)| (*k, *v)));
        if let Some(cut) = fx.prune_requests_below {
            s.requests.retain(|_, (_, rev, _)| *rev >= cut);
        }
        for c in &fx.changes {
            s.changes.insert((c.revision, c.key.clone()), c.clone());
        }
        if let Some(r) = fx.revision {
            s.revision = r;
        }
        if let Some(cut) = fx.compact_revision {
            s.compact_revision = cut;
            s.changes = s.changes.split_off(&(cut, String::new()));
        }
        if let Some(a) = b.applied {
            s.state.applied = a;
        }
        if let Some(cs) = &b.conf_state {
            s.state.conf_state = cs.clone();
        }
        if let Some(id) = b.cluster_id {
            s.state.cluster_id = id;
        }
        for op in &b.members {
            op.apply_to(&mut s.members);
        }
        if let Some((index, term)) = b.compact_to {
            if index > s.state.snapshot_index {
                s.log = s.log.split_off(&(index + 1));
                s.state.snapshot_index = index;
                s.state.snapshot_term = term;
            }
        }
        Ok(())
    }

    fn freeze_snapshot(&mut self) -> StoreResult<Option<Frozen>> {
        let mut s = self.inner.lock().unwrap();
        s.snap_kv = s.kv.clone();
        s.snap_requests = s.requests.clone();
        s.snap_changes = s.changes.clone();
        s.snap_revisions = (s.revision, s.compact_revision);
        s.snap_leases = s.leases.iter().map(|(k, v)| (*k, *v)).collect();
        Ok(Some(Frozen {
            leases: s.snap_leases.clone(),
            index: s.state.applied,
            kv_rows: s.snap_kv.len() as u64,
            request_rows: s.snap_requests.len() as u64,
            change_rows: s.snap_changes.len() as u64,
            revision: s.revision,
            compact_revision: s.compact_revision,
            conf_state: s.state.conf_state.clone(),
            members: s.members.values().cloned().collect(),
        }))
    }

    fn read_snapshot(&mut self, cursor: &Cursor, max_bytes: usize) -> StoreResult<(Vec<Row>, Cursor)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let s = self.inner.lock().unwrap();
        let mut rows = Vec::new();
        let mut bytes = 0;
        let full = |bytes: usize, rows: &Vec<Row>| !rows.is_empty() && bytes >= max_bytes;
        match cursor {
            Cursor::Kv(after) => {
                let lo = after.as_ref().map_or(Unbounded, |k| Excluded(k.clone()));
                for (k, r) in s.snap_kv.range((lo, Unbounded)) {
                    if full(bytes, &rows) {
                        let last = k_last(&rows);
                        return Ok((rows, Cursor::Kv(Some(last))));
                    }
                    let row = Row::Kv { key: k.clone(), row: r.clone() };
                    bytes += row.bytes();
                    rows.push(row);
                }
                Ok((rows, Cursor::Requests(None)))
            }
            Cursor::Requests(after) => {
                // In the PostgreSQL store's order: bigints, which are signed.
                let signed = |(n, s): (u64, u64)| (n as i64, s as i64);
                let mut ids: Vec<_> =
                    s.snap_requests.iter().filter(|(k, _)| after.is_none_or(|a| signed(**k) > signed(a))).collect();
                ids.sort_by_key(|(k, _)| signed(**k));
                for (&(nonce, seq), &(node, revision, flag)) in ids {
                    if full(bytes, &rows) {
                        let Some(&Row::Request { nonce, seq, .. }) = rows.last() else { unreachable!() };
                        return Ok((rows, Cursor::Requests(Some((nonce, seq)))));
                    }
                    let row = Row::Request { nonce, seq, node, revision, flag };
                    bytes += row.bytes();
                    rows.push(row);
                }
                Ok((rows, Cursor::Changes(None)))
            }
            Cursor::Changes(after) => {
                let lo = after.clone().map_or(Unbounded, Excluded);
                for (at, c) in s.snap_changes.range((lo, Unbounded)) {
                    if full(bytes, &rows) {
                        let Some(Row::Change(last)) = rows.last() else { unreachable!() };
                        let next = Cursor::Changes(Some((last.revision, last.key.clone())));
                        return Ok((rows, next));
                    }
                    let _ = at;
                    let row = Row::Change(c.clone());
                    bytes += row.bytes();
                    rows.push(row);
                }
                Ok((rows, Cursor::Done))
            }
            Cursor::Done => Ok((rows, Cursor::Done)),
        }
    }

    fn clear_snapshot_store(&mut self) -> StoreResult<()> {
        let mut s = self.inner.lock().unwrap();
        s.snap_kv.clear();
        s.snap_requests.clear();
        s.snap_changes.clear();
        Ok(())
    }

    fn stage_snapshot(&mut self, rows: &[Row]) -> StoreResult<()> {
        let mut s = self.inner.lock().unwrap();
        for r in rows {
            match r.clone() {
                Row::Kv { key, row } => {
                    s.snap_kv.insert(key, row);
                }
                Row::Change(c) => {
                    s.snap_changes.insert((c.revision, c.key.clone()), c);
                }
                Row::Request { nonce, seq, node, revision, flag } => {
                    s.snap_requests.insert((nonce, seq), (node, revision, flag));
                }
            }
        }
        Ok(())
    }

    fn members(&mut self) -> StoreResult<Vec<Member>> {
        Ok(self.inner.lock().unwrap().members.values().cloned().collect())
    }

    fn leases(&mut self) -> StoreResult<Vec<(u64, LeaseRow)>> {
        Ok(self.inner.lock().unwrap().leases.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

fn k_last(rows: &[Row]) -> String {
    match rows.last() {
        Some(Row::Kv { key, .. }) => key.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;
    use crate::storage::DEFAULT_CACHE_BYTES;

    #[test]
    fn the_sample_log_covers_every_outcome() {
        use crate::command::{Command, Proposal};
        let log = contract::sample_log(60);
        let res = contract::apply_log(&mut MemBackend::new(), &log, 7);
        let cas: Vec<bool> = log
            .iter()
            .filter_map(|e| Proposal::decode(&e.data).ok())
            .zip(&res)
            .filter(|(p, r)| matches!(p.cmd, Command::Cas { .. }) && !r.duplicate)
            .map(|(_, r)| r.flag)
            .collect();
        assert!(cas.contains(&true) && cas.contains(&false), "CAS both succeeding and failing: {cas:?}");
        assert!(res.iter().any(|r| r.duplicate), "a duplicate request id");
        let outcomes = |f: fn(&Command) -> bool| -> Vec<bool> {
            log.iter()
                .filter_map(|e| Proposal::decode(&e.data).ok())
                .zip(&res)
                .filter(|(p, r)| f(&p.cmd) && !r.duplicate)
                .map(|(_, r)| r.flag)
                .collect()
        };
        let txn = outcomes(|c| matches!(c, Command::Txn(_)));
        assert!(txn.contains(&true) && txn.contains(&false), "transactions taking both branches: {txn:?}");
        assert!(outcomes(|c| matches!(c, Command::Compact { .. })).contains(&true), "a compaction");
        use crate::lease::Refusal;
        let refusals = |f: fn(&Command) -> bool| -> Vec<Option<Refusal>> {
            log.iter()
                .filter_map(|e| Proposal::decode(&e.data).ok())
                .zip(&res)
                .filter(|(p, r)| f(&p.cmd) && !r.duplicate)
                .map(|(_, r)| r.refused)
                .collect()
        };
        let puts = refusals(|c| matches!(c, Command::PutLease { .. }));
        assert!(puts.contains(&None) && puts.contains(&Some(Refusal::LeaseNotFound)), "lease puts: {puts:?}");
        let grants = refusals(|c| matches!(c, Command::LeaseGrant { .. }));
        assert!(grants.contains(&None), "lease grants: {grants:?}");
        let expiries = outcomes(|c| matches!(c, Command::LeaseExpire { .. }));
        assert!(expiries.contains(&true) && expiries.contains(&false), "current and stale expiries: {expiries:?}");
        let revokes = refusals(|c| matches!(c, Command::LeaseRevoke { .. }));
        assert!(revokes.contains(&None), "lease revokes: {revokes:?}");
        let txn_refused = refusals(|c| matches!(c, Command::Txn(_)));
        assert!(txn_refused.contains(&None), "transactions: {txn_refused:?}");
        assert!(res.iter().any(|r| !r.flag && !r.duplicate), "a delete of an absent key, or a failed CAS");
    }

    #[test]
    fn mem_backend_meets_the_storage_contract() {
        contract::check(MemBackend::new(), DEFAULT_CACHE_BYTES);
    }

    #[test]
    fn mem_backend_snapshot_store() {
        contract::check_snapshot_store(MemBackend::new());
    }

    #[test]
    fn cold_reads_below_a_tiny_cache() {
        // With a cache of one byte only unapplied entries stay cached; entry 4 is read cold.
        contract::check(MemBackend::new(), 1);
    }
}
