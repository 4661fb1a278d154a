//! Shared memory between backends and the worker: the worker's published status, and the
//! request slots through which backends hand writes to the worker.
//!
//! One LWLock guards it all; nobody holds it across a wait. Only plain-old-data lives here
//! (no pointers), since every process maps it at its own address.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

/// One request slot per server process (indexed by PGPROC number): a backend makes one call
/// at a time, so no session, and no role, can take another's.
pub const NSLOTS: usize = 512;
/// Key, value and expected-value bytes carried inside a slot; larger requests travel in a DSM segment.
pub const INLINE_BYTES: usize = 2048;
pub const MAX_MEMBERS: usize = raft_kv_core::config::MAX_MEMBERS;
pub const MAX_LEASES: usize = raft_kv_core::lease::MAX_LEASES as usize;

/// A bounded UTF-8 string stored inline.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct FixedStr<const N: usize> {
    len: u32,
    buf: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    pub fn set(&mut self, s: &str) {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        self.len = n as u32;
    }
    pub fn get(&self) -> String {
        String::from_utf8_lossy(&self.buf[..self.len as usize]).into_owned()
    }
}

/// Cumulative counters since the worker started (`raft_stat()`, view `raft_kv.stat`).
#[repr(C)]
#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
pub struct Stats {
    /// Times this node became a (pre-)candidate, and a leader.
    pub elections_started: u64,
    pub elections_won: u64,
    /// Times the leader this node knows changed to another node.
    pub leader_changes: u64,
    /// Writes and membership requests taken from backends, and those of them taken while
    /// another node led (forwarded).
    pub proposals: u64,
    pub forwarded: u64,
    /// Log entries applied.
    pub applied_entries: u64,
    /// Times a follower applied committed entries it had held back while nothing on it waited
    /// (see `core/src/node/deferred_apply.rs`).
    pub deferred_applies: u64,
    pub read_index_requests: u64,
    pub read_index_failures: u64,
    pub snapshots_sent: u64,
    pub snapshots_received: u64,
    pub snapshots_failed: u64,
    pub snapshot_bytes_sent: u64,
    pub snapshot_bytes_received: u64,
    /// Peer messages dropped by admission (malformed), and messages to peers that could not
    /// be sent.
    pub dropped_inbound: u64,
    pub dropped_outbound: u64,
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct MemberRow {
    pub id: u64,
    pub addr: FixedStr<64>,
    pub voter: bool,
    /// Leader only: progress fields are meaningful.
    pub has_progress: bool,
    pub matched: u64,
    pub active: bool,
    /// When a message from this peer last arrived (`mono_ms`; 0: never), and whether a
    /// connection to it is up.
    pub last_contact_ms: u64,
    pub connected: bool,
    /// Its log format and library version as this node knows them (format 0: not known).
    pub format: u8,
    pub version: FixedStr<16>,
}

/// What the worker publishes for `raft_status()` and `raft_members()`.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct Status {
    pub worker_pid: i32,
    /// The snapshot freeze worker's pid while one runs (see `freeze.rs`), else 0.
    pub freeze_pid: i32,
    /// PGPROC number to signal the worker's latch, -1 when no worker is running.
    pub worker_procno: i32,
    /// Incremented at each worker start, so waiters notice a restart.
    pub epoch: u64,
    /// True once the Raft node runs and accepts requests.
    pub running: bool,
    pub state: FixedStr<512>,
    pub node_id: u64,
    /// The cluster's id (0 until the first leader has set it).
    pub cluster_id: u128,
    pub listen_addr: FixedStr<64>,
    pub peers: FixedStr<1200>,
    pub role: FixedStr<16>,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    /// A membership change is under way: another one must wait.
    pub change_pending: bool,
    /// The key-value store's revision and history compaction point, as applied here.
    pub revision: u64,
    pub compact_revision: u64,
    pub n_members: u32,
    pub members: [MemberRow; MAX_MEMBERS],
    pub stats: Stats,
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum SlotState {
    Free = 0,
    /// Filled by a backend, not yet seen by the worker.
    Submitted = 1,
    /// The worker holds the request.
    Taken = 2,
    /// The worker wrote the outcome.
    Done = 3,
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Op {
    Set = 1,
    Delete = 2,
    Cas = 3,
    /// A linearizable read: the worker answers with a read index it has applied.
    Read = 4,
    /// Membership: `target` is the node id; for Join the key holds its address.
    Join = 5,
    Remove = 6,
    Transfer = 7,
    /// A transaction: the value holds it as JSON (see `raft_kv_core::txn`).
    Txn = 8,
    /// History compaction: the value holds the revision.
    Compact = 9,
    /// Leases: `target` is the lease id; a grant's TTL (ms) is in `arg`.
    LeaseGrant = 10,
    LeaseKeepAlive = 11,
    LeaseRevoke = 12,
    /// Disaster recovery: install the backup staged in `raft_kv.restore`; make this node a
    /// one-node cluster.
    Restore = 13,
    ForceNewCluster = 14,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        [
            Op::Set,
            Op::Delete,
            Op::Cas,
            Op::Read,
            Op::Join,
            Op::Remove,
            Op::Transfer,
            Op::Txn,
            Op::Compact,
            Op::LeaseGrant,
            Op::LeaseKeepAlive,
            Op::LeaseRevoke,
            Op::Restore,
            Op::ForceNewCluster,
        ]
        .into_iter()
        .find(|o| *o as u8 == v)
    }
}

/// How a request ended, as the worker reports it.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Outcome {
    Ok = 1,
    /// Certainly not applied (never reached a log, or its log slot went to another entry).
    NotCommitted = 2,
    /// May or may not commit later.
    Unknown = 3,
    /// A linearizable read could not be served.
    ReadFailed = 4,
    /// Not allowed in the node's present state; nothing changed.
    Refused = 5,
    /// The input (a backup) is damaged; nothing changed.
    Invalid = 6,
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct Slot {
    pub state: u8,
    /// The backend gave up (cancel, error); the worker frees the slot when it is done.
    pub abandoned: bool,
    pub gen: u64,
    pub epoch: u64,
    pub procno: i32,
    pub op: u8,
    pub timeout_ms: u32,
    pub key_len: u32,
    pub val_len: u32,
    /// Cas only: the expected value follows key and value; absent means "key must not exist".
    pub has_expected: bool,
    pub exp_len: u32,
    /// A client-chosen request id follows the expected value; 0 bytes when none.
    pub rid_len: u32,
    /// Membership requests: the node concerned, and for Join whether it stays a learner.
    /// Lease requests and leased puts (Set): the lease (0: none).
    pub target: u64,
    /// Lease grants: the TTL in milliseconds.
    pub arg: u64,
    pub as_learner: bool,
    /// DSM handle holding key and value when they do not fit inline; 0 when inline.
    pub dsm: u32,
    pub data: [u8; INLINE_BYTES],
    pub outcome: u8,
    pub revision: i64,
    pub flag: bool,
    /// Whether the request's entry changed something: 0 unknown, 1 no, 2 yes.
    pub wrote: u8,
    /// Why the state machine refused the request: a `Refusal` code, 0 for none.
    pub refused: u8,
    pub message: FixedStr<256>,
}

#[repr(C)]
#[derive(Copy, Clone)]
pub struct Shared {
    pub status: Status,
    pub next_gen: u64,
    /// One bit per slot the worker must look at (submitted, or abandoned while taken), so its
    /// pass reads a few words instead of every slot's cache lines under the exclusive lock.
    pub attention: [u64; NSLOTS / 64],
    pub slots: [Slot; NSLOTS],
    /// Broadcast by the worker whenever the revision moves: `raft_watch` sleeps on it.
    pub watch: pg_sys::ConditionVariable,
    /// Each lease's deadline as this node's worker tracks it (see [`mono_ms`]), by lease id.
    pub n_leases: u32,
    pub leases: [(u64, u64); MAX_LEASES],
}

impl Shared {
    /// Flags slot `idx` for the worker's next pass.
    pub fn flag(&mut self, idx: usize) {
        self.attention[idx / 64] |= 1 << (idx % 64);
    }

