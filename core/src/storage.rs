//! Durable Raft state behind a small trait, and the `raft::Storage` that raft-rs reads.
//!
//! A [`Backend`] only has to do three things: load what it holds, read old log entries, and
//! write one [`WriteBatch`] atomically (log append, hard state, applied entries and the
//! applied index together). Postgres tables implement it in the extension; [`MemBackend`]
//! implements it here for the unit tests and the simulation.
//!
//! [`RaftStorage`] puts an in-memory cache in front of the backend: the term of every live
//! index and a tail of full entries, so that raft's hot reads never reach the backend.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::command::ApplyResult;
use crate::snapshot::{Cursor, Frozen, Row};
use crate::state_machine::{Member, SnapshotData};

/// Failure of the durable store. The node cannot continue past one: the worker restarts and
/// resumes from what was committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("corrupt stored state: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the node needs at start, other than log entries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PersistedState {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Index and term of the last entry covered by the snapshot (0, 0 when none).
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    pub applied: u64,
    /// Index of the last stored log entry, or `snapshot_index` when the log is empty.
    pub last_index: u64,
    /// The cluster's random id, fixed by the first entry that sets it (0: not yet set).
    pub cluster_id: u128,
}

impl PersistedState {
    /// True for a node that has never been part of a cluster.
    pub fn is_blank(&self) -> bool {
        self.conf_state.voters.is_empty() && self.conf_state.learners.is_empty() && self.last_index == 0
    }
}

/// One state-machine operation, decided by `state_machine` and executed by the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Put { key: String, value: String },
    Delete { key: String },
    Cas { key: String, expected: Option<String>, value: String },
}

/// An operation with the request that asked for it and the log index applying it.
///
/// The backend records every applied request id (for [`DEDUP_WINDOW`] entries) in the same
/// transaction: an id seen again is a retry, and is answered with the first result instead of
/// being applied twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpAt {
    pub id: crate::command::RequestId,
    pub index: u64,
    pub op: KvOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberOp {
    Upsert(Member),
    Remove(u64),
}

impl MemberOp {
    /// Applies the change to a map of members by id.
    pub fn apply_to(&self, members: &mut BTreeMap<u64, Member>) {
        match self {
            MemberOp::Upsert(m) => {
                members.insert(m.id, m.clone());
            }
            MemberOp::Remove(id) => {
                members.remove(id);
            }
        }
    }
}

/// How many log entries a request id is remembered for duplicate detection.
pub const DEDUP_WINDOW: u64 = 100_000;
/// Forgetting old request ids happens when the applied index crosses a multiple of this.
pub const DEDUP_PRUNE_EVERY: u64 = 1024;

/// Changes that must become durable together, in this order: snapshot, log, hard state,
/// state-machine operations, applied index and conf state.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Replace all state by this snapshot: its metadata and [`SnapshotData`]; the rows come from
    /// the backend's snapshot store, where they were staged (and are checked against the counts).
    pub snapshot: Option<Snapshot>,
    /// Entries to append; stored entries at or after `entries[0].index` are removed first.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub ops: Vec<OpAt>,
    pub applied: Option<u64>,
    pub conf_state: Option<ConfState>,
    /// Member address changes from applied membership entries.
    pub members: Vec<MemberOp>,
    /// Drop the log up to and including this (index, term); it becomes the new snapshot point.
    pub compact_to: Option<(u64, u64)>,
    /// Record the cluster id (an applied entry set it; a snapshot's is installed with it).
    pub cluster_id: Option<u128>,
    /// Must be durable before the call returns (log entries, snapshot, term or vote). Without
    /// it the backend may commit asynchronously: a crash then loses at most applied state and
    /// commit index, which raft re-derives from the durable log on restart.
    pub sync: bool,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.ops.is_empty()
            && self.applied.is_none()
            && self.conf_state.is_none()
            && self.members.is_empty()
            && self.compact_to.is_none()
            && self.cluster_id.is_none()
    }
}

