//! When the leader tells its followers a new commit index.
//!
//! raft-rs sends every follower an append of its own for each commit, and each follower
//! answers it. At one client that is half the messages of a write, and the followers apply
//! the write while the leader applies it on the write's path, on the same cores. When all
//! that just committed is this leader's own proposals, nobody waits for the followers to
//! apply it: the commit index rides on the next append instead (every append carries it),
//! and the I/O loop calls `announce_commit` after a short delay for a leader with nothing
//! more to send. Anything else committed (a forwarded write, whose follower answers its
//! client only once it has applied it; a membership change; the leader's first entry) is
//! announced at once, before the leader applies it.
//!
//! Safety does not depend on it: a follower's commit index only bounds what it may apply,
//! heartbeats carry it too, and a follower's read index comes with the heartbeat round that
//! confirmed it.

use raft::eraftpb::{Entry, EntryType, Message, MessageType};

use super::{versions, NodeError, Outbound};
use crate::storage::Backend;

impl<B: Backend> super::Node<B> {
    /// Announces the commit of `committed` now, or leaves it to the next append.
    pub(super) fn announce_or_defer(
        &mut self,
        committed: &[Entry],
        tags: &versions::Tags,
        send: &mut dyn FnMut(Outbound),
    ) -> Result<(), NodeError> {
        if committed.is_empty() || !self.is_leader() {
            return Ok(());
        }
        let own = committed
            .iter()
            .all(|e| e.get_entry_type() == EntryType::EntryNormal && self.appended.contains_key(&e.index));
        if own {
            let me = self.id();
            let peers = self.raw.raft.prs().iter().map(|(id, _)| *id).filter(|id| *id != me).collect();
            self.unannounced = Some((self.raw.raft.raft_log.committed, peers));
            return Ok(());
        }
        self.raw.raft.bcast_append();
        self.unannounced = None;
        // A leader's messages may leave at once (see `handle_ready`).
        for m in std::mem::take(&mut self.raw.raft.msgs) {
            self.route(m, tags, send)?;
        }
        Ok(())
    }

    /// Whether some follower has not been told the leader's latest commit index.
    pub fn commit_unannounced(&self) -> bool {
        self.unannounced.is_some()
    }

    /// Tells every follower the commit index; raft sends the messages at the next
    /// `handle_ready`.
    pub fn announce_commit(&mut self) {
        if self.unannounced.take().is_some() && self.is_leader() {
            self.raw.raft.bcast_append();
        }
    }

    /// An append about to be sent carries the commit index to its follower.
    pub(super) fn note_commit_sent(&mut self, m: &Message) {
        if m.get_msg_type() != MessageType::MsgAppend {
            return;
        }
        if let Some((commit, peers)) = &mut self.unannounced {
            if m.commit >= *commit {
                peers.retain(|p| *p != m.to);
                if peers.is_empty() {
                    self.unannounced = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_cluster::Three;
    use super::super::{Outbound, Output};
    use super::*;
    use crate::command::{Command, Proposal, RequestId};

    #[test]
    fn the_leaders_own_writes_reach_the_followers_commit_with_the_next_append() {
        let mut t = Three::new();
        t.announcements();
        t.put(1, 1);
        let [leader, f2, f3] = t.applied()[..] else { unreachable!() };
        assert!(f2 < leader && f3 < leader, "followers have not applied it yet: {:?}", t.applied());
        assert_eq!(t.announcements(), [], "no append of its own for the commit");
        assert!(t.nodes[&1].commit_unannounced());

        // The next write's appends carry the first one's commit: both followers apply it.
        t.put(1, 2);
        assert_eq!(t.announcements(), []);
        let applied = t.applied();
        assert!(applied[1] == leader && applied[2] == leader, "{applied:?}");
        assert!(t.nodes[&1].commit_unannounced(), "the second write's commit is not announced yet");

        // With nothing more to send, the loop announces it.
        t.nodes.get_mut(&1).unwrap().announce_commit();
        t.settle();
        assert_eq!(t.announcements().len(), 2, "one commit-only append per follower");
        assert!(!t.nodes[&1].commit_unannounced());
        t.assert_all_applied_alike();
    }

    #[test]
    fn a_forwarded_write_is_announced_before_the_leader_applies_it() {
        let mut t = Three::new();
        t.put(1, 1);
        t.sent.clear();
        // Written on a follower: forwarded, and its follower must learn of the commit at once
        // to answer its client, with no call to announce_commit.
        t.put(2, 2);
        let sent = t.announcements();
        assert_eq!(sent.len(), 2, "{sent:?}");
        for (leader_applied, commit) in sent {
            assert!(leader_applied < commit, "announced before the leader applied it: {leader_applied} < {commit}");
        }
        assert!(!t.nodes[&1].commit_unannounced());
        t.assert_all_applied_alike();
    }

    #[test]
    fn a_follower_acknowledges_new_entries_before_it_applies_older_ones() {
        let mut t = Three::new();
        t.put(1, 1);
        let first = t.applied()[0];
        assert!(t.applied()[1] < first);
        // The second write's append carries the first's commit: node 2 acknowledges it while
        // the first is still unapplied there, then applies it in the same Ready.
        let id = RequestId { node: 1, nonce: 7, seq: 2 };
        let cmd = Command::Put { key: "k2".into(), value: "v".into() };
        t.nodes.get_mut(&1).unwrap().propose(&Proposal { id, cmd }).unwrap();
        let mut appends = Vec::new();
        t.nodes.get_mut(&1).unwrap().handle_ready(&mut Output::default(), &mut |m| appends.push(m)).unwrap();
        for m in appends {
            if let Outbound::Raft(m) = m {
                if m.to == 2 {
                    assert!(!m.entries.is_empty() && m.commit >= first, "{m:?}");
                    t.nodes.get_mut(&2).unwrap().step(m);
                }
            }
        }
        let backend = t.backends[&2].clone();
        let mut acked_at = Vec::new();
        t.nodes
            .get_mut(&2)
            .unwrap()
            .handle_ready(&mut Output::default(), &mut |m| {
                if let Outbound::Raft(m) = m {
                    if m.get_msg_type() == MessageType::MsgAppendResponse {
                        let s = &backend.inner.lock().unwrap().state;
                        acked_at.push((m.index, s.applied, s.hard_state.commit));
                    }
                }
            })
            .unwrap();
        assert_eq!(acked_at.len(), 1, "{acked_at:?}");
        assert!(acked_at[0].0 > first && acked_at[0].1 < first, "acknowledged before applying: {acked_at:?}");
        assert!(acked_at[0].2 < first, "the commit index is written with the apply: {acked_at:?}");
        assert_eq!(t.applied()[1], first, "applied in the same Ready");
        assert_eq!(t.backends[&2].inner.lock().unwrap().state.hard_state.commit, first);
    }
}