    /// Takes the flagged slots' indexes, clearing the flags.
    pub fn take_flagged(&mut self) -> impl Iterator<Item = usize> {
        let words = std::mem::replace(&mut self.attention, [0; NSLOTS / 64]);
        words.into_iter().enumerate().flat_map(|(w, mut bits)| {
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let i = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    w * 64 + i
                })
            })
        })
    }
}

impl Default for Shared {
    fn default() -> Self {
        // SAFETY: every field is plain data for which all-zero bytes are a valid value.
        let mut s: Shared = unsafe { std::mem::zeroed() };
        s.status.worker_procno = -1;
        s.status.state.set("not started");
        s.next_gen = 1;
        // What ConditionVariableInit does, on the value that is copied into shared memory:
        // an unlocked spinlock (0) and an empty wait list (INVALID_PGPROCNO at both ends).
        s.watch.wakeup.head = i32::MAX;
        s.watch.wakeup.tail = i32::MAX;
        s
    }
}

// SAFETY: `Shared` is `repr(C)`, `Copy`, and contains no pointers.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: a named LWLock-guarded segment, initialised once in _PG_init (pg_shmem_init!).
pub static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"raft_kv_shared") };

/// Set in `_PG_init` when loaded through `shared_preload_libraries`; inherited by every
/// backend the postmaster forks. Without it the shared memory above does not exist.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pgrx::pg_shmem_init!(SHARED);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// The condition variable watchers sleep on. It lives in the shared segment, whose address
/// never changes; the variable has its own spinlock, so it is used without the LWLock.
pub fn watch_cv() -> *mut pg_sys::ConditionVariable {
    let mut sh = SHARED.exclusive();
    &mut sh.watch as *mut pg_sys::ConditionVariable
}