/// The durable store the node writes to.
pub trait Backend {
    fn load(&mut self) -> StoreResult<PersistedState>;
    /// Entries `[lo, hi)`, all of which must exist.
    fn read_entries(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<Entry>>;
    /// Terms of entries `[lo, hi)`, in order.
    fn read_terms(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<u64>>;
    /// Writes the batch atomically; returns the result of each op, in order.
    fn write(&mut self, batch: &WriteBatch) -> StoreResult<Vec<ApplyResult>>;
    /// Copies the state machine as of one applied index into the snapshot store, replacing
    /// what it held; rows should not pass through this process's memory. A backend may do it
    /// in the background: `None` means a copy is under way (started now or earlier) and the
    /// caller asks again later; a finished copy is returned once.
    fn freeze_snapshot(&mut self) -> StoreResult<Option<Frozen>>;
    /// Rows of the snapshot store after `cursor`, about `max_bytes` of them (at least one row
    /// while any remain), and where to continue.
    fn read_snapshot(&mut self, cursor: &Cursor, max_bytes: usize) -> StoreResult<(Vec<Row>, Cursor)>;
    /// Empties the snapshot store, to stage a snapshot being received.
    fn clear_snapshot_store(&mut self) -> StoreResult<()>;
    /// Adds received rows to the snapshot store.
    fn stage_snapshot(&mut self, rows: &[Row]) -> StoreResult<()>;
    /// The recorded member addresses.
    fn members(&mut self) -> StoreResult<Vec<Member>>;
}

/// Bytes of full entries kept in memory; older entries are read from the backend on demand.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

struct Cache {
    hs: HardState,
    cs: ConfState,
    snapshot_index: u64,
    snapshot_term: u64,
    applied: u64,
    cluster_id: u128,
    /// `terms[i]` is the term of index `snapshot_index + 1 + i`.
    terms: VecDeque<u64>,
    /// Contiguous entries ending at the last index.
    tail: VecDeque<Entry>,
    tail_bytes: usize,
    max_tail_bytes: usize,
}

impl Cache {
    fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }
    fn last_index(&self) -> u64 {
        self.snapshot_index + self.terms.len() as u64
    }
    fn tail_first(&self) -> u64 {
        self.last_index() + 1 - self.tail.len() as u64
    }

    fn truncate_from(&mut self, index: u64) {
        let first = self.tail_first();
        let keep = index.saturating_sub(self.first_index()) as usize;
        self.terms.truncate(keep);
        if index <= first {
            self.tail.clear();
            self.tail_bytes = 0;
        } else {
            let keep = (index - first) as usize;
            while self.tail.len() > keep {
                let e = self.tail.pop_back().unwrap();
                self.tail_bytes -= entry_bytes(&e);
            }
        }
    }

    fn append(&mut self, entries: &[Entry]) {
        for e in entries {
            self.terms.push_back(e.term);
            self.tail_bytes += entry_bytes(e);
            self.tail.push_back(e.clone());
        }
        // Keep at least the unapplied entries, whatever they weigh: they are about to be used.
        while self.tail_bytes > self.max_tail_bytes && self.tail_first() <= self.applied {
            let e = self.tail.pop_front().unwrap();
            self.tail_bytes -= entry_bytes(&e);
        }
    }
}

fn entry_bytes(e: &Entry) -> usize {
    e.data.len() + e.context.len() + 32
}

/// The snapshot the backend's store holds, frozen on this node for sending.
#[derive(Debug, Clone)]
struct FrozenSnap {
    frozen: Frozen,
    term: u64,
}

/// `raft::Storage` over a [`Backend`], with the cache described in the module docs.
pub struct RaftStorage<B: Backend> {
    backend: RefCell<B>,
    cache: RefCell<Cache>,
    frozen: RefCell<Option<FrozenSnap>>,
    /// A stream is reading the frozen snapshot: it must not be replaced.
    streaming: Cell<bool>,
}

impl<B: Backend> RaftStorage<B> {
    pub fn open(mut backend: B, max_tail_bytes: usize) -> StoreResult<Self> {
        let st = backend.load()?;
        if st.last_index < st.snapshot_index {
            return Err(StoreError::Corrupt(format!(
                "last index {} is below the snapshot index {}",
                st.last_index, st.snapshot_index
            )));
        }
        let first = st.snapshot_index + 1;
        let terms: VecDeque<u64> = backend.read_terms(first, st.last_index + 1)?.into();
        if terms.len() as u64 != st.last_index + 1 - first {
            return Err(StoreError::Corrupt(format!(
                "log should hold entries {first}..={} but holds {}",
                st.last_index,
                terms.len()
            )));
        }
        let mut cache = Cache {
            hs: st.hard_state.clone(),
            cs: st.conf_state.clone(),
            snapshot_index: st.snapshot_index,
            snapshot_term: st.snapshot_term,
            applied: st.applied,
            cluster_id: st.cluster_id,
            terms,
            tail: VecDeque::new(),
            tail_bytes: 0,
            max_tail_bytes,
        };
        // Load the unapplied entries (needed at once) plus a little history.
        let tail_lo = st.applied.saturating_sub(64).max(first);
        if tail_lo <= st.last_index {
            let entries = backend.read_entries(tail_lo, st.last_index + 1)?;
            cache.tail = entries.into();
            cache.tail_bytes = cache.tail.iter().map(entry_bytes).sum();
        }
        Ok(RaftStorage {
            backend: RefCell::new(backend),
            cache: RefCell::new(cache),
            frozen: RefCell::new(None),
            streaming: Cell::new(false),
        })
    }

