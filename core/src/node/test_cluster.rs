//! Three real nodes on a lossless in-memory network, for the unit tests of the node's
//! modules.

use std::collections::BTreeMap;

use raft::eraftpb::{Message, MessageType};

use super::{Node, NodeOptions, Outbound, Output};
use crate::command::{Command, Proposal, RequestId};
use crate::mem_backend::MemBackend;
use crate::types::Member;

/// Three nodes on a lossless in-memory network, node 1 leading.
pub(super) struct Three {
    pub(super) nodes: BTreeMap<u64, Node<MemBackend>>,
    pub(super) backends: BTreeMap<u64, MemBackend>,
    /// Every raft message sent, in order: (from, the sender's applied index as it sent it,
    /// message).
    pub(super) sent: Vec<(u64, u64, Message)>,
    pub(super) completed: Vec<RequestId>,
}

impl Three {
    pub(super) fn new() -> Self {
        let backends: BTreeMap<u64, MemBackend> = (1..=3).map(|id| (id, MemBackend::new())).collect();
        let nodes = backends.iter().map(|(id, b)| (*id, open(*id, b))).collect();
        let mut t = Three { nodes, backends, sent: Vec::new(), completed: Vec::new() };
        t.nodes.get_mut(&1).unwrap().raw.campaign().unwrap();
        t.settle();
        assert!(t.nodes[&1].is_leader());
        // The leader's first entry commits and is announced at once.
        t.assert_all_applied_alike();
        t
    }

    /// Node `id` stops (whatever it held only in memory is lost) and reopens on what it wrote.
    pub(super) fn reopen(&mut self, id: u64) {
        let n = open(id, &self.backends[&id]);
        self.nodes.insert(id, n);
    }

    pub(super) fn assert_all_applied_alike(&self) {
        let applied = self.applied();
        assert!(applied.iter().all(|a| *a == applied[0]), "{applied:?}");
    }

    /// Runs every node's Ready and delivers what they send, until nothing moves.
    pub(super) fn settle(&mut self) {
        loop {
            let mut msgs = Vec::new();
            for (id, n) in self.nodes.iter_mut() {
                let mut out = Output::default();
                let backend = &self.backends[id];
                n.handle_ready(&mut out, &mut |m| {
                    if let Outbound::Raft(m) = m {
                        msgs.push((*id, backend.inner.lock().unwrap().state.applied, m))
                    }
                })
                .unwrap();
                self.completed.extend(out.completed.iter().map(|c| c.id));
            }
            if msgs.is_empty() {
                return;
            }
            for (from, applied, m) in msgs {
                self.sent.push((from, applied, m.clone()));
                self.nodes.get_mut(&m.to).unwrap().step(m);
            }
        }
    }

    pub(super) fn put(&mut self, on: u64, seq: u64) -> RequestId {
        let id = RequestId { node: on, nonce: 7, seq };
        let cmd = Command::Put { key: format!("k{seq}"), value: "v".into() };
        self.nodes.get_mut(&on).unwrap().propose(&Proposal { id, cmd }).unwrap();
        self.settle();
        assert!(self.completed.contains(&id), "{id:?} applied on its node");
        id
    }

    pub(super) fn applied(&self) -> Vec<u64> {
        self.backends.values().map(|b| b.inner.lock().unwrap().state.applied).collect()
    }

    /// Appends the leader sent that carry no entries (commit-only announcements), with the
    /// leader's applied index as it sent each and the commit index each carried.
    pub(super) fn announcements(&mut self) -> Vec<(u64, u64)> {
        let found = self
            .sent
            .iter()
            .filter(|(from, _, m)| *from == 1 && m.get_msg_type() == MessageType::MsgAppend && m.entries.is_empty())
            .map(|(_, applied, m)| (*applied, m.commit))
            .collect();
        self.sent.clear();
        found
    }
}

/// Node `id` of the three on `backend`.
fn open(id: u64, backend: &MemBackend) -> Node<MemBackend> {
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let members: Vec<Member> = (1..=3).map(|id| Member { id, address: format!("sim:{id}"), promote: false }).collect();
    Node::open(backend.clone(), &NodeOptions::new(id), &members, &logger).unwrap()
}
