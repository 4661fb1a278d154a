//! Disaster recovery on one node, outside the log: seeding a brand-new one-node cluster with a
//! backup, and turning the survivor of a lost majority into a one-node cluster (etcd's
//! `--force-new-cluster`). Both are local rewrites of a node that no other member can
//! contradict: the only voter of a new cluster, or the last one left of an old one.

use raft::eraftpb::{ConfState, Snapshot};
use raft::StateRole;

use super::{Node, NodeError};
use crate::backup::{BackupError, Header, Reader};
use crate::storage::{Backend, StoreError, WriteBatch};
use crate::types::{MemberOp, SnapshotData};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The node is not in a state where the step is allowed; nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The backup is damaged or incomplete; nothing changed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<StoreError> for RecoveryError {
    fn from(e: StoreError) -> Self {
        RecoveryError::Node(e.into())
    }
}

impl From<raft::Error> for RecoveryError {
    fn from(e: raft::Error) -> Self {
        RecoveryError::Node(e.into())
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, RecoveryError> {
    Err(RecoveryError::Refused(why.into()))
}

/// Whether the voters this node can reach (itself included) form a quorum of every
/// configuration in force (both halves of a joint one).
pub fn quorum_reachable(me: u64, cs: &ConfState, reachable: &[u64]) -> bool {
    let majority = |voters: &[u64]| {
        let up = voters.iter().filter(|v| **v == me || reachable.contains(v)).count();
        !voters.is_empty() && up > voters.len() / 2
    };
    majority(&cs.voters) || (!cs.voters_outgoing.is_empty() && majority(&cs.voters_outgoing))
}

impl<B: Backend> Node<B> {
    /// Replaces the (empty) state of a brand-new one-node cluster with a backup's, read record
    /// by record through `next` (`(seq, bytes)`, in order): keys, revisions, history, leases
    /// and request ids as the source had them at its backup index. The rows are staged and
    /// installed like a received snapshot, at this node's last index, with the log compacted up
    /// to it, so a node added later receives the restored state as a snapshot and never
    /// replays the empty history before it.
    pub fn restore(
        &mut self,
        mut next: impl FnMut() -> Result<Option<(u32, Vec<u8>)>, StoreError>,
    ) -> Result<Header, RecoveryError> {
        self.check_brand_new()?;
        let store = self.raw.store();
        store.forget_frozen();
        store.with_backend(|b| b.clear_snapshot_store())?;
        let mut reader = Reader::new();
        while let Some((seq, bytes)) = next()? {
            let rows = reader.take(seq, &bytes)?;
            if !rows.is_empty() {
                store.with_backend(|b| b.stage_snapshot(&rows))?;
            }
        }
        let header = reader.finish()?;
        let last = store.last();
        let mut snap = Snapshot::default();
        let m = snap.mut_metadata();
        m.index = last;
        m.term = raft::Storage::term(store, last)?;
        m.set_conf_state(store.conf_state());
        let data = SnapshotData {
            members: self.members.values().cloned().collect(),
            kv_rows: header.kv_rows,
            request_rows: header.request_rows,
            cluster_id: store.cluster_id(),
            change_rows: header.change_rows,
            revision: header.revision,
            compact_revision: header.compact_revision,
            leases: header.leases.clone(),
        };
        snap.set_data(data.encode().into());
        store.write(&WriteBatch { snapshot: Some(snap), sync: true, ..Default::default() })?;
        Ok(header)
    }

    /// A restore goes only into a cluster of this one node, leading, with nothing written.
    fn check_brand_new(&self) -> Result<(), RecoveryError> {
        let store = self.raw.store();
        let cs = store.conf_state();
        if cs.voters != [self.id()] || !cs.learners.is_empty() || !cs.voters_outgoing.is_empty() {
            return refuse(format!(
                "raft_restore needs a brand-new one-node cluster, but this node's members are voters {:?}, learners {:?}: \
                 restore into a node whose raft_kv.peers lists only itself, then add the others with raft_join",
                cs.voters, cs.learners
            ));
        }
        if self.raw.raft.state != StateRole::Leader || store.cluster_id() == 0 {
            return refuse("the new cluster is still starting (this node does not lead it yet): try again");
        }
        let (revision, _) = store.revisions();
        if revision != 0 || !store.leases()?.is_empty() {
            return refuse(format!(
                "raft_restore needs a brand-new cluster, but this one has been written to (revision {revision}, or leases exist)"
            ));
        }
        let busy = !self.streams.is_empty() || self.incoming.is_some() || self.install_pending;
        if busy
            || self.raw.has_ready()
            || store.applied() != store.last()
            || self.raw.raft.raft_log.committed != store.last()
        {
            return refuse("the new cluster has work in flight: try again");
        }
        Ok(())
    }

    /// First step of forcing a new cluster on the survivor of a lost majority: refused while a
    /// quorum is reachable (then the other members must be removed with raft_remove instead)
    /// or while any leader is known. Otherwise marks every entry this node holds as committed,
    /// so the loop applies them: an acknowledged write this node received is kept even if the
    /// lost leader's commit index never reached it. Returns the index everything up to which
    /// must be applied before [`Node::force_single_voter`].
    pub fn force_commit_all(&mut self, reachable: &[u64]) -> Result<u64, RecoveryError> {
        let me = self.id();
        let cs = self.raw.store().conf_state();
        if !cs.voters.contains(&me) && !cs.voters_outgoing.contains(&me) {
            return refuse(format!("node {me} is not a voter: only a voter can become a new cluster's first member"));
        }
        if cs.voters == [me] && cs.voters_outgoing.is_empty() {
            return refuse(format!("node {me} is already the only voter of its cluster"));
        }
        if self.raw.raft.leader_id != raft::INVALID_ID {
            return refuse(format!(
                "node {} leads the cluster: a quorum is reachable; remove lost members with raft_remove instead",
                self.raw.raft.leader_id
            ));
        }
        if quorum_reachable(me, &cs, reachable) {
            return refuse(format!(
                "a quorum of the voters {:?} is reachable ({reachable:?} and this node): wait for it to elect a \
                 leader, and remove lost members with raft_remove instead",
                cs.voters
            ));
        }
        let last = self.raw.raft.raft_log.last_index();
        self.raw.raft.raft_log.commit_to(last);
        Ok(last)
    }

    /// Second step, once everything up to [`Node::force_commit_all`]'s index is applied: makes
    /// this node the only voter, durably, keeping its data and cluster id, and compacts the
    /// log so that nodes added later receive the state as a snapshot instead of replaying the
    /// old configuration. The caller then restarts the node on its new configuration.
    pub fn force_single_voter(&mut self) -> Result<(), RecoveryError> {
        let me = self.id();
        let store = self.raw.store();
        let applied = store.applied();
        if applied != store.last() || self.raw.has_ready() {
            return refuse("entries are still being applied: try again");
        }
        let term = raft::Storage::term(store, applied)?;
        let mut cs = ConfState::default();
        cs.voters = vec![me];
        let mut hs = store.hard_state();
        hs.commit = hs.commit.max(applied);
        let gone: Vec<MemberOp> = self.members.keys().filter(|&&id| id != me).map(|&id| MemberOp::Remove(id)).collect();
        let compact_to = (applied > store.snapshot_meta().0).then_some((applied, term));
        store.write(&WriteBatch {
            conf_state: Some(cs),
            hard_state: Some(hs),
            members: gone,
            compact_to,
            sync: true,
            ..Default::default()
        })?;
        store.forget_frozen();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::Record;
    use crate::command::{Command, Proposal, RequestId};
    use crate::lease::LeaseRow;
    use crate::mem_backend::MemBackend;
    use crate::node::{NodeOptions, Output};
    use crate::snapshot::Row;
    use crate::types::{KvRow, Member};

    fn logger() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    fn member(id: u64) -> Member {
        Member { id, address: format!("127.0.0.1:{}", 7000 + id), promote: false }
    }

    fn step(n: &mut Node<MemBackend>) {
        n.tick().unwrap();
        n.handle_ready(&mut Output::default(), &mut |_| {}).unwrap();
    }

    fn leading_alone() -> (Node<MemBackend>, MemBackend) {
        let backend = MemBackend::new();
        let mut n = Node::open(backend.clone(), &NodeOptions::new(1), &[member(1)], &logger()).unwrap();
        while !n.is_leader() {
            step(&mut n);
        }
        n.propose_cluster_id(RequestId { node: 1, nonce: 9, seq: 1 }, 42).unwrap();
        while n.cluster_id() == 0 || n.has_ready() {
            step(&mut n);
        }
        (n, backend)
    }

    fn records(rows: Vec<Row>, revision: u64) -> Vec<Vec<u8>> {
        let header = Header {
            source_cluster: 7,
            node: 3,
            index: 100,
            revision,
            compact_revision: 2,
            kv_rows: rows.iter().filter(|r| matches!(r, Row::Kv { .. })).count() as u64,
            leases: vec![(5, LeaseRow { ttl_ms: 60_000, refreshes: 1 })],
            ..Default::default()
        };
        vec![Record::Header(header).encode(), Record::Rows(rows).encode(), Record::End { records: 3 }.encode()]
    }

    fn feed(recs: &[Vec<u8>]) -> impl FnMut() -> Result<Option<(u32, Vec<u8>)>, StoreError> + '_ {
        let mut i = 0;
        move || {
            i += 1;
            Ok(recs.get(i - 1).map(|r| ((i - 1) as u32, r.clone())))
        }
    }

    fn kv(key: &str, value: &str, rev: u64, lease: u64) -> Row {
        Row::Kv {
            key: key.into(),
            row: KvRow { value: value.into(), mod_revision: rev, create_revision: 1, version: rev, lease },
        }
    }

    #[test]
    fn a_backup_restores_into_a_brand_new_one_node_cluster() {
        let (mut n, backend) = leading_alone();
        let recs = records(vec![kv("a", "1", 3, 0), kv("b", "2", 9, 5)], 9);
        let h = n.restore(feed(&recs)).unwrap();
        assert_eq!(h.revision, 9);
        assert_eq!(n.revisions(), (9, 2));
        let kv = backend.kv();
        assert_eq!(kv.len(), 2);
        assert_eq!(kv["b"], ("2".to_string(), 9));
        assert_eq!(n.storage().leases().unwrap(), vec![(5, LeaseRow { ttl_ms: 60_000, refreshes: 1 })]);
        assert_eq!(n.cluster_id(), 42, "the new cluster keeps its own id");
        // The log is compacted to the restore point; writes carry on from the revision.
        assert_eq!(n.storage().first(), n.storage().last() + 1);
        n.propose(&Proposal {
            id: RequestId { node: 1, nonce: 9, seq: 2 },
            cmd: Command::Put { key: "c".into(), value: "3".into() },
        })
        .unwrap();
        while n.has_ready() || backend.kv().len() < 3 {
            step(&mut n);
        }
        assert_eq!(backend.kv()["c"], ("3".to_string(), 10));
        // Only once: the cluster has been written to now.
        assert!(matches!(n.restore(feed(&recs)), Err(RecoveryError::Refused(_))));
    }

    #[test]
    fn a_damaged_backup_or_a_used_cluster_changes_nothing() {
        let (mut n, backend) = leading_alone();
        let mut recs = records(vec![kv("a", "1", 3, 0)], 3);
        recs.pop();
        assert!(matches!(n.restore(feed(&recs)), Err(RecoveryError::Backup(BackupError::Truncated))));
        assert!(backend.kv().is_empty());
        assert_eq!(n.revisions().0, 0);

        let backend3 = MemBackend::new();
        let three: Vec<Member> = (1..=3).map(member).collect();
        let mut n3 = Node::open(backend3, &NodeOptions::new(1), &three, &logger()).unwrap();
        let err = n3.restore(feed(&records(vec![], 1))).unwrap_err();
        assert!(err.to_string().contains("one-node cluster"), "{err}");
    }

    #[test]
    fn quorum_reachability() {
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        assert!(quorum_reachable(1, &cs, &[2]));
        assert!(!quorum_reachable(1, &cs, &[]));
        assert!(!quorum_reachable(1, &cs, &[4]));
        cs.voters = vec![1, 2, 3, 4, 5];
        assert!(!quorum_reachable(1, &cs, &[2]));
        assert!(quorum_reachable(1, &cs, &[2, 5]));
        // Joint: either half with a quorum is enough to refuse.
        cs.voters = vec![1, 2, 3];
        cs.voters_outgoing = vec![1, 4, 5];
        assert!(quorum_reachable(1, &cs, &[4]));
    }

    #[test]
    fn the_survivor_of_a_lost_majority_becomes_a_one_node_cluster_keeping_its_log() {
        let backend = MemBackend::new();
        let three: Vec<Member> = (1..=3).map(member).collect();
        let mut n = Node::open(backend.clone(), &NodeOptions::new(1), &three, &logger()).unwrap();
        // Entries a leader (node 2) sent before it and node 3 were lost, not known committed here.
        let mut append = raft::eraftpb::Message::default();
        append.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
        append.from = 2;
        append.to = 1;
        append.term = 2;
        append.log_term = 1;
        append.index = 1;
        let put = |seq, key: &str| {
            let mut e = raft::eraftpb::Entry::default();
            e.term = 2;
            e.index = 1 + seq;
            e.data = Proposal {
                id: RequestId { node: 2, nonce: 1, seq },
                cmd: Command::Put { key: key.into(), value: "v".into() },
            }
            .encode()
            .into();
            e
        };
        append.entries = vec![put(1, "x"), put(2, "y")].into();
        append.commit = 2;
        n.step(append);
        step(&mut n);
        assert_eq!(backend.kv().len(), 1, "only x is known committed");
        // A leader is known: refused.
        assert!(matches!(n.force_commit_all(&[]), Err(RecoveryError::Refused(_))));
        // Leader and node 3 gone: no leader after an election timeout, nobody reachable.
        for _ in 0..30 {
            step(&mut n);
        }
        assert!(matches!(n.force_commit_all(&[2]), Err(RecoveryError::Refused(_))), "a quorum with node 2");
        let last = n.force_commit_all(&[]).unwrap();
        assert_eq!(last, 3);
        while n.storage().applied() < last {
            step(&mut n);
        }
        assert!(backend.kv().contains_key("y"), "an entry it held but did not know committed is kept");
        n.force_single_voter().unwrap();
        drop(n);
        // Reopened on the new configuration: it alone elects itself and writes.
        let mut n = Node::open(backend.clone(), &NodeOptions::new(1), &three, &logger()).unwrap();
        assert_eq!(n.storage().conf_state().voters, vec![1]);
        assert_eq!(n.members().keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(n.storage().first(), 4, "the old log is compacted");
        while !n.is_leader() {
            step(&mut n);
        }
        n.propose(&Proposal {
            id: RequestId { node: 1, nonce: 5, seq: 1 },
            cmd: Command::Put { key: "z".into(), value: "v".into() },
        })
        .unwrap();
        while !backend.kv().contains_key("z") {
            step(&mut n);
        }
    }
}