    /// Makes `batch` durable and then updates the cache to match.
    pub fn write(&self, batch: &WriteBatch) -> StoreResult<Vec<ApplyResult>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let results = self.backend.borrow_mut().write(batch)?;
        let mut c = self.cache.borrow_mut();
        if let Some(snap) = &batch.snapshot {
            let m = snap.get_metadata();
            c.snapshot_index = m.index;
            c.snapshot_term = m.term;
            c.cs = m.get_conf_state().clone();
            c.terms.clear();
            c.tail.clear();
            c.tail_bytes = 0;
            c.applied = m.index;
            if c.hs.commit < m.index {
                c.hs.commit = m.index;
            }
            if let Ok(data) = SnapshotData::decode(snap.get_data()) {
                if data.cluster_id != 0 {
                    c.cluster_id = data.cluster_id;
                }
            }
        }
        if let Some(first) = batch.entries.first() {
            c.truncate_from(first.index);
            c.append(&batch.entries);
        }
        if let Some(hs) = &batch.hard_state {
            c.hs = hs.clone();
        }
        if let Some(id) = batch.cluster_id {
            c.cluster_id = id;
        }
        if let Some(a) = batch.applied {
            c.applied = a;
        }
        if let Some(cs) = &batch.conf_state {
            c.cs = cs.clone();
        }
        if let Some((index, term)) = batch.compact_to {
            if index > c.snapshot_index && index <= c.last_index() {
                let drop = (index - c.snapshot_index) as usize;
                c.terms.drain(..drop);
                while c.tail.front().is_some_and(|e| e.index <= index) {
                    let e = c.tail.pop_front().unwrap();
                    c.tail_bytes -= entry_bytes(&e);
                }
                c.snapshot_index = index;
                c.snapshot_term = term;
            }
        }
        Ok(results)
    }

    pub fn hard_state(&self) -> HardState {
        self.cache.borrow().hs.clone()
    }
    pub fn conf_state(&self) -> ConfState {
        self.cache.borrow().cs.clone()
    }
    pub fn applied(&self) -> u64 {
        self.cache.borrow().applied
    }
    pub fn cluster_id(&self) -> u128 {
        self.cache.borrow().cluster_id
    }
    pub fn first(&self) -> u64 {
        self.cache.borrow().first_index()
    }
    pub fn last(&self) -> u64 {
        self.cache.borrow().last_index()
    }
    pub fn snapshot_meta(&self) -> (u64, u64) {
        let c = self.cache.borrow();
        (c.snapshot_index, c.snapshot_term)
    }
    pub fn backend_mut(&mut self) -> &mut B {
        self.backend.get_mut()
    }

    /// The backend, for the snapshot streams (reads and staging happen between Readies).
    pub(crate) fn with_backend<R>(&self, f: impl FnOnce(&mut B) -> R) -> R {
        f(&mut self.backend.borrow_mut())
    }

    /// While set, the frozen snapshot is being read and is not replaced.
    pub(crate) fn set_streaming(&self, on: bool) {
        self.streaming.set(on);
    }

    /// The snapshot store is about to be reused for staging: what it held is gone.
    pub(crate) fn forget_frozen(&self) {
        self.frozen.borrow_mut().take();
    }

    /// Index of the frozen snapshot, if one is held.
    pub fn frozen_index(&self) -> Option<u64> {
        self.frozen.borrow().as_ref().map(|f| f.frozen.index)
    }

