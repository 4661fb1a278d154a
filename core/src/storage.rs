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
use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::apply::{self, Effects, Lookup, Needs};
use crate::command::ApplyResult;
use crate::snapshot::{Cursor, Frozen, Row};
use crate::types::{Member, MemberOp, OpAt, SnapshotData};

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
    /// The key-value store's revision and history compaction point.
    pub revision: u64,
    pub compact_revision: u64,
}

impl PersistedState {
    /// True for a node that has never been part of a cluster.
    pub fn is_blank(&self) -> bool {
        self.conf_state.voters.is_empty() && self.conf_state.learners.is_empty() && self.last_index == 0
    }
}

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
    /// The stored state of these keys, of every key under these prefixes, of these request
    /// ids (those that exist), and the store's revision and compaction point, for
    /// [`crate::apply::decide`].
    fn lookup(&mut self, needs: &Needs) -> StoreResult<Lookup>;
    /// Writes the batch atomically, with the effects of its ops as [`crate::apply::decide`]
    /// decided them (`batch.ops` themselves are not for the backend to interpret).
    fn write(&mut self, batch: &WriteBatch, effects: &Effects) -> StoreResult<()>;
    /// Runs `f` (a look-up and the write that depends on it) as one unit: the tables run it in
    /// one transaction, which also spares a second commit.
    fn atomically<R>(&mut self, f: &mut dyn FnMut(&mut Self) -> StoreResult<R>) -> StoreResult<R>
    where
        Self: Sized,
    {
        f(self)
    }
    /// Copies the state machine as of one applied index into the snapshot store, replacing
    /// what it held; rows should not pass through this process's memory. A backend may do it
    /// in the background: `None` means a copy is under way (started now or earlier) and the
    /// caller asks again later; a finished copy is returned once.
    fn freeze_snapshot(&mut self) -> StoreResult<Option<Frozen>>;
    /// Rows of the snapshot store after `cursor`, about `max_bytes` of them (at least one row
    /// while any remain), and where to continue.
    fn read_snapshot(&mut self, cursor: &Cursor, max_bytes: usize) -> StoreResult<(Vec<Row>, Cursor)>;
    /// Empties the snapshot store: the frozen copy, and any rows staged (to stage a snapshot
    /// being received, or to free the space of a copy that no longer covers the log).
    fn clear_snapshot_store(&mut self) -> StoreResult<()>;
    /// Adds received rows to the snapshot store. Each row comes once, after the rows staged
    /// before it in the store's order (the node and the backup reader check it), so a plain
    /// insert will do.
    fn stage_snapshot(&mut self, rows: &[Row]) -> StoreResult<()>;
    /// The recorded member addresses.
    fn members(&mut self) -> StoreResult<Vec<Member>>;
    /// Every lease.
    fn leases(&mut self) -> StoreResult<Vec<(u64, crate::lease::LeaseRow)>>;
}

/// What [`apply_and_write`] returns: each op's result, the new revision, the new compaction
/// point, and the leases that changed.
pub type Applied = (Vec<ApplyResult>, Option<u64>, Option<u64>, LeaseChanges);
/// Leases whose state a write changed: the new state, `None` when gone.
pub type LeaseChanges = Vec<(u64, Option<crate::lease::LeaseRow>)>;

/// Bytes of full entries kept in memory; older entries are read from the backend on demand.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

struct Cache {
    hs: HardState,
    cs: ConfState,
    snapshot_index: u64,
    snapshot_term: u64,
    applied: u64,
    cluster_id: u128,
    revision: u64,
    compact_revision: u64,
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
            revision: st.revision,
            compact_revision: st.compact_revision,
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

    /// The backend, for a test that reopens it as after a restart.
    #[cfg(any(test, feature = "test-support"))]
    pub fn into_backend(self) -> B {
        self.backend.into_inner()
    }

    /// Makes `batch` durable, its ops applied, and then updates the cache to match; returns
    /// each op's result and the leases that changed.
    pub fn write(&self, batch: &WriteBatch) -> StoreResult<(Vec<ApplyResult>, LeaseChanges)> {
        if batch.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (results, revision, compact_revision, leases) = apply_and_write(&mut *self.backend.borrow_mut(), batch)?;
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
                c.revision = data.revision;
                c.compact_revision = data.compact_revision;
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
        if let Some(r) = revision {
            c.revision = r;
        }
        if let Some(r) = compact_revision {
            c.compact_revision = r;
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
        Ok((results, leases))
    }

    /// Every lease the store holds.
    pub fn leases(&self) -> StoreResult<Vec<(u64, crate::lease::LeaseRow)>> {
        self.backend.borrow_mut().leases()
    }

    /// The key-value store's revision and history compaction point.
    pub fn revisions(&self) -> (u64, u64) {
        let c = self.cache.borrow();
        (c.revision, c.compact_revision)
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

/// Decides the batch's ops ([`crate::apply`]) on the state the backend holds, and writes the
/// batch with their effects: the one way ops are applied, whatever the backend. Returns each
/// op's result, and the store's new revision and compaction point where they moved.
pub fn apply_and_write<B: Backend>(b: &mut B, batch: &WriteBatch) -> StoreResult<Applied> {
    b.atomically(&mut |b| {
        let (results, effects) = if batch.ops.is_empty() {
            (Vec::new(), Effects::default())
        } else {
            let before = b.lookup(&apply::needs(&batch.ops))?;
            apply::decide(&batch.ops, &before)
        };
        b.write(batch, &effects)?;
        let leases = effects.leases.iter().map(|(k, v)| (*k, *v)).collect();
        Ok((results, effects.revision, effects.compact_revision, leases))
    })
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
            change_rows: f.frozen.change_rows,
            revision: f.frozen.revision,
            compact_revision: f.frozen.compact_revision,
            leases: f.frozen.leases.clone(),
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
