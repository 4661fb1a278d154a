//! The node driver: owns the `RawNode`, runs the Ready loop in the order raft-rs requires,
//! and reports what the I/O loop around it must do (messages to send, clients to answer).
//!
//! It performs no I/O of its own besides the [`Backend`] writes, so the same code runs in the
//! Postgres worker and in the deterministic simulation.

use std::collections::HashMap;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, EntryType, Message, MessageType, Snapshot,
};
use raft::{Config, ProgressState, RawNode, SnapshotStatus, StateRole, Storage as _, INVALID_ID};
use slog::Logger;

use crate::command::{ApplyResult, Proposal, RequestId};
use crate::snapshot::{Cursor, SnapFrame, DEFAULT_CHUNK_BYTES, WINDOW};
use crate::state_machine::{self, ConfChangeContext, Member, Planned, SnapshotData};
use crate::storage::{Backend, MemberOp, RaftStorage, StoreError, WriteBatch};

/// A membership change a client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// Add a learner; with `promote`, the leader makes it a voter once it has caught up.
    AddLearner {
        id: u64,
        address: String,
        promote: bool,
    },
    /// Make caught-up learners voters. Several at once change several voters, which raft
    /// does through a joint configuration (left automatically once applied).
    Promote {
        ids: Vec<u64>,
    },
    Remove {
        id: u64,
    },
}

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// Why a proposal was refused before it could reach any log (so it certainly did not happen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader is known")]
    NoLeader,
    #[error("the proposal was dropped (leadership is changing or this node is not a voter)")]
    Dropped,
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

/// A snapshot this leader is streaming to one follower.
#[derive(Debug)]
struct OutStream {
    stream: u64,
    index: u64,
    term: u64,
    /// raft's `MsgSnapshot`, held back until every chunk is acknowledged.
    msg: Option<Message>,
    cursor: Cursor,
    /// Where each sent, unacknowledged chunk started (front: chunk `acked`), to send again.
    starts: std::collections::VecDeque<Cursor>,
    next_seq: u32,
    acked: u32,
    sent_last: bool,
    /// Ticks since the transfer last made progress; it fails past the timeout.
    idle_ticks: u32,
    /// Rows the snapshot holds (kv and request ids), announced in every chunk.
    rows_total: u64,
}

/// Ticks without an acknowledgement after which unacknowledged chunks are sent again.
const RESEND_TICKS: u32 = 5;