    /// Whether an entry after the applied index changes the membership. Looks only at the
    /// unapplied entries (always cached), not the whole cached history.
    pub fn unapplied_conf_change(&self) -> bool {
        let c = self.cache.borrow();
        let start = ((c.applied + 1).saturating_sub(c.tail_first()) as usize).min(c.tail.len());
        c.tail.range(start..).any(|e| e.get_entry_type() != raft::eraftpb::EntryType::EntryNormal)
    }
}

fn store_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl<B: Backend> raft::Storage for RaftStorage<B> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.cache.borrow();
        Ok(RaftState { hard_state: c.hs.clone(), conf_state: c.cs.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let c = self.cache.borrow();
        if low < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last_index() + 1 {
            panic!("entries [{low}, {high}) requested beyond last index {}", c.last_index());
        }
        let tail_first = c.tail_first();
        let mut out = Vec::new();
        if low < tail_first {
            let cold_hi = high.min(tail_first);
            let mut cold = self.backend.borrow_mut().read_entries(low, cold_hi).map_err(store_err)?;
            out.append(&mut cold);
        }
        let from = low.max(tail_first);
        if from < high {
            let s = (from - tail_first) as usize;
            let e = (high - tail_first) as usize;
            out.extend(c.tail.range(s..e).cloned());
        }
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.cache.borrow();
        if idx == c.snapshot_index {
            return Ok(c.snapshot_term);
        }
        if idx < c.snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > c.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(c.terms[(idx - c.first_index()) as usize])
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.cache.borrow().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.cache.borrow().last_index())
    }

    /// The frozen snapshot, frozen anew at the applied index when there is none that covers
    /// the compacted log and includes the recipient (raft-rs rejects a snapshot whose conf
    /// state lacks it). The data is metadata only; the rows are streamed separately.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable);
        let floor = {
            let c = self.cache.borrow();
            request_index.max(c.snapshot_index).max(1)
        };
        let usable = |f: &FrozenSnap| {
            let cs = &f.frozen.conf_state;
            f.frozen.index >= floor
                && (cs.voters.contains(&to) || cs.learners.contains(&to) || cs.learners_next.contains(&to))
        };
        let mut frozen = self.frozen.borrow_mut();
        // A stale copy is replaced; a copy that finishes stale starts another at once.
        for _ in 0..2 {
            if frozen.as_ref().is_some_and(usable) || self.streaming.get() {
                break;
            }
            // The backend rewrites its snapshot store: the copy it held is no longer there.
            *frozen = None;
            let Some(f) = self.backend.borrow_mut().freeze_snapshot().map_err(store_err)? else {
                return Err(unavailable());
            };
            // The copy's index is at or after the snapshot point when it started; the log may
            // have been compacted past it since, and then its term is gone: not usable.
            *frozen = match self.term(f.index) {
                Ok(term) => Some(FrozenSnap { frozen: f, term }),
                Err(_) => None,
            };
        }
        let f = frozen.as_ref().filter(|f| usable(f)).ok_or_else(unavailable)?;
        let data = SnapshotData {
            members: f.frozen.members.clone(),
            kv_rows: f.frozen.kv_rows,
            request_rows: f.frozen.request_rows,
            cluster_id: self.cluster_id(),
        };
        let mut snap = Snapshot::default();
        snap.set_data(data.encode().into());
        let m = snap.mut_metadata();
        m.index = f.frozen.index;
        m.term = f.term;
        m.set_conf_state(f.frozen.conf_state.clone());
        Ok(snap)
    }
}

/// Serialises a ConfState for storage.
pub fn encode_conf_state(cs: &ConfState) -> Vec<u8> {
    cs.write_to_bytes().expect("encoding a ConfState cannot fail")
}

pub fn decode_conf_state(b: &[u8]) -> StoreResult<ConfState> {
    let mut cs = ConfState::default();
    cs.merge_from_bytes(b).map_err(|e| StoreError::Corrupt(format!("conf state: {e}")))?;
    Ok(cs)
}

