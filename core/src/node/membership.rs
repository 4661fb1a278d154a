//! Membership: the changes a client asks for (add a learner, promote, remove), the
//! leader's refusal of a change raft would silently blank, and applying committed changes to
//! raft and to the recorded member addresses.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, EntryType, Message};
use raft::{StateRole, INVALID_ID};

use super::{Node, ProposeError};
use crate::command::RequestId;
use crate::storage::Backend;
use crate::types::{ConfChangeContext, Member, MemberOp};

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

impl<B: Backend> Node<B> {
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

    pub(super) fn change_pending(&self) -> bool {
        let cs = self.raw.store().conf_state();
        !cs.voters_outgoing.is_empty()
            || self.raw.store().unapplied_conf_change()
            || (self.is_leader() && self.raw.raft.has_pending_conf())
    }

    /// raft-rs turns a membership change it cannot take now (another is pending, or the
    /// joint state does not fit) into an empty entry, context and all, so a follower that
    /// forwarded it would only ever time out. Under the same conditions, keep the context
    /// (the request id) in a normal entry instead: when it applies, the proposer learns
    /// that its change was refused and nothing changed.
    pub(super) fn refuse_conf_changes_raft_would_blank(&self, m: &mut Message) {
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

    /// raft-rs keeps a leader that removed itself in charge (its TODO); hand leadership to the
    /// most caught-up voter instead, so the rest of the cluster does not wait for a timeout.
    pub(super) fn step_down_if_removed(&mut self) {
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

    /// Applies a membership entry to raft; returns the new conf state (None if raft refused
    /// it) and the request that proposed it, and records address changes in `members`.
    pub(super) fn apply_conf_change(
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
}
