//! The node driver: owns the `RawNode`, runs the Ready loop in the order raft-rs requires,
//! and reports what the I/O loop around it must do (messages to send, clients to answer).
//!
//! It performs no I/O of its own besides the [`Backend`] writes, so the same code runs in the
//! Postgres worker and in the deterministic simulation.

use std::collections::HashMap;

use raft::eraftpb::{EntryType, Message, MessageType, Snapshot};
use raft::{Config, RawNode, StateRole, Storage as _, INVALID_ID};
use slog::Logger;

mod announce;
mod coalesce;
mod deferred_apply;
mod failover;
mod membership;
mod recovery;
#[cfg(test)]
mod test_cluster;
mod transfer;
mod versions;

pub use membership::MemberChange;
pub use recovery::{quorum_reachable, RecoveryError};
use transfer::{InStream, OutStream};
pub use versions::{MemberVersion, UNTAGGED_FORMAT};

use crate::command::{ApplyResult, Proposal, RequestId};
use crate::snapshot::{SnapFrame, DEFAULT_CHUNK_BYTES};
use crate::state_machine::{self, Planned};
use crate::storage::{Backend, RaftStorage, StoreError, WriteBatch};
use crate::types::{ConfChangeContext, Member, SnapshotData};

/// Raft timing and sizing, in ticks and bytes.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub id: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    pub cache_bytes: usize,
    /// Rows per snapshot chunk, in bytes.
    pub snapshot_chunk_bytes: usize,
    /// A snapshot transfer with no progress for this many ticks has failed.
    pub snapshot_timeout_ticks: u32,
    /// This build's version, as `raft_members()` shows it on every node.
    pub version: String,
}

impl NodeOptions {
    pub fn new(id: u64) -> Self {
        NodeOptions {
            id,
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            cache_bytes: crate::storage::DEFAULT_CACHE_BYTES,
            snapshot_chunk_bytes: DEFAULT_CHUNK_BYTES,
            snapshot_timeout_ticks: 100,
            version: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A committed entry is in a newer format than this build reads: the node stops before
    /// applying it (and anything after it) until it is upgraded.
    #[error(
        "the committed log entry at index {index} is in format version {version}; this build reads up to version {}: \
         upgrade raft_kv on this node",
        crate::codec::FORMAT_VERSION
    )]
    NeedsUpgrade { index: u64, version: u8 },
}

/// Why a proposal was refused before it could reach any log (so it certainly did not happen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader is known")]
    NoLeader,
    #[error("the proposal was dropped (leadership is changing or this node is not a voter)")]
    Dropped,
    /// Some member reads only older log formats (a rolling upgrade is under way).
    #[error("not every member can read this command yet: finish upgrading raft_kv on every node")]
    TooNew,
    /// Whether every member reads this command is not known yet (a new leader has not said).
    #[error("the members' versions are not known yet")]
    FormatUnknown,
}

/// A request proposed on this node that has been applied here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub id: RequestId,
    pub index: u64,
    pub result: ApplyResult,
}

/// Something to send to a peer: a raft message, or a frame of a snapshot transfer.
#[derive(Debug, Clone)]
pub enum Outbound {
    Raft(Message),
    Snap { to: u64, frame: SnapFrame },
}

impl Outbound {
    pub fn to(&self) -> u64 {
        match self {
            Outbound::Raft(m) => m.to,
            Outbound::Snap { to, .. } => *to,
        }
    }
}

/// What the caller must do after [`Node::handle_ready`] (messages go through its `send`).
#[derive(Debug, Default)]
pub struct Output {
    pub completed: Vec<Completion>,
    /// Requests this node appended as leader whose log slot was taken by another entry:
    /// they certainly were not applied.
    pub superseded: Vec<RequestId>,
    /// Set when the role, leader or term changed.
    pub role_changed: bool,
    /// Answers to `read_index` calls: (context, read index). A read with that context may be
    /// served once this node has applied the index.
    pub read_states: Vec<(Vec<u8>, u64)>,
    /// This node installed a snapshot at this index.
    pub snapshot_installed: Option<u64>,
    /// Membership changes proposed here that the leader refused (another was in progress).
    pub refused: Vec<RequestId>,
    /// Committed entries no node can apply, skipped: (index, why).
    pub invalid: Vec<(u64, &'static str)>,
    /// Leases whose applied state changed, in order (`None`: gone).
    pub lease_changes: Vec<(u64, Option<crate::lease::LeaseRow>)>,
    /// A snapshot replaced every lease with these.
    pub leases_installed: Option<Vec<(u64, crate::lease::LeaseRow)>>,
}

/// Messages dropped by admission since last asked: how many, and the latest (sender, type, why).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dropped {
    pub count: u64,
    pub last: Option<(u64, MessageType, crate::admission::Reason)>,
}

