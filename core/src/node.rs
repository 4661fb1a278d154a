//! The node driver: owns the `RawNode`, runs the Ready loop in the order raft-rs requires,
//! and reports what the I/O loop around it must do (messages to send, clients to answer).
//!
//! It performs no I/O of its own besides the [`Backend`] writes, so the same code runs in the
//! Postgres worker and in the deterministic simulation.

use std::collections::HashMap;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, EntryType, Message, Snapshot};
use raft::{Config, RawNode, StateRole, Storage as _, INVALID_ID};
use slog::Logger;

use crate::command::{ApplyResult, Proposal, RequestId};
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
    /// Make a caught-up learner a voter.
    Promote {
        id: u64,
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
        Ok(Node { raw, appended: HashMap::new(), last_soft, members })
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
        let (node, kind, address, promote) = match change {
            MemberChange::AddLearner { id, address, promote } => {
                (*id, ConfChangeType::AddLearnerNode, Some(address.clone()), *promote)
            }
            MemberChange::Promote { id } => (*id, ConfChangeType::AddNode, None, false),
            MemberChange::Remove { id } => (*id, ConfChangeType::RemoveNode, None, false),
        };
        let mut single = ConfChangeSingle::default();
        single.node_id = node;
        single.set_change_type(kind);
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
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
        Ok(true)
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Feeds a message from a peer. Messages raft cannot use (stale, from unknown peers) are
    /// ignored, as raft intends.
    pub fn step(&mut self, m: Message) {
        let _ = self.raw.step(m);
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
    pub fn handle_ready(&mut self, out: &mut Output, send: &mut dyn FnMut(Message)) -> Result<(), NodeError> {
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            // Leader messages may go out before the write; raft tolerates their loss.
            rd.take_messages().into_iter().for_each(&mut *send);

            let mut batch = WriteBatch::default();
            if !rd.snapshot().is_empty() {
                batch.snapshot = Some(rd.snapshot().clone());
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
            rd.take_persisted_messages().into_iter().for_each(&mut *send);
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
            light.take_messages().into_iter().for_each(&mut *send);
            let committed = light.take_committed_entries();
            self.write_and_apply(batch, &committed, out)?;
            self.raw.advance_apply();
        }
        self.step_down_if_removed();
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
            let plan = state_machine::plan(e, &mut batch.ops);
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
            match op {
                MemberOp::Upsert(m) => {
                    self.members.insert(m.id, m.clone());
                }
                MemberOp::Remove(id) => {
                    self.members.remove(id);
                }
            }
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