/// The durable state of [`MemBackend`], shared so a test can "crash" a node (drop it) and
/// restart it on what was persisted.
#[derive(Debug, Default, Clone)]
pub struct MemState {
    pub state: PersistedState,
    pub log: BTreeMap<u64, Entry>,
    pub kv: BTreeMap<String, (String, u64)>,
    /// Applied request ids (nonce, seq) → (node, revision, flag).
    pub requests: BTreeMap<(u64, u64), (u64, u64, bool)>,
    pub members: BTreeMap<u64, Member>,
    /// The snapshot store: a frozen copy to send, or rows being received.
    pub snap_kv: BTreeMap<String, (String, u64)>,
    pub snap_requests: BTreeMap<(u64, u64), (u64, u64, bool)>,
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
    pub fn kv(&self) -> BTreeMap<String, (String, u64)> {
        self.inner.lock().unwrap().kv.clone()
    }
}

impl Backend for MemBackend {
    fn load(&mut self) -> StoreResult<PersistedState> {
        Ok(self.inner.lock().unwrap().state.clone())
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

    fn write(&mut self, b: &WriteBatch) -> StoreResult<Vec<ApplyResult>> {
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
            if (s.snap_kv.len() as u64, s.snap_requests.len() as u64) != (data.kv_rows, data.request_rows) {
                return Err(StoreError::Corrupt(format!(
                    "snapshot {} needs {} rows and {} request ids, {} and {} are staged",
                    m.index,
                    data.kv_rows,
                    data.request_rows,
                    s.snap_kv.len(),
                    s.snap_requests.len()
                )));
            }
            s.kv = std::mem::take(&mut s.snap_kv);
            s.requests = std::mem::take(&mut s.snap_requests);
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
        let mut out = Vec::with_capacity(b.ops.len());
        for o in &b.ops {
            let rid = (o.id.nonce, o.id.seq);
            if let Some(&(_, revision, flag)) = s.requests.get(&rid) {
                out.push(ApplyResult { revision, flag, duplicate: true });
                continue;
            }
            let flag = match &o.op {
                KvOp::Put { key, value } => {
                    s.kv.insert(key.clone(), (value.clone(), o.index));
                    true
                }
                KvOp::Delete { key } => s.kv.remove(key).is_some(),
                KvOp::Cas { key, expected, value } => {
                    let current = s.kv.get(key).map(|(v, _)| v);
                    let matches = current == expected.as_ref();
                    if matches {
                        s.kv.insert(key.clone(), (value.clone(), o.index));
                    }
                    matches
                }
            };
            s.requests.insert(rid, (o.id.node, o.index, flag));
            out.push(ApplyResult { revision: o.index, flag, duplicate: false });
        }
        if let Some(a) = b.applied {
            if let Some(cut) = crate::state_machine::dedup_prune_below(s.state.applied, a) {
                s.requests.retain(|_, (_, rev, _)| *rev >= cut);
            }
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
        Ok(out)
    }

    fn freeze_snapshot(&mut self) -> StoreResult<Option<Frozen>> {
        let mut s = self.inner.lock().unwrap();
        s.snap_kv = s.kv.clone();
        s.snap_requests = s.requests.clone();
        Ok(Some(Frozen {
            index: s.state.applied,
            kv_rows: s.snap_kv.len() as u64,
            request_rows: s.snap_requests.len() as u64,
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
                for (k, (v, r)) in s.snap_kv.range((lo, Unbounded)) {
                    if full(bytes, &rows) {
                        let last = k_last(&rows);
                        return Ok((rows, Cursor::Kv(Some(last))));
                    }
                    let row = Row::Kv { key: k.clone(), value: v.clone(), revision: *r };
                    bytes += row.bytes();
                    rows.push(row);
                }
                Ok((rows, Cursor::Requests(None)))
            }
            Cursor::Requests(after) => {
                let lo = after.map_or(Unbounded, Excluded);
                for (&(nonce, seq), &(node, revision, flag)) in s.snap_requests.range((lo, Unbounded)) {
                    if full(bytes, &rows) {
                        let Some(&Row::Request { nonce, seq, .. }) = rows.last() else { unreachable!() };
                        return Ok((rows, Cursor::Requests(Some((nonce, seq)))));
                    }
                    let row = Row::Request { nonce, seq, node, revision, flag };
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
        Ok(())
    }

    fn stage_snapshot(&mut self, rows: &[Row]) -> StoreResult<()> {
        let mut s = self.inner.lock().unwrap();
        for r in rows {
            match r.clone() {
                Row::Kv { key, value, revision } => {
                    s.snap_kv.insert(key, (value, revision));
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
}

fn k_last(rows: &[Row]) -> String {
    match rows.last() {
        Some(Row::Kv { key, .. }) => key.clone(),
        _ => String::new(),
    }
}

#[doc(hidden)]
pub mod contract {
    //! The `raft::Storage` contract and state-machine replay, written once and run against
    //! any backend (the in-memory one here, the table-backed one in the extension's tests).
    use super::*;
    use raft::Storage;

    pub fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = vec![index as u8; 10].into();
        e
    }

    /// Puts the backend at snapshot (3, 3) with entries 4..=6 (terms 3, 4, 5) and checks
    /// every Storage method, through the cache and through cold reads.
    pub fn check<B: Backend>(mut backend: B, max_tail_bytes: usize) {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 3;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.set_data(SnapshotData::default().encode().into());
        let mut hs = HardState::default();
        hs.term = 5;
        hs.vote = 2;
        hs.commit = 5;
        backend
            .write(&WriteBatch {
                snapshot: Some(snap),
                entries: vec![entry(4, 3), entry(5, 4), entry(6, 5)],
                hard_state: Some(hs.clone()),
                applied: Some(4),
                cluster_id: Some(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
                ..Default::default()
            })
            .unwrap();

        let s = RaftStorage::open(backend, max_tail_bytes).unwrap();
        assert_eq!(s.cluster_id(), 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, "the cluster id is durable");
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state, hs);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.first_index().unwrap(), 4);
        assert_eq!(s.last_index().unwrap(), 6);
        assert_eq!(s.term(3).unwrap(), 3);
        assert_eq!(s.term(5).unwrap(), 4);
        assert!(matches!(s.term(2), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(s.term(7), Err(raft::Error::Store(StorageError::Unavailable))));
        let ctx = GetEntriesContext::empty(false);
        assert!(matches!(s.entries(3, 5, None, ctx), Err(raft::Error::Store(StorageError::Compacted))));
        let ctx = || GetEntriesContext::empty(false);
        let all = s.entries(4, 7, None, ctx()).unwrap();
        assert_eq!(all.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(4, 3), (5, 4), (6, 5)]);
        assert_eq!(all[1].data.as_ref(), &[5u8; 10]);
        // A size limit still returns at least one entry.
        assert_eq!(s.entries(4, 7, Some(1), ctx()).unwrap().len(), 1);
        assert_eq!(s.entries(5, 6, None, ctx()).unwrap().len(), 1);

        // A conflicting append truncates the suffix, in the cache and durably.
        s.write(&WriteBatch { entries: vec![entry(5, 6), entry(6, 6), entry(7, 6)], ..Default::default() }).unwrap();
        assert_eq!(s.last_index().unwrap(), 7);
        assert_eq!(s.term(5).unwrap(), 6);
        assert_eq!(s.term(4).unwrap(), 3);
        let got: Vec<_> = s.entries(4, 8, None, ctx()).unwrap().iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(4, 3), (5, 6), (6, 6), (7, 6)]);
        let mut backend = s.backend.into_inner();
        let reopened = backend.load().unwrap();
        assert_eq!(reopened.last_index, 7);
        assert_eq!(reopened.applied, 4);
        assert_eq!(reopened.hard_state, hs);
        assert_eq!(reopened.snapshot_index, 3);
        assert_eq!(reopened.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(backend.read_terms(4, 8).unwrap(), vec![3, 6, 6, 6]);
    }

    /// Freezes the state machine, waiting for a backend that does it in the background.
    pub fn freeze_now<B: Backend>(b: &mut B) -> Frozen {
        for _ in 0..3000 {
            if let Some(f) = b.freeze_snapshot().unwrap() {
                return f;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the snapshot store was not frozen within 30 s");
    }

    /// Freezes an applied state, reads it back in small chunks, stages it again after the
    /// state moved on, installs it, and checks the install refuses a wrong row count.
    pub fn check_snapshot_store<B: Backend>(mut b: B) {
        let log = sample_log(40);
        apply_log(&mut b, &log, 40);
        let frozen = freeze_now(&mut b);
        assert_eq!(frozen.index, 40);
        // Later writes do not change the frozen copy.
        let mut more = sample_log(50);
        for e in more.iter_mut() {
            e.index += 40;
        }
        apply_log(&mut b, &more[..10], 10);
        let read_all = |b: &mut B, max_bytes| {
            let mut rows = Vec::new();
            let mut cursor = Cursor::start();
            let mut chunks = 0;
            while cursor != Cursor::Done {
                let (mut r, next) = b.read_snapshot(&cursor, max_bytes).unwrap();
                rows.append(&mut r);
                cursor = next;
                chunks += 1;
            }
            (rows, chunks)
        };
        let (rows, chunks) = read_all(&mut b, 50);
        assert!(chunks > 3, "50-byte chunks must split the snapshot ({chunks} reads)");
        let kv_rows = rows.iter().filter(|r| matches!(r, Row::Kv { .. })).count() as u64;
        let request_rows = rows.len() as u64 - kv_rows;
        assert_eq!((kv_rows, request_rows), (frozen.kv_rows, frozen.request_rows));
        let mut replay = MemBackend::new();
        apply_log(&mut replay, &log, 40);
        let want_kv: Vec<Row> =
            replay.kv().into_iter().map(|(key, (value, revision))| Row::Kv { key, value, revision }).collect();
        assert_eq!(rows[..kv_rows as usize].to_vec(), want_kv, "kv rows in key order, as of index 40");
        assert_eq!(request_rows, replay.inner.lock().unwrap().requests.len() as u64);

        // Stage the rows (in two parts, one repeated) and install them over the newer state.
        b.clear_snapshot_store().unwrap();
        let (a, z) = rows.split_at(rows.len() / 2);
        b.stage_snapshot(a).unwrap();
        b.stage_snapshot(a).unwrap();
        b.stage_snapshot(z).unwrap();
        let snapshot = |kv_rows, request_rows| {
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 40;
            snap.mut_metadata().term = 2;
            snap.mut_metadata().mut_conf_state().voters = vec![1];
            snap.set_data(SnapshotData { members: Vec::new(), kv_rows, request_rows, cluster_id: 0 }.encode().into());
            snap
        };
        let wrong =
            WriteBatch { snapshot: Some(snapshot(kv_rows + 1, request_rows)), sync: true, ..Default::default() };
        assert!(b.write(&wrong).is_err(), "a row count that does not match the staged rows is refused");
        let right = WriteBatch { snapshot: Some(snapshot(kv_rows, request_rows)), sync: true, ..Default::default() };
        b.write(&right).unwrap();
        let st = b.load().unwrap();
        assert_eq!((st.snapshot_index, st.applied, st.last_index), (40, 40, 40));
        // What was installed is exactly what was frozen.
        let again = freeze_now(&mut b);
        assert_eq!((again.index, again.kv_rows, again.request_rows), (40, kv_rows, request_rows));
        assert_eq!(again.conf_state.voters, vec![1]);
        assert_eq!(read_all(&mut b, 1 << 20).0, rows);
        // The installed state behaves like the replayed one: a retried request is a duplicate.
        let again = apply_log(&mut b, &log[..1], 1);
        assert!(again[0].duplicate);
    }

    /// A log of puts and deletes over a few keys, with no-op entries mixed in.
    pub fn sample_log(n: u64) -> Vec<Entry> {
        use crate::command::{Command, Proposal, RequestId};
        (1..=n)
            .map(|i| {
                let mut e = Entry::default();
                e.index = i;
                e.term = 1;
                let cmd = match i % 7 {
                    0 => None,
                    3 | 5 => Some(Command::Delete { key: format!("k{}", i % 5) }),
                    _ => Some(Command::Put { key: format!("k{}", i % 5), value: format!("v{i}") }),
                };
                if let Some(cmd) = cmd {
                    e.data = Proposal { id: RequestId { node: 1, nonce: 1, seq: i }, cmd }.encode().into();
                }
                e
            })
            .collect()
    }

    /// Applies `entries` in batches of `chunk`, as the node would, returning every result.
    pub fn apply_log<B: Backend>(b: &mut B, entries: &[Entry], chunk: usize) -> Vec<ApplyResult> {
        let mut results = Vec::new();
        for part in entries.chunks(chunk) {
            let mut ops = Vec::new();
            for e in part {
                crate::state_machine::plan(e, &mut ops);
            }
            let applied = part.last().map(|e| e.index);
            results.extend(b.write(&WriteBatch { ops, applied, ..Default::default() }).unwrap());
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