/// A member as the status sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub voter: bool,
    /// On the leader: highest index known replicated to this member, and whether it was heard
    /// from recently; `None` elsewhere.
    pub matched: Option<u64>,
    pub recent_active: Option<bool>,
    /// Its format and library version, as far as this node knows.
    pub version: Option<MemberVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    /// The cluster's id, 0 until set.
    pub cluster_id: u128,
    pub role: StateRole,
    /// This node is no longer in the configuration.
    pub removed: bool,
    /// A membership change is proposed but not yet applied here (or the cluster is in a joint
    /// configuration): another change must wait.
    pub change_pending: bool,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    pub members: Vec<MemberStatus>,
}

/// Bootstrap puts every initial member at this index: a snapshot of the empty state with the
/// initial configuration, so a log never starts at index 1 (see the raft-rs notes, §2).
pub const BOOTSTRAP_INDEX: u64 = 1;
const BOOTSTRAP_TERM: u64 = 1;

pub struct Node<B: Backend> {
    raw: RawNode<RaftStorage<B>>,
    /// Leader-side proposals by log index, to detect an entry replaced after a leader change.
    appended: HashMap<u64, RequestId>,
    last_soft: (StateRole, u64, u64),
    /// Member addresses as applied (kept in step with the backend's).
    members: std::collections::BTreeMap<u64, Member>,
    /// Snapshot transfers this leader is sending, by recipient.
    streams: HashMap<u64, OutStream>,
    streams_started: u64,
    /// The snapshot being received into the snapshot store.
    incoming: Option<InStream>,
    /// A snapshot was stepped into raft and awaits its install: the staged rows must stay.
    install_pending: bool,
    /// Messages produced outside a Ready (snapshot frames, the held-back `MsgSnapshot`),
    /// sent at the next `handle_ready`.
    outbox: Vec<Outbound>,
    /// Transfers that failed since last asked: (recipient, snapshot index).
    failed_transfers: Vec<(u64, u64)>,
    chunk_bytes: usize,
    snapshot_timeout_ticks: u32,
    dropped: Dropped,
    step_errors: u64,
    /// The members' format versions (see `versions.rs`).
    versions: versions::Versions,
    /// Ticks led without interruption, and the election timeout in ticks.
    leader_ticks: u32,
    election_ticks: u32,
    /// The leader's commit index its followers have not been told, and the peers still to
    /// be told it (see `announce_or_defer`).
    unannounced: Option<(u64, Vec<u64>)>,
    /// Committed entries this follower has not applied yet, the commit index that came with
    /// them, and whether more may wait (see `deferred_apply.rs`).
    deferred: Vec<raft::eraftpb::Entry>,
    deferred_commit: Option<u64>,
    may_defer: bool,
    deferred_applies: u64,
}