/// Publishes the revision and wakes every watcher.
pub fn publish_revision(revision: u64, compact_revision: u64) {
    let cv = {
        let mut sh = SHARED.exclusive();
        sh.status.revision = revision;
        sh.status.compact_revision = compact_revision;
        &mut sh.watch as *mut pg_sys::ConditionVariable
    };
    // SAFETY: the condition variable is in shared memory, initialised (see Default); the
    // worker has a PGPROC.
    unsafe { pg_sys::ConditionVariableBroadcast(cv) };
}

/// Milliseconds of CLOCK_MONOTONIC: the same clock in every process of this host, and one that
/// wall-clock changes do not move, so lease deadlines are published in it.
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Publishes every lease's deadline (sorted by id).
pub fn publish_leases(deadlines: &[(u64, u64)]) {
    let mut sh = SHARED.exclusive();
    let n = deadlines.len().min(MAX_LEASES);
    sh.leases[..n].copy_from_slice(&deadlines[..n]);
    sh.n_leases = n as u32;
}

/// Milliseconds left of lease `id`'s TTL as this node's worker sees it, if it knows the lease.
pub fn lease_remaining_ms(id: u64) -> Option<u64> {
    let sh = SHARED.share();
    let leases = &sh.leases[..sh.n_leases as usize];
    let i = leases.binary_search_by_key(&id, |l| l.0).ok()?;
    Some(leases[i].1.saturating_sub(mono_ms()))
}

/// The revision and compaction point this node last published.
pub fn revisions() -> (u64, u64) {
    let sh = SHARED.share();
    (sh.status.revision, sh.status.compact_revision)
}

/// Sets the latch of the process with this PGPROC number.
pub fn wake_proc(procno: i32) {
    if procno >= 0 {
        // SAFETY: procno is a PGPROC number a live process published; setting its latch is
        // harmless even if that process has since exited.
        unsafe { pg_sys::ProcSendSignal(procno) };
    }
}

pub fn my_procno() -> i32 {
    // SAFETY: MyProc is set for every backend and worker before any raft_kv code runs.
    unsafe { (*pg_sys::MyProc).pgprocno }
}

/// Publishes whether the worker accepts requests, and its state line for raft_status().
pub fn set_state(running: bool, state: &str) {
    let mut sh = SHARED.exclusive();
    sh.status.running = running;
    sh.status.state.set(state);
}