/// A snapshot being staged from a leader.
#[derive(Debug)]
struct InStream {
    from: u64,
    stream: u64,
    index: u64,
    term: u64,
    next_seq: u32,
    complete: bool,
    /// Rows the transfer announced, and rows staged so far.
    rows_total: u64,
    staged: u64,
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
        })
    }

    /// Member addresses as applied on this node.
    pub fn members(&self) -> &std::collections::BTreeMap<u64, Member> {
        &self.members
    }

    /// Whether `id` is a voter or learner in the applied configuration.
    pub fn is_member(&self, id: u64) -> bool {
        let cs = self.raw.store().conf_state();
        cs.voters.contains(&id) || cs.learners.contains(&id) || cs.voters_outgoing.contains(&id)
    }

    /// Proposes a membership change (forwarded to the leader by raft when this node follows).
    pub fn propose_change(&mut self, id: RequestId, change: &MemberChange) -> Result<(), ProposeError> {
        if self.raw.raft.leader_id == INVALID_ID {
            return Err(ProposeError::NoLeader);
        }
        let (nodes, kind, address, promote) = match change {
            MemberChange::AddLearner { id, address, promote } => {
                (vec![*id], ConfChangeType::AddLearnerNode, Some(address.clone()), *promote)
            }
            MemberChange::Promote { ids } => (ids.clone(), ConfChangeType::AddNode, None, false),
            MemberChange::Remove { id } => (vec![*id], ConfChangeType::RemoveNode, None, false),
        };
        let singles = nodes.into_iter().map(|node| {
            let mut single = ConfChangeSingle::default();
            single.node_id = node;
            single.set_change_type(kind);
            single
        });
        // One change is a simple one; more use joint consensus, with raft-rs proposing the
        // leave of the joint configuration by itself once it applies (transition Auto).
        let mut cc = ConfChangeV2::default();
        cc.set_changes(singles.collect::<Vec<_>>().into());
        let ctx = ConfChangeContext { id, address, promote }.encode();
        let before = self.raw.raft.raft_log.last_index();
        self.raw.propose_conf_change(ctx, cc).map_err(|_| ProposeError::Dropped)?;
        if self.is_leader() {
            let idx = self.raw.raft.raft_log.last_index();
            if idx > before {
                self.appended.insert(idx, id);
            }
        }
        Ok(())
    }

    /// Asks the leader to hand leadership to `target` (forwarded when this node follows).
    pub fn transfer_leader(&mut self, target: u64) {
        self.raw.transfer_leader(target);
    }

    /// On the leader: learners marked for promotion whose log is within `lag` entries of ours.
    pub fn learners_to_promote(&self, lag: u64) -> Vec<u64> {
        if !self.is_leader() || self.change_pending() {
            return Vec::new();
        }
        let last = self.raw.raft.raft_log.last_index();
        let cs = self.raw.store().conf_state();
        cs.learners
            .iter()
            .copied()
            .filter(|id| self.members.get(id).is_some_and(|m| m.promote))
            .filter(|id| {
                // Caught up: it has acknowledged entries (a new learner's match is 0 until its
                // snapshot or first append is acknowledged), recently, within `lag` entries.
                self.raw
                    .raft
                    .prs()
                    .get(*id)
                    .is_some_and(|p| p.recent_active && p.matched > 0 && p.matched + lag >= last)
            })
            .collect()
    }

    fn change_pending(&self) -> bool {
        let cs = self.raw.store().conf_state();
        !cs.voters_outgoing.is_empty()
            || self.raw.store().unapplied_conf_change()
            || (self.is_leader() && self.raw.raft.has_pending_conf())
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
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        for (&to, s) in self.streams.iter_mut() {
            s.idle_ticks += 1;
            if s.idle_ticks > self.snapshot_timeout_ticks {
                failed.push(to);
            } else if s.idle_ticks % RESEND_TICKS == 0 && s.acked < s.next_seq {
                // A chunk or its acknowledgement was lost: go back to the first unacknowledged.
                s.cursor = s.starts.front().cloned().unwrap_or_else(|| s.cursor.clone());
                s.starts.clear();
                s.next_seq = s.acked;
                s.sent_last = false;
                resend.push(to);
            }
        }
        for to in failed {
            self.end_stream(to, true);
        }
        for to in resend {
            self.pump(to)?;
        }
        Ok(())
    }

    /// Feeds a message from a peer. Messages raft cannot use (stale, from unknown peers) are
    /// ignored, as raft intends. A snapshot message is taken only when its rows have been
    /// staged; otherwise the sender is told the transfer failed.
    pub fn step(&mut self, mut m: Message) {
        let r = &self.raw.raft;
        let term_at = |i| r.raft_log.term(i).ok();
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

    /// raft-rs turns a membership change it cannot take now (another is pending, or the
    /// joint state does not fit) into an empty entry, context and all, so a follower that
    /// forwarded it would only ever time out. Under the same conditions, keep the context
    /// (the request id) in a normal entry instead: when it applies, the proposer learns
    /// that its change was refused and nothing changed.
    fn refuse_conf_changes_raft_would_blank(&self, m: &mut Message) {
        let mut pending = self.raw.raft.has_pending_conf();
        let joint = !self.raw.store().conf_state().voters_outgoing.is_empty();
        for e in m.mut_entries().iter_mut() {
            let leave = match e.get_entry_type() {
                EntryType::EntryNormal => continue,
                EntryType::EntryConfChange => false,
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    if cc.merge_from_bytes(&e.data).is_err() {
                        continue;
                    }
                    cc.changes.is_empty()
                }
            };
            if pending || joint != leave {
                e.set_entry_type(EntryType::EntryNormal);
                e.data = Default::default();
            } else {
                pending = true;
            }
        }
    }

    /// Handles a frame of a snapshot transfer from `from`.
    pub fn receive_snap(&mut self, from: u64, frame: SnapFrame) -> Result<(), NodeError> {
        match frame {
            SnapFrame::Chunk { stream, index, term, seq, rows, last, rows_total } => {
                let reply = |node: &mut Self, frame| node.outbox.push(Outbound::Snap { to: from, frame });
                if self.is_leader() {
                    let reason = "a leader takes no snapshot".to_string();
                    reply(self, SnapFrame::Abort { stream, index, term, reason });
                    return Ok(());
                }
                let valid = |r: &crate::snapshot::Row| match r {
                    crate::snapshot::Row::Kv { key, value, .. } => {
                        crate::command::check_key(key).is_ok() && crate::command::check_value(value).is_ok()
                    }
                    crate::snapshot::Row::Request { .. } => true,
                };
                if !rows.iter().all(valid) {
                    let reason = "the chunk holds rows no node can store".to_string();
                    reply(self, SnapFrame::Abort { stream, index, term, reason });
                    return Ok(());
                }
                let same = |s: &InStream| (s.from, s.stream, s.index, s.term) == (from, stream, index, term);
                if !self.incoming.as_ref().is_some_and(same) {
                    // Only the leader this node follows starts a transfer.
                    if seq != 0 || self.install_pending || from != self.raw.raft.leader_id {
                        // Part of a transfer this node is not (or no longer) staging: the
                        // leader's wait for acknowledgements times out and it starts over.
                        return Ok(());
                    }
                    self.raw.store().forget_frozen();
                    self.raw.store().with_backend(|b| b.clear_snapshot_store())?;
                    let (next_seq, complete, staged) = (0, false, 0);
                    self.incoming = Some(InStream { from, stream, index, term, next_seq, complete, rows_total, staged });
                }
                let inc = self.incoming.as_mut().expect("set above");
                if seq < inc.next_seq {
                    reply(self, SnapFrame::Ack { stream, index, term, seq });
                } else if seq == inc.next_seq && !inc.complete {
                    // Never stage more than the transfer announced at its start.
                    if inc.staged + rows.len() as u64 > inc.rows_total || rows_total != inc.rows_total {
                        self.incoming = None;
                        self.raw.store().with_backend(|b| b.clear_snapshot_store())?;
                        let reason = "the transfer sent more rows than it announced".to_string();
                        reply(self, SnapFrame::Abort { stream, index, term, reason });
                        return Ok(());
                    }
                    inc.staged += rows.len() as u64;
                    inc.next_seq += 1;
                    inc.complete = last;
                    self.raw.store().with_backend(|b| b.stage_snapshot(&rows))?;
                    reply(self, SnapFrame::Ack { stream, index, term, seq });
                }
                Ok(())
            }
            SnapFrame::Ack { stream, seq, .. } => {
                let Some(s) = self.streams.get_mut(&from).filter(|s| s.stream == stream) else {
                    return Ok(());
                };
                if seq < s.acked || seq >= s.next_seq {
                    return Ok(());
                }
                while s.acked <= seq {
                    s.acked += 1;
                    s.starts.pop_front();
                }
                s.idle_ticks = 0;
                self.pump(from)
            }
            SnapFrame::Abort { index, term, .. } => {
                if self.streams.get(&from).is_some_and(|s| (s.index, s.term) == (index, term)) {
                    self.end_stream(from, true);
                }
                Ok(())
            }
        }
    }

    /// The transport could not take a frame or message for `to`: a transfer to it failed.
    pub fn send_failed(&mut self, to: u64) {
        if self.streams.contains_key(&to) {
            self.end_stream(to, true);
        }
    }

    /// Snapshot transfers in progress from this node, as (recipient, snapshot index).
    pub fn snapshot_transfers(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = self.streams.iter().map(|(to, s)| (*to, s.index)).collect();
        v.sort();
        v
    }

    fn start_stream(&mut self, m: Message) -> Result<(), NodeError> {
        let to = m.to;
        let md = m.get_snapshot().get_metadata();
        self.streams_started += 1;
        let stream = (self.raw.raft.term << 32) | (self.streams_started & 0xffff_ffff);
        let rows_total =
            SnapshotData::decode(m.get_snapshot().get_data()).map(|d| d.kv_rows + d.request_rows).unwrap_or(0);
        let s = OutStream {
            stream,
            index: md.index,
            term: md.term,
            rows_total,
            msg: Some(m),
            cursor: Cursor::start(),
            starts: Default::default(),
            next_seq: 0,
            acked: 0,
            sent_last: false,
            idle_ticks: 0,
        };
        self.streams.insert(to, s);
        self.raw.store().set_streaming(true);
        self.pump(to)
    }

    /// Sends chunks to `to` while the window allows; after the last is acknowledged, the
    /// snapshot message itself. The stream then waits until raft sees the follower caught up.
    fn pump(&mut self, to: u64) -> Result<(), NodeError> {
        loop {
            let Some(s) = self.streams.get_mut(&to) else { return Ok(()) };
            if s.sent_last {
                if s.acked == s.next_seq {
                    if let Some(m) = s.msg.take() {
                        s.idle_ticks = 0;
                        self.outbox.push(Outbound::Raft(m));
                    }
                }
                return Ok(());
            }
            if s.next_seq - s.acked >= WINDOW {
                return Ok(());
            }
            s.starts.push_back(s.cursor.clone());
            let mut rows = Vec::new();
            while rows.is_empty() && s.cursor != Cursor::Done {
                let (r, next) = self.raw.store().with_backend(|b| b.read_snapshot(&s.cursor, self.chunk_bytes))?;
                rows = r;
                s.cursor = next;
            }
            let last = s.cursor == Cursor::Done;
            let (stream, index, term, seq, rows_total) = (s.stream, s.index, s.term, s.next_seq, s.rows_total);
            let frame = SnapFrame::Chunk { stream, index, term, seq, rows, last, rows_total };
            s.next_seq += 1;
            s.sent_last = last;
            self.outbox.push(Outbound::Snap { to, frame });
        }
    }

    /// Snapshot transfers that failed since the last call, as (recipient, snapshot index);
    /// raft has been told and sends a snapshot again once the follower responds.
    pub fn take_failed_transfers(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.failed_transfers)
    }

    fn end_stream(&mut self, to: u64, failed: bool) {
        let s = self.streams.remove(&to);
        self.raw.store().set_streaming(!self.streams.is_empty());
        if failed {
            if let Some(s) = s {
                self.failed_transfers.push((to, s.index));
            }
            self.raw.report_snapshot(to, SnapshotStatus::Failure);
        }
    }

    /// Ends the transfers whose snapshot the follower has taken (raft has left the snapshot
    /// state for it) and all of them once this node no longer leads.
    fn finish_streams(&mut self) {
        if !self.is_leader() {
            self.streams.clear();
            self.raw.store().set_streaming(false);
            return;
        }
        let prs = self.raw.raft.prs();
        let done: Vec<u64> = self
            .streams
            .iter()
            .filter(|(to, s)| {
                s.msg.is_none()
                    && prs.get(**to).is_none_or(|p| p.state != ProgressState::Snapshot || p.pending_snapshot != s.index)
            })
            .map(|(to, _)| *to)
            .collect();
        for to in done {
            self.end_stream(to, false);
        }
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

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Proposes a command. `Ok` means it was appended (on the leader) or forwarded; the
    /// outcome is then known only when it applies, or is superseded, or the caller times out.
    pub fn propose(&mut self, p: &Proposal) -> Result<(), ProposeError> {
        if self.raw.raft.leader_id == INVALID_ID {
            return Err(ProposeError::NoLeader);
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
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            // Leader messages may go out before the write; raft tolerates their loss.
            for m in rd.take_messages() {
                self.route(m, send)?;
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
            }
            batch.entries = rd.entries().to_vec();
            if let Some(hs) = rd.hs() {
                batch.hard_state = Some(hs.clone());
            }
            batch.sync = rd.must_sync() || !batch.entries.is_empty() || batch.snapshot.is_some();
            let committed = rd.take_committed_entries();
            self.write_and_apply(batch, &committed, out)?;

            // Only now, with the entries and vote durable, may votes and acks leave.
            rd.take_persisted_messages().into_iter().for_each(|m| send(Outbound::Raft(m)));
            for rs in rd.take_read_states() {
                out.read_states.push((rs.request_ctx, rs.index));
            }
            let mut light = self.raw.advance(rd);

            let mut batch = WriteBatch::default();
            if let Some(commit) = light.commit_index() {
                let mut hs = self.raw.store().hard_state();
                hs.commit = commit;
                batch.hard_state = Some(hs);
            }
            for m in light.take_messages() {
                self.route(m, send)?;
            }
            let committed = light.take_committed_entries();
            self.write_and_apply(batch, &committed, out)?;
            self.raw.advance_apply();
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
            }
        }
        Ok(())
    }

    /// Sends `m`, except a snapshot message, which starts a chunked transfer instead.
    fn route(&mut self, m: Message, send: &mut dyn FnMut(Outbound)) -> Result<(), NodeError> {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            self.start_stream(m)?;
            self.outbox.drain(..).for_each(&mut *send);
        } else {
            send(Outbound::Raft(m));
        }
        Ok(())
    }

    /// raft-rs keeps a leader that removed itself in charge (its TODO); hand leadership to the
    /// most caught-up voter instead, so the rest of the cluster does not wait for a timeout.
    fn step_down_if_removed(&mut self) {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader || r.prs().conf().voters().contains(r.id) {
            return;
        }
        let best = r
            .prs()
            .iter()
            .filter(|(id, _)| **id != r.id && r.prs().conf().voters().contains(**id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id);
        if let Some(target) = best {
            self.raw.transfer_leader(target);
        }
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
        let results = self.raw.store().write(&batch)?;
        for op in &batch.members {
            op.apply_to(&mut self.members);
        }
        let me = self.id();
        for (index, id, ok) in changes {
            if id.node == me {
                let result = ApplyResult { revision: index, flag: ok, duplicate: false };
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
                        let result = ApplyResult { revision: index, flag: true, duplicate: false };
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

    /// Applies a membership entry to raft; returns the new conf state (None if raft refused
    /// it) and the request that proposed it, and records address changes in `members`.
    fn apply_conf_change(
        &mut self,
        e: &raft::eraftpb::Entry,
        members: &mut Vec<MemberOp>,
    ) -> (Option<raft::eraftpb::ConfState>, Option<RequestId>) {
        let ctx = ConfChangeContext::decode(&e.context);
        let (cs, singles) = if e.get_entry_type() == EntryType::EntryConfChange {
            let mut cc = ConfChange::default();
            if cc.merge_from_bytes(&e.data).is_err() {
                return (None, ctx.map(|c| c.id));
            }
            let single = (cc.node_id, cc.get_change_type());
            (self.raw.apply_conf_change(&cc).ok(), vec![single])
        } else {
            let mut cc = ConfChangeV2::default();
            if cc.merge_from_bytes(&e.data).is_err() {
                return (None, ctx.map(|c| c.id));
            }
            let singles = cc.get_changes().iter().map(|s| (s.node_id, s.get_change_type())).collect();
            (self.raw.apply_conf_change(&cc).ok(), singles)
        };
        if cs.is_some() {
            for (node, kind) in singles {
                match kind {
                    ConfChangeType::RemoveNode => members.push(MemberOp::Remove(node)),
                    ConfChangeType::AddLearnerNode | ConfChangeType::AddNode => {
                        let address = ctx
                            .as_ref()
                            .and_then(|c| c.address.clone())
                            // Never store what a status row or a text column cannot hold.
                            .filter(|a| a.len() <= 64 && !a.contains('\0'))
                            .or_else(|| self.members.get(&node).map(|m| m.address.clone()))
                            .unwrap_or_default();
                        let promote = kind == ConfChangeType::AddLearnerNode && ctx.as_ref().is_some_and(|c| c.promote);
                        members.push(MemberOp::Upsert(Member { id: node, address, promote }));
                    }
                }
            }
        }
        (cs, ctx.map(|c| c.id))
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
    use crate::snapshot::Row;
    use crate::storage::MemBackend;

    /// Node 2 of a 3-node cluster, following node 1 in term 2.
    fn follower_of_1() -> Node<MemBackend> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let members: Vec<Member> =
            (1..=3).map(|id| Member { id, address: format!("sim:{id}"), promote: false }).collect();
        let mut n = Node::open(MemBackend::new(), &NodeOptions::new(2), &members, &logger).unwrap();
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        (hb.from, hb.to, hb.term) = (1, 2, 2);
        n.step(hb);
        assert_eq!(n.leader_id(), 1);
        n
    }

    fn sent(n: &mut Node<MemBackend>) -> Vec<Outbound> {
        let mut v = Vec::new();
        n.handle_ready(&mut Output::default(), &mut |m| v.push(m)).unwrap();
        v
    }

    #[test]
    fn a_transfer_sending_more_rows_than_it_announced_is_aborted() {
        let mut n = follower_of_1();
        let row = |k: &str| Row::Kv { key: k.into(), value: "v".into(), revision: 1 };
        let chunk =
            |seq, rows, last| SnapFrame::Chunk { stream: 7, index: 50, term: 2, seq, rows, last, rows_total: 2 };
        n.receive_snap(1, chunk(0, vec![row("a"), row("b")], false)).unwrap();
        n.receive_snap(1, chunk(1, vec![row("c")], true)).unwrap();
        let frames: Vec<SnapFrame> = sent(&mut n)
            .into_iter()
            .filter_map(|m| match m {
                Outbound::Snap { to: 1, frame } => Some(frame),
                _ => None,
            })
            .collect();
        assert!(matches!(frames[0], SnapFrame::Ack { seq: 0, .. }), "{frames:?}");
        assert!(matches!(&frames[1], SnapFrame::Abort { reason, .. } if reason.contains("more rows")), "{frames:?}");
        assert!(n.storage().with_backend(|b| b.inner.lock().unwrap().snap_kv.is_empty()), "staging emptied");
    }

    #[test]
    fn only_the_leader_starts_a_transfer() {
        let mut n = follower_of_1();
        let rows = vec![Row::Kv { key: "a".into(), value: "v".into(), revision: 1 }];
        let frame = SnapFrame::Chunk { stream: 7, index: 50, term: 2, seq: 0, rows, last: true, rows_total: 1 };
        n.receive_snap(3, frame).unwrap();
        assert!(sent(&mut n).iter().all(|m| !matches!(m, Outbound::Snap { .. })), "node 3 is not the leader");
        assert!(n.storage().with_backend(|b| b.inner.lock().unwrap().snap_kv.is_empty()));
    }
}