impl<B: Backend> Node<B> {
    /// Opens the node on its durable state. A blank node listed in `bootstrap` (the initial
    /// members and their addresses) first writes the bootstrap snapshot; a blank node not
    /// listed waits to be added by a leader.
    pub fn open(backend: B, opts: &NodeOptions, bootstrap: &[Member], logger: &Logger) -> Result<Self, NodeError> {
        let mut storage = RaftStorage::open(backend, opts.cache_bytes)?;
        let bootstrap_voters: Vec<u64> = bootstrap.iter().map(|m| m.id).collect();
        let blank = storage.last() == 0 && {
            let cs = storage.conf_state();
            cs.voters.is_empty() && cs.learners.is_empty()
        };
        if blank && bootstrap_voters.contains(&opts.id) {
            let mut snap = Snapshot::default();
            let m = snap.mut_metadata();
            m.index = BOOTSTRAP_INDEX;
            m.term = BOOTSTRAP_TERM;
            m.mut_conf_state().voters = bootstrap_voters.clone();
            snap.set_data(SnapshotData { members: bootstrap.to_vec(), ..Default::default() }.encode().into());
            let mut hs = storage.hard_state();
            hs.term = BOOTSTRAP_TERM;
            hs.commit = BOOTSTRAP_INDEX;
            storage.write(&WriteBatch {
                snapshot: Some(snap),
                hard_state: Some(hs),
                applied: Some(BOOTSTRAP_INDEX),
                sync: true,
                ..Default::default()
            })?;
        }
        let cfg = Config {
            id: opts.id,
            election_tick: opts.election_ticks,
            heartbeat_tick: opts.heartbeat_ticks,
            applied: storage.applied(),
            max_size_per_msg: opts.max_size_per_msg,
            max_inflight_msgs: opts.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            max_uncommitted_size: 64 << 20,
            max_committed_size_per_ready: 16 << 20,
            // The commit is announced by `announce_or_defer`, not by raft on every commit.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let members = storage.backend_mut().members()?.into_iter().map(|m| (m.id, m)).collect();
        let raw = RawNode::new(&cfg, storage, logger)?;
        let last_soft = (raw.raft.state, raw.raft.leader_id, raw.raft.term);
        Ok(Node {
            raw,
            appended: HashMap::new(),
            last_soft,
            members,
            streams: HashMap::new(),
            streams_started: 0,
            incoming: None,
            install_pending: false,
            outbox: Vec::new(),
            failed_transfers: Vec::new(),
            chunk_bytes: opts.snapshot_chunk_bytes.max(1),
            snapshot_timeout_ticks: opts.snapshot_timeout_ticks.max(1),
            dropped: Dropped::default(),
            step_errors: 0,
            versions: versions::Versions::new(&opts.version),
            leader_ticks: 0,
            election_ticks: opts.election_ticks as u32,
            unannounced: None,
            deferred: Vec::new(),
            deferred_commit: None,
            may_defer: false,
            deferred_applies: 0,
        })
    }

    /// If more than `threshold` entries follow the snapshot point, moves it to `margin`
    /// entries before the applied index and drops the log before it.
    pub fn maybe_compact(&mut self, threshold: u64, margin: u64) -> Result<bool, NodeError> {
        if !self.streams.is_empty() {
            // Compacting past a snapshot being sent would make it useless on arrival.
            return Ok(false);
        }
        let store = self.raw.store();
        let (snap_index, _) = store.snapshot_meta();
        let applied = store.applied();
        if applied.saturating_sub(snap_index) <= threshold {
            return Ok(false);
        }
        let to = applied.saturating_sub(margin);
        if to <= snap_index {
            return Ok(false);
        }
        let term = raft::Storage::term(store, to)?;
        store.write(&WriteBatch { compact_to: Some((to, term)), ..Default::default() })?;
        if store.frozen_index().is_some_and(|f| f < to) {
            // The frozen copy no longer covers the log: free its space until one is needed.
            store.forget_frozen();
            store.with_backend(|b| b.clear_snapshot_store())?;
        }
        Ok(true)
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    /// Advances raft's clock and the snapshot transfers' timers. Fails only if the backend
    /// cannot be read to send chunks again.
    pub fn tick(&mut self) -> Result<(), NodeError> {
        self.raw.tick();
        self.leader_ticks = if self.is_leader() { self.leader_ticks.saturating_add(1) } else { 0 };
        self.tick_transfers()
    }

    /// Feeds a message from a peer. Messages raft cannot use (stale, from unknown peers) are
    /// ignored, as raft intends. A snapshot message is taken only when its rows have been
    /// staged; otherwise the sender is told the transfer failed.
    pub fn step(&mut self, mut m: Message) {
        let r = &self.raw.raft;
        // raft-rs reads the term of an index outside [first - 1, last] as 0 rather than as
        // unknown: a compacted entry would look like a conflicting one.
        let held = |i: u64| i + 1 >= r.raft_log.first_index() && i <= r.raft_log.last_index();
        let term_at = |i: u64| if held(i) { r.raft_log.term(i).ok() } else { None };
        let view = crate::admission::View {
            id: r.id,
            leader_id: r.leader_id,
            is_leader: r.state == StateRole::Leader,
            committed: r.raft_log.committed,
            last_index: r.raft_log.last_index(),
            term_at: &term_at,
        };
        if let Err(reason) = crate::admission::check(&m, &view) {
            self.dropped.count += 1;
            self.dropped.last = Some((m.from, m.get_msg_type(), reason));
            return;
        }
        if m.term >= self.raw.raft.term {
            self.versions.observe(&m, self.id());
        }
        if m.get_msg_type() == MessageType::MsgSnapshot {
            let md = m.get_snapshot().get_metadata();
            let staged = self
                .incoming
                .as_ref()
                .is_some_and(|s| s.complete && s.from == m.from && (s.index, s.term) == (md.index, md.term));
            if !staged {
                let frame = SnapFrame::Abort {
                    stream: 0,
                    index: md.index,
                    term: md.term,
                    reason: "the snapshot's rows were not received".into(),
                };
                self.outbox.push(Outbound::Snap { to: m.from, frame });
                return;
            }
            self.install_pending = true;
        }
        if m.get_msg_type() == MessageType::MsgPropose && self.is_leader() {
            self.refuse_conf_changes_raft_would_blank(&mut m);
            self.drop_entries_too_new(&mut m);
        }
        // raft refuses what it cannot use (stale or from an unknown peer) with StepPeerNotFound
        // or StepLocalMsg; anything else is a storage failure, which raft-rs itself reports
        // when the next Ready is built, so only count it here.
        if let Err(e) = self.raw.step(m) {
            if !matches!(e, raft::Error::StepPeerNotFound | raft::Error::StepLocalMsg) {
                self.step_errors += 1;
            }
        }
    }

    /// Messages dropped by admission since the last call.
    pub fn take_dropped(&mut self) -> Dropped {
        std::mem::take(&mut self.dropped)
    }

    /// Errors raft returned from `step` (other than refusing an unknown or local message).
    pub fn step_errors(&self) -> u64 {
        self.step_errors
    }

    /// The cluster's id, 0 until the first leader's proposal of one has applied here.
    pub fn cluster_id(&self) -> u128 {
        self.raw.store().cluster_id()
    }

    /// As leader of a cluster with no id yet: proposes `id` (random) as its id.
    pub fn propose_cluster_id(&mut self, rid: RequestId, id: u128) -> Result<(), ProposeError> {
        self.propose(&Proposal { id: rid, cmd: crate::command::Command::ClusterId { id } })
    }

    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The key-value store's revision and history compaction point, as applied here.
    pub fn revisions(&self) -> (u64, u64) {
        self.raw.store().revisions()
    }

    /// As leader: the compaction the history retention asks for, if any. History is kept for
    /// `retention` revisions, compacted in steps of a tenth of that (so not every write
    /// proposes a compaction); 0 keeps all history.
    pub fn history_compaction_due(&self, retention: u64) -> Option<u64> {
        let (revision, compact) = self.revisions();
        let step = (retention / 10).max(1);
        (self.is_leader() && retention > 0 && revision >= compact + retention + step).then(|| revision - retention)
    }

    /// Proposes forgetting history below `revision`, on every node alike.
    pub fn propose_compact(&mut self, rid: RequestId, revision: u64) -> Result<(), ProposeError> {
        self.propose(&Proposal { id: rid, cmd: crate::command::Command::Compact { revision } })
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The newest log format every member reads (see `versions.rs`): a command of a newer
    /// one is not proposed.
    pub fn cluster_format(&self) -> Option<u8> {
        let settled = self.leader_ticks >= 2 * self.election_ticks;
        self.versions.cluster_format(self.id(), self.raw.raft.leader_id, &self.member_ids(), settled)
    }

    /// Every member of the configuration in force, voters and learners, joint halves included.
    fn member_ids(&self) -> Vec<u64> {
        let cs = self.raw.store().conf_state();
        let mut ids: Vec<u64> =
            cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing).chain(&cs.learners_next).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// As leader: forwarded entries in a format some member cannot read become empty entries
    /// (their proposer hears nothing and times out; it checks the format itself first).
    fn drop_entries_too_new(&self, m: &mut Message) {
        let newer = |e: &raft::eraftpb::Entry| e.data.first().is_some_and(|v| *v > UNTAGGED_FORMAT);
        if !m.get_entries().iter().any(newer) {
            return;
        }
        // Unknown while the leadership is young: the proposer checked against the last leader's.
        let Some(cluster) = self.cluster_format() else { return };
        for e in m.mut_entries().iter_mut() {
            if e.get_entry_type() == EntryType::EntryNormal && e.data.first().is_some_and(|v| *v > cluster) {
                e.data = Vec::new().into();
            }
        }
    }

    /// Proposes a command. `Ok` means it was appended (on the leader) or forwarded; the
    /// outcome is then known only when it applies, or is superseded, or the caller times out.
    pub fn propose(&mut self, p: &Proposal) -> Result<(), ProposeError> {
        if self.raw.raft.leader_id == INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        let needed = p.cmd.format_version();
        if needed > UNTAGGED_FORMAT {
            match self.cluster_format() {
                None => return Err(ProposeError::FormatUnknown),
                Some(f) if needed > f => return Err(ProposeError::TooNew),
                Some(_) => {}
            }
        }
        let before = self.raw.raft.raft_log.last_index();
        self.raw.propose(Vec::new(), p.encode()).map_err(|_| ProposeError::Dropped)?;
        if self.is_leader() {
            let idx = self.raw.raft.raft_log.last_index();
            if idx > before {
                self.appended.insert(idx, p.id);
            }
        }
        Ok(())
    }

    /// For the simulation: raft-rs draws election timeouts from a thread-local RNG, so a
    /// deterministic run replaces each fresh draw with its own.
    #[doc(hidden)]
    pub fn election_timer_just_reset(&self) -> bool {
        self.raw.raft.election_elapsed == 0
    }

    #[doc(hidden)]
    pub fn set_election_timeout(&mut self, pick: impl FnOnce(usize, usize) -> usize) {
        // Config leaves min/max at their defaults: [election_tick, 2 * election_tick).
        let lo = self.raw.raft.election_timeout();
        let hi = 2 * lo;
        self.raw.raft.set_randomized_election_timeout(pick(lo, hi));
    }

    /// Asks for a linearizable read point (raft's ReadIndex, safe mode). The answer comes in
    /// `Output::read_states`, or never: raft drops the request silently when no leader is
    /// known or the leader has not yet committed in its term, so callers retry with a fresh
    /// context until a timeout.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Sends what steps queued (snapshot frames, a snapshot message held back for its rows)
    /// without waiting for the next Ready. Raft's own messages are not among them.
    pub fn flush_outbox(&mut self, send: &mut dyn FnMut(Outbound)) {
        self.outbox.drain(..).for_each(send);
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Runs every pending Ready: persist (one backend write per stage), apply, advance.
    /// `send` is called for each message as soon as it may leave, so the leader's appends go
    /// out before its own log write, in parallel with it.
    pub fn handle_ready(&mut self, out: &mut Output, send: &mut dyn FnMut(Outbound)) -> Result<(), NodeError> {
        // Frames and messages from steps first: a held-back snapshot message must precede
        // the appends raft sends after it.
        self.outbox.drain(..).for_each(&mut *send);
        if !self.may_defer || self.is_leader() {
            self.apply_deferred(out)?;
        }
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            // The version tags, made once for every message of this Ready.
            let settled = self.leader_ticks >= 2 * self.election_ticks;
            let tags = self.versions.tags(self.id(), self.raw.raft.leader_id, &self.member_ids(), settled);
            // Leader messages may go out before the write; raft tolerates their loss.
            for m in coalesce::coalesce_appends(rd.take_messages(), self.raw.raft.max_msg_size) {
                self.route(m, &tags, send)?;
            }

            let mut batch = WriteBatch::default();
            if !rd.snapshot().is_empty() {
                let md = rd.snapshot().get_metadata();
                let staged =
                    self.incoming.take().is_some_and(|s| s.complete && (s.index, s.term) == (md.index, md.term));
                if !staged {
                    return Err(StoreError::Corrupt(format!("snapshot {} arrived without its rows", md.index)).into());
                }
                batch.snapshot = Some(rd.snapshot().clone());
                out.snapshot_installed = Some(md.index);
                self.appended.clear();
                let data = SnapshotData::decode(rd.snapshot().get_data())
                    .map_err(|e| StoreError::Corrupt(format!("snapshot data: {e}")))?;
                self.members = data.members.into_iter().map(|m| (m.id, m)).collect();
                out.leases_installed = Some(data.leases);
                out.lease_changes.clear();
            }
            batch.entries = rd.entries().to_vec();
            if let Some(hs) = rd.hs() {
                batch.hard_state = Some(hs.clone());
            }
            batch.sync = rd.must_sync() || !batch.entries.is_empty() || batch.snapshot.is_some();
            let committed = rd.take_committed_entries();
            self.announce_or_defer(&committed, &tags, send)?;
            let committed = self.apply_now(committed, &mut batch);
            // A follower acknowledges new entries before applying older ones: the leader is
            // waiting for the acknowledgement, nobody for the apply.
            let ack_first = !batch.entries.is_empty() && !committed.is_empty() && !self.is_leader();
            let mut then = WriteBatch::default();
            if ack_first && batch.hard_state.as_ref().is_some_and(|hs| self.only_commit_moved(hs)) {
                // Nor does anybody wait for the commit index to be durable (raft re-derives it):
                // it is written with the apply, in that transaction's one state row update.
                then.hard_state = batch.hard_state.take();
            }
            self.write_and_apply(batch, if ack_first { &[] } else { &committed }, out)?;

            // Only now, with the entries and vote durable, may votes and acks leave.
            let mut acks = rd.take_persisted_messages();
            coalesce::drop_superseded_acks(&mut acks);
            for mut m in acks {
                tags.apply(&mut m);
                send(Outbound::Raft(m));
            }
            if ack_first {
                self.write_and_apply(then, &committed, out)?;
            }
            for rs in rd.take_read_states() {
                out.read_states.push((rs.request_ctx, rs.index));
            }
            // What was applied is told below: some committed entries may wait (`apply_now`).
            let mut light = self.raw.advance_append(rd);

            let mut batch = WriteBatch::default();
            if let Some(commit) = light.commit_index() {
                let mut hs = self.raw.store().hard_state();
                hs.commit = commit;
                batch.hard_state = Some(hs);
            }
            for m in light.take_messages() {
                self.route(m, &tags, send)?;
            }
            let committed = light.take_committed_entries();
            self.announce_or_defer(&committed, &tags, send)?;
            let committed = self.apply_now(committed, &mut batch);
            self.write_and_apply(batch, &committed, out)?;
            self.raw.advance_apply_to(self.raw.store().applied());
        }
        self.install_pending = false;
        self.step_down_if_removed();
        self.finish_streams();
        self.outbox.drain(..).for_each(&mut *send);
        let soft = (self.raw.raft.state, self.raw.raft.leader_id, self.raw.raft.term);
        if soft != self.last_soft {
            self.last_soft = soft;
            out.role_changed = true;
            if soft.0 != StateRole::Leader {
                // Entries appended as leader may still commit, but this node can no longer
                // tell that they will not: leave them to the caller's timeout.
                self.appended.clear();
                self.unannounced = None;
            }
        }
        Ok(())
    }

    /// Whether `hs` differs from the stored hard state in its commit index alone.
    fn only_commit_moved(&self, hs: &raft::eraftpb::HardState) -> bool {
        let stored = self.raw.store().hard_state();
        hs.term == stored.term && hs.vote == stored.vote
    }

    /// Sends `m` with its version tag, except a snapshot message, which starts a chunked
    /// transfer instead.
    fn route(
        &mut self,
        mut m: Message,
        tags: &versions::Tags,
        send: &mut dyn FnMut(Outbound),
    ) -> Result<(), NodeError> {
        self.note_commit_sent(&m);
        if m.get_msg_type() == MessageType::MsgSnapshot {
            self.start_stream(m)?;
            self.outbox.drain(..).for_each(&mut *send);
        } else {
            tags.apply(&mut m);
            send(Outbound::Raft(m));
        }
        Ok(())
    }

    /// Plans the committed entries into `batch`, writes it atomically, and reports results.
    fn write_and_apply(
        &mut self,
        mut batch: WriteBatch,
        committed: &[raft::eraftpb::Entry],
        out: &mut Output,
    ) -> Result<(), NodeError> {
        let mut plans = Vec::with_capacity(committed.len());
        let mut changes: Vec<(u64, RequestId, bool)> = Vec::new();
        for e in committed {
            if e.get_entry_type() == EntryType::EntryNormal && e.data.is_empty() && !e.context.is_empty() {
                // A membership change the leader refused (see refuse_conf_changes_raft_would_blank).
                if let Some(ctx) = ConfChangeContext::decode(&e.context) {
                    if ctx.id.node == self.id() {
                        out.refused.push(ctx.id);
                    }
                }
            }
            let plan = state_machine::plan(e, &mut batch.ops);
            if let Planned::NeedsUpgrade { index, version } = plan {
                // Nothing of this batch is written: not the entry, nor anything after it.
                return Err(NodeError::NeedsUpgrade { index, version });
            }
            if let Planned::ClusterId { cluster_id, .. } = plan {
                // The first applied wins; the batch may already hold one.
                if self.raw.store().cluster_id() == 0 && batch.cluster_id.is_none() {
                    batch.cluster_id = Some(cluster_id);
                }
            }
            if plan == Planned::ConfChange {
                let applied = self.apply_conf_change(e, &mut batch.members);
                if let Some(cs) = &applied.0 {
                    batch.conf_state = Some(cs.clone());
                }
                if let Some(id) = applied.1 {
                    changes.push((e.index, id, applied.0.is_some()));
                }
            }
            plans.push((e.index, plan));
        }
        if let Some(last) = committed.last() {
            batch.applied = Some(last.index);
        }
        let (results, leases) = self.raw.store().write(&batch)?;
        out.lease_changes.extend(leases);
        for op in &batch.members {
            op.apply_to(&mut self.members);
        }
        let me = self.id();
        for (index, id, ok) in changes {
            if id.node == me {
                let result = ApplyResult { revision: index, flag: ok, duplicate: false, wrote: false, refused: None };
                out.completed.push(Completion { id, index, result });
            }
            self.appended.remove(&index);
        }
        for (index, plan) in plans {
            let applied_id = match plan {
                Planned::Kv { id, op_index } => {
                    if id.node == me {
                        out.completed.push(Completion { id, index, result: results[op_index] });
                    }
                    Some(id)
                }
                Planned::Invalid { index, reason } => {
                    out.invalid.push((index, reason));
                    None
                }
                Planned::ClusterId { id, .. } => {
                    if id.node == me {
                        let result =
                            ApplyResult { revision: index, flag: true, duplicate: false, wrote: false, refused: None };
                        out.completed.push(Completion { id, index, result });
                    }
                    Some(id)
                }
                _ => None,
            };
            if let Some(expected) = self.appended.remove(&index) {
                if applied_id != Some(expected) {
                    out.superseded.push(expected);
                }
            }
        }
        Ok(())
    }

    pub fn status(&self) -> NodeStatus {
        let r = &self.raw.raft;
        let store = self.raw.store();
        let cs = store.conf_state();
        let is_leader = r.state == StateRole::Leader;
        let mut members = Vec::new();
        for (ids, voter) in [(&cs.voters, true), (&cs.learners, false)] {
            for &id in ids.iter() {
                let pr = if is_leader { r.prs().get(id) } else { None };
                members.push(MemberStatus {
                    id,
                    voter,
                    matched: pr.map(|p| if id == r.id { r.raft_log.last_index() } else { p.matched }),
                    recent_active: pr.map(|p| id == r.id || p.recent_active),
                    version: self.versions.version_of(r.id, id),
                });
            }
        }
        members.sort_by_key(|m| m.id);
        let (snapshot_index, snapshot_term) = store.snapshot_meta();
        let configured = !cs.voters.is_empty() || !cs.learners.is_empty();
        NodeStatus {
            cluster_id: self.cluster_id(),
            id: r.id,
            role: r.state,
            removed: configured && !self.is_member(r.id),
            change_pending: self.change_pending(),
            term: r.term,
            leader_id: r.leader_id,
            commit: r.raft_log.committed,
            applied: store.applied(),
            first_index: store.first_index().unwrap_or(0),
            last_index: store.last(),
            snapshot_index,
            snapshot_term,
            members,
        }
    }

    pub fn storage(&self) -> &RaftStorage<B> {
        self.raw.store()
    }
}

/// The text name of a role, as `raft_status()` shows it.
pub fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::Leader => "leader",
        StateRole::PreCandidate => "pre-candidate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, RequestId};
    use crate::mem_backend::MemBackend;

    /// Found by the simulation (seed 14175): a follower that had compacted its log dropped every
    /// append from a leader probing below it, and stayed behind for good.
    #[test]
    fn a_follower_answers_an_append_that_starts_below_its_compacted_log() {
        let mut t = test_cluster::Three::new();
        for seq in 1..=20 {
            t.put(1, seq);
        }
        let f = t.nodes.get_mut(&3).unwrap();
        assert!(f.maybe_compact(5, 2).unwrap());
        let (first, committed) = (f.raw.raft.raft_log.first_index(), f.raw.raft.raft_log.committed);
        // A probe as a leader that lost track of this follower sends it: from well below the
        // follower's first index, over entries it compacted and committed long ago.
        let l = &t.nodes[&1].raw.raft;
        let from = first - 5;
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        (m.from, m.to, m.term, m.commit) = (1, 3, l.term, l.raft_log.committed);
        (m.index, m.log_term) = (from - 1, l.raft_log.term(from - 1).unwrap());
        m.entries = l.raft_log.entries(from, None, raft::GetEntriesContext::empty(false)).unwrap().into();
        assert!(!m.entries.is_empty());
        let sent_before = t.sent.len();
        t.nodes.get_mut(&3).unwrap().step(m);
        let dropped = t.nodes.get_mut(&3).unwrap().take_dropped();
        assert_eq!(dropped.count, 0, "dropped: {:?}", dropped.last);
        t.settle();
        // raft answers a probe below its commit index with that index, which puts the leader
        // back on track.
        let answer = t.sent[sent_before..]
            .iter()
            .find(|(from, _, m)| *from == 3 && m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject);
        assert!(answer.is_some_and(|(_, _, m)| m.index >= committed), "no acknowledgement from node 3");
    }

    #[test]
    fn a_committed_entry_of_a_newer_format_stops_the_node_before_it() {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let one = Member { id: 1, address: "a".into(), promote: false };
        let backend = MemBackend::new();
        let mut n = Node::open(backend.clone(), &NodeOptions::new(1), &[one], &logger).unwrap();
        let step = |n: &mut Node<MemBackend>| {
            n.tick().unwrap();
            n.handle_ready(&mut Output::default(), &mut |_| {})
        };
        while !n.is_leader() {
            step(&mut n).unwrap();
        }
        let put = |seq, key: &str| Proposal {
            id: RequestId { node: 1, nonce: 1, seq },
            cmd: Command::Put { key: key.into(), value: "v".into() },
        };
        n.propose(&put(1, "before")).unwrap();
        let mut newer = put(2, "newer").encode();
        newer[0] = crate::codec::FORMAT_VERSION + 1;
        n.raw.propose(Vec::new(), newer).unwrap();
        n.propose(&put(3, "after")).unwrap();
        let err = loop {
            if let Err(e) = step(&mut n) {
                break e;
            }
        };
        let NodeError::NeedsUpgrade { index, version } = err else { panic!("{err}") };
        assert_eq!(version, crate::codec::FORMAT_VERSION + 1);
        assert!(err.to_string().contains("upgrade raft_kv"), "{err}");
        // Nothing at or after the entry was applied.
        let kv = backend.kv();
        assert!(!kv.contains_key("after") && !kv.contains_key("newer"));
        assert!(backend.inner.lock().unwrap().state.applied < index);
    }
}
