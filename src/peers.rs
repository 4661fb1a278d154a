//! Where each other node is reached, kept in step with the transport.
//!
//! The addresses `raft_kv.peers` gives win (an operator's word, and the tests' proxies), then
//! those the log recorded, then those learned from a peer's hello, which only a node waiting
//! to be added takes (from an authenticated peer: members know their addresses from the log).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use raft_kv_core::node::Node;
use raft_kv_core::storage::Backend;
use raft_kv_core::transport::Transport;

pub struct Peers {
    me: u64,
    configured: BTreeMap<u64, SocketAddr>,
    learned: BTreeMap<u64, SocketAddr>,
    addrs: BTreeMap<u64, SocketAddr>,
}

impl Peers {
    pub fn new(me: u64, configured: BTreeMap<u64, SocketAddr>) -> Self {
        Peers { me, configured, learned: BTreeMap::new(), addrs: BTreeMap::new() }
    }

    pub fn addrs(&self) -> &BTreeMap<u64, SocketAddr> {
        &self.addrs
    }

    /// Only members speak to us (a removed node is no longer one), except to a node that
    /// belongs to no cluster yet: it waits for a leader to add it.
    pub fn admits<B: Backend>(&self, node: &Node<B>, from: u64) -> bool {
        let blank = !node.is_member(self.me) && node.members().is_empty();
        blank || node.is_member(from)
    }

    /// An authenticated peer said where it listens.
    pub fn hello<B: Backend>(&mut self, node: &Node<B>, transport: &mut Transport, peer: u64, addr: SocketAddr) {
        if node.members().is_empty() && !self.addrs.contains_key(&peer) {
            self.learned.insert(peer, addr);
            self.sync(node, transport);
        }
    }

    /// Points the transport at the current addresses.
    pub fn sync<B: Backend>(&mut self, node: &Node<B>, transport: &mut Transport) {
        let mut want = self.learned.clone();
        for m in node.members().values() {
            if let Ok(a) = m.address.parse() {
                want.insert(m.id, a);
            }
        }
        want.extend(self.configured.iter().map(|(k, v)| (*k, *v)));
        want.remove(&self.me);
        if want == self.addrs {
            return;
        }
        for (&id, &addr) in &want {
            transport.set_peer(id, addr);
        }
        for id in self.addrs.keys().filter(|id| !want.contains_key(id)) {
            transport.remove_peer(*id);
        }
        self.addrs = want;
    }
}
