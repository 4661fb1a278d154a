//! Deterministic simulation of a raft_kv cluster: the real node driver, in-memory storage and
//! state machine, over a simulated network that drops, delays, duplicates and reorders
//! messages, partitions and heals, and crashes and restarts nodes. Everything derives from one
//! seed, so a failing seed replays exactly.
//!
//! Invariants are checked after every step: at most one leader per term; a committed entry
//! is never lost or changed; nodes that applied the same index hold the same state;
//! applied ≤ commit ≤ last.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use raft::StateRole;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::command::{Command, Proposal, RequestId};
use crate::mem_backend::{InjectedBug, MemBackend};
use crate::node::{Node, NodeOptions, Outbound, Output};
use crate::storage::Backend;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: u64,
    pub steps: u64,
    pub drop_rate: f64,
    pub dup_rate: f64,
    /// Messages are delivered 1..=max_delay steps after being sent (so they reorder).
    pub max_delay: u64,
    pub crash_rate: f64,
    pub partition_rate: f64,
    pub propose_rate: f64,
    /// A durability bug to inject into every backend.
    pub bug: InjectedBug,
    /// Compact each node's log past this many entries, so nodes back from a crash or a
    /// partition catch up by (streamed) snapshot.
    pub compact_threshold: Option<u64>,
    /// History retention in revisions (the leader proposes compactions), `None`: keep all.
    pub history_retention: Option<u64>,
    /// How often a node's peers are told it is gone (`Node::peer_gone`) when it crashes, as
    /// the transport does on a closed connection; also how often a side of a new partition is
    /// told so, and (a tenth of it, per step) how often a node is told so wrongly, as after a
    /// link that merely flapped.
    pub gone_rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            steps: 3000,
            drop_rate: 0.05,
            dup_rate: 0.02,
            max_delay: 3,
            crash_rate: 0.003,
            partition_rate: 0.004,
            propose_rate: 0.3,
            bug: InjectedBug::None,
            compact_threshold: Some(40),
            history_retention: Some(30),
            gone_rate: 0.8,
        }
    }
}

/// What a run observed.
#[derive(Debug, Default)]
pub struct SimReport {
    pub elections: usize,
    pub acknowledged: usize,
    pub crashes: usize,
    pub partitions: usize,
    pub final_applied: u64,
    /// Snapshot messages delivered (each after its streamed rows).
    pub snapshots: usize,
    /// Snapshot transfers that failed (and were retried).
    pub failed_transfers: usize,
    /// Times a follower was told its leader was gone and brought its election forward.
    pub early_campaigns: usize,
    /// Times a follower applied committed entries it had held back.
    pub deferred_applies: u64,
}

pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    step: u64,
    backends: BTreeMap<u64, MemBackend>,
    nodes: BTreeMap<u64, Option<Node<MemBackend>>>,
    /// (deliver at step, sender, message or snapshot frame)
    in_flight: Vec<(u64, u64, Outbound)>,
    /// Nodes on each side of a partition; empty when healed.
    partition: Option<BTreeSet<u64>>,
    leaders: HashMap<u64, u64>,
    /// index → (term, data) of every entry known committed somewhere.
    committed: BTreeMap<u64, (u64, Vec<u8>)>,
    /// applied index → kv state, as first seen on any node.
    states: BTreeMap<u64, crate::mem_backend::StateView>,
    acked: HashMap<RequestId, (String, u64)>,
    /// Every proposal, for retries and to know what a completion was.
    proposed: Vec<(RequestId, Command)>,
    /// Requests seen applied (not as a duplicate) on their node.
    applied_once: std::collections::HashSet<RequestId>,
    /// (node, context, index) of every read state seen.
    read_states: Vec<(u64, Vec<u8>, u64)>,
    seq: u64,
    /// The history compaction each leader last proposed.
    compact_asked: BTreeMap<u64, u64>,
    report: SimReport,
    /// Membership changes reported refused, by the node that proposed them.
    refused: Vec<RequestId>,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn members(ids: &[u64]) -> Vec<crate::types::Member> {
    ids.iter().map(|&id| crate::types::Member { id, address: format!("sim:{id}"), promote: false }).collect()
}

fn opts(id: u64) -> NodeOptions {
    let mut o = NodeOptions::new(id);
    o.election_ticks = 10;
    o.heartbeat_ticks = 2;
    // Tiny chunks, so every snapshot transfer takes several, under the network's faults.
    o.snapshot_chunk_bytes = 512;
    o
}

impl Sim {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let ids: Vec<u64> = (1..=cfg.nodes).collect();
        let mut backends = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let mut b = MemBackend::new();
            b.bug = cfg.bug;
            let n = Node::open(b.clone(), &opts(id), &members(&ids), &logger()).expect("open node");
            backends.insert(id, b);
            nodes.insert(id, Some(n));
        }
        Sim {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            step: 0,
            backends,
            nodes,
            in_flight: Vec::new(),
            partition: None,
            leaders: HashMap::new(),
            committed: BTreeMap::new(),
            states: BTreeMap::new(),
            acked: HashMap::new(),
            proposed: Vec::new(),
            applied_once: Default::default(),
            read_states: Vec::new(),
            seq: 0,
            compact_asked: BTreeMap::new(),
            report: SimReport::default(),
            refused: Vec::new(),
        }
    }

    fn connected(&self, a: u64, b: u64) -> bool {
        match &self.partition {
            None => true,
            Some(side) => side.contains(&a) == side.contains(&b),
        }
    }

    /// Runs the configured number of steps, then heals everything and lets the cluster settle.
    pub fn run(mut self) -> Result<SimReport, String> {
        for _ in 0..self.cfg.steps {
            self.chaos();
            self.tick_all()?;
        }
        // Heal: restart crashed nodes, remove the partition, perfect network.
        self.partition = None;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.nodes[&id].is_none() {
                self.restart(id);
            }
        }
        self.cfg.drop_rate = 0.0;
        self.cfg.dup_rate = 0.0;
        self.cfg.propose_rate = 0.0;
        for _ in 0..400 {
            self.tick_all()?;
        }
        // One more write must succeed and everyone must converge on it.
        let leader = self.leader().ok_or("no leader after healing")?;
        let id = self.propose_on(leader, "final", "x");
        for _ in 0..200 {
            self.tick_all()?;
        }
        let Some((_, final_rev)) = self.acked.get(&id).cloned() else {
            return Err("the final write did not apply on its node after healing".into());
        };
        // A ReadIndex on every node must return a read point at or after the final write.
        // Contexts must be unique: the leader drops a read whose context is already pending.
        for (id, n) in self.nodes.iter_mut() {
            n.as_mut().unwrap().read_index(format!("final-read-{id}").into_bytes());
        }
        self.read_states.clear();
        for _ in 0..50 {
            self.tick_all()?;
        }
        for node in self.nodes.keys() {
            let want = format!("final-read-{node}").into_bytes();
            match self.read_states.iter().find(|(n, ctx, _)| n == node && *ctx == want) {
                Some((_, _, idx)) if *idx >= final_rev => {}
                Some((_, _, idx)) => {
                    return Err(format!("node {node}: read index {idx} below the final write {final_rev}"))
                }
                None => return Err(format!("node {node}: ReadIndex never answered")),
            }
        }
        // The key-value state, the revision, the compaction point and the retained history.
        let kvs: Vec<_> = self
            .backends
            .values()
            .map(|b| {
                let s = b.inner.lock().unwrap();
                (s.kv.clone(), s.revision, s.compact_revision, s.changes.clone(), s.leases.clone())
            })
            .collect();
        if kvs.windows(2).any(|w| w[0] != w[1]) {
            let st: Vec<_> = self
                .nodes
                .values()
                .map(|n| {
                    let s = n.as_ref().unwrap().status();
                    format!(
                        "{}:{:?} applied {} last {} snap {}",
                        s.id, s.role, s.applied, s.last_index, s.snapshot_index
                    )
                })
                .collect();
            return Err(format!("state machines differ after healing: {st:?}"));
        }
        let (_, revision, compact, history, _) = &kvs[0];
        if let Some(r) = self.cfg.history_retention {
            if *revision > 2 * r && (*compact == 0 || history.keys().any(|(rev, _)| rev < compact)) {
                return Err(format!(
                    "history not compacted by retention {r}: revision {revision}, compacted at {compact}"
                ));
            }
        }
        // Every acknowledged put is there, or overwritten by a later revision.
        for (rid, (key, rev)) in &self.acked {
            match kvs[0].0.get(key).map(|row| row.mod_revision) {
                Some(r) if r >= *rev => {}
                Some(r) => return Err(format!("{rid:?}: {key} at revision {r}, acknowledged {rev}")),
                None if key.starts_with("del/") => {}
                None => return Err(format!("{rid:?}: acknowledged {key}@{rev} is missing")),
            }
        }
        self.report.final_applied = self.backends.values().next().unwrap().inner.lock().unwrap().state.applied;
        Ok(self.report)
    }

    fn leader(&self) -> Option<u64> {
        self.nodes.iter().find_map(|(id, n)| n.as_ref().filter(|n| n.is_leader()).map(|_| *id))
    }

    fn propose_on(&mut self, id: u64, key: &str, value: &str) -> RequestId {
        self.seq += 1;
        let rid = RequestId { node: id, nonce: 0, seq: self.seq };
        let cmd = if key.starts_with("del/") {
            Command::Delete { key: key.to_string() }
        } else if key.starts_with('k') && self.seq % 7 == 3 {
            // Lease operations on three lease ids, with keys of their own: grants, puts attached
            // to them (refused when the lease is gone), keepalives, expiries naming a refresh
            // count that may or may not hold, and revokes.
            let lease = self.seq / 7 % 3 + 1;
            match self.seq / 7 % 5 {
                0 => Command::LeaseGrant { id: lease, ttl_ms: 1_000 },
                1 => Command::PutLease { key: format!("lease/{}", self.seq % 4), value: value.to_string(), lease },
                2 => Command::LeaseKeepAlive { id: lease },
                3 => Command::LeaseExpire { id: lease, refreshes: self.seq % 3 },
                _ => Command::LeaseRevoke { id: lease },
            }
        } else if self.seq.is_multiple_of(5) {
            // A transaction that writes the key whichever branch it takes; if the key existed
            // it also writes a "t/" key, else it deletes every "t/" key (two keys, one revision).
            use crate::txn::{CmpOp, Compare, Scope, Target, Txn, TxnOp};
            let put = TxnOp::Put { key: key.to_string(), value: value.to_string() };
            let side = TxnOp::Put { key: format!("t/{}", self.seq % 3), value: value.to_string() };
            Command::Txn(Txn {
                compare: vec![Compare {
                    scope: Scope::Key(key.to_string()),
                    target: Target::Version(0),
                    op: CmpOp::Gt,
                }],
                success: vec![put.clone(), side],
                failure: vec![put, TxnOp::Delete(Scope::Prefix("t/".into())), TxnOp::Get(Scope::Prefix(String::new()))],
            })
        } else {
            Command::Put { key: key.to_string(), value: value.to_string() }
        };
        if let Some(n) = self.nodes.get_mut(&id).unwrap() {
            let _ = n.propose(&Proposal { id: rid, cmd: cmd.clone() });
        }
        self.proposed.push((rid, cmd));
        rid
    }

    /// Proposes an earlier request again, as the worker does after a leader change.
    fn retry_one(&mut self) {
        if self.proposed.is_empty() {
            return;
        }
        let (rid, cmd) = self.proposed[self.rng.gen_range(0..self.proposed.len())].clone();
        if let Some(Some(n)) = self.nodes.get_mut(&rid.node) {
            let _ = n.propose(&Proposal { id: rid, cmd });
        }
    }

    /// Adds a blank node (not bootstrapped) that waits to be added by the leader.
    pub fn add_blank(&mut self, id: u64) {
        let b = MemBackend::new();
        let n = Node::open(b.clone(), &opts(id), &[], &logger()).expect("open blank node");
        self.backends.insert(id, b);
        self.nodes.insert(id, Some(n));
    }

    /// Runs `steps` steps without new chaos.
    pub fn settle(&mut self, steps: usize) -> Result<(), String> {
        for _ in 0..steps {
            self.tick_all()?;
        }
        Ok(())
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node<MemBackend> {
        self.nodes.get_mut(&id).unwrap().as_mut().unwrap()
    }

    fn restart(&mut self, id: u64) {
        let ids: Vec<u64> = (1..=self.cfg.nodes).filter(|i| *i == id || self.cfg.nodes >= *i).collect();
        let n = Node::open(self.backends[&id].clone(), &opts(id), &members(&ids), &logger()).expect("reopen");
        self.nodes.insert(id, Some(n));
    }

    fn chaos(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        if self.rng.gen_bool(self.cfg.crash_rate) {
            let id = ids[self.rng.gen_range(0..ids.len())];
            if self.nodes[&id].is_some() {
                self.nodes.insert(id, None);
                self.in_flight.retain(|(_, _, m)| m.to() != id);
                self.report.crashes += 1;
                for &other in &ids {
                    if other != id && self.rng.gen_bool(self.cfg.gone_rate) {
                        self.tell_gone(other, id);
                    }
                }
            } else {
                self.restart(id);
            }
        }
        // Crashed nodes come back after a while.
        for &id in &ids {
            if self.nodes[&id].is_none() && self.rng.gen_bool(0.02) {
                self.restart(id);
            }
        }
        if self.rng.gen_bool(self.cfg.partition_rate) {
            if self.partition.is_some() {
                self.partition = None;
            } else {
                let side: BTreeSet<u64> = ids.iter().copied().filter(|_| self.rng.gen_bool(0.5)).collect();
                for &a in &ids {
                    for &b in &ids {
                        if side.contains(&a) != side.contains(&b) && self.rng.gen_bool(self.cfg.gone_rate / 2.0) {
                            self.tell_gone(a, b);
                        }
                    }
                }
                self.partition = Some(side);
                self.report.partitions += 1;
            }
        }
        if self.rng.gen_bool(self.cfg.gone_rate / 10.0) {
            let (a, b) = (ids[self.rng.gen_range(0..ids.len())], ids[self.rng.gen_range(0..ids.len())]);
            if a != b {
                self.tell_gone(a, b);
            }
        }
        if self.rng.gen_bool(self.cfg.propose_rate) {
            let id = ids[self.rng.gen_range(0..ids.len())];
            let k = self.rng.gen_range(0..8);
            let key = if self.rng.gen_bool(0.1) { format!("del/{k}") } else { format!("k{k}") };
            let value = format!("v{}", self.step);
            self.propose_on(id, &key, &value);
        }
        if self.rng.gen_bool(self.cfg.propose_rate / 4.0) {
            self.retry_one();
        }
    }

    /// Tells node `to` that its connection to `gone` closed (if `to` is up).
    fn tell_gone(&mut self, to: u64, gone: u64) {
        if let Some(Some(n)) = self.nodes.get_mut(&to) {
            if n.peer_gone(gone) {
                self.report.early_campaigns += 1;
            }
        }
    }

    fn tick_all(&mut self) -> Result<(), String> {
        self.step += 1;
        // Deliver due messages in a random order.
        let now = self.step;
        let mut due: Vec<(u64, Outbound)> = Vec::new();
        self.in_flight.retain(|(at, from, m)| {
            if *at <= now {
                due.push((*from, m.clone()));
                false
            } else {
                true
            }
        });
        for i in (1..due.len()).rev() {
            let j = self.rng.gen_range(0..=i);
            due.swap(i, j);
        }
        for (from, m) in due {
            if !self.connected(from, m.to()) {
                continue;
            }
            if let Some(Some(n)) = self.nodes.get_mut(&m.to()) {
                match m {
                    Outbound::Raft(m) => {
                        if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                            self.report.snapshots += 1;
                        }
                        n.step(m)
                    }
                    Outbound::Snap { frame, .. } => {
                        n.receive_snap(from, frame).map_err(|e| format!("step {}: {e}", self.step))?
                    }
                }
            }
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let Some(n) = self.nodes.get_mut(&id).unwrap().as_mut() else {
                continue;
            };
            let rng = &mut self.rng;
            if n.election_timer_just_reset() {
                n.set_election_timeout(|lo, hi| rng.gen_range(lo..hi));
            }
            n.tick().map_err(|e| format!("node {id}: {e}"))?;
            // A commit left for the next append is announced after a while (the worker: 2 ms).
            if n.commit_unannounced() && rng.gen_bool(0.5) {
                n.announce_commit();
            }
            // A follower holds committed entries back at random while the chaos lasts (the
            // worker: while no request on it waits, for up to 5 ms), applying them at the
            // first step that does not.
            n.set_may_defer(self.cfg.propose_rate > 0.0 && rng.gen_bool(0.7));
            if n.election_timer_just_reset() {
                n.set_election_timeout(|lo, hi| rng.gen_range(lo..hi));
            }
            let mut out = Output::default();
            let mut msgs = Vec::new();
            n.handle_ready(&mut out, &mut |m| msgs.push(m)).map_err(|e| format!("node {id}: {e}"))?;
            self.report.failed_transfers += n.take_failed_transfers().len();
            self.report.deferred_applies += n.take_deferred_applies();
            self.refused.extend(out.refused);
            for (ctx, idx) in out.read_states {
                self.read_states.push((id, ctx, idx));
            }
            for c in out.completed {
                if c.result.duplicate {
                    continue;
                }
                if !self.applied_once.insert(c.id) {
                    return Err(format!("step {}: request {:?} applied twice (again at {})", self.step, c.id, c.index));
                }
                let is_put = self
                    .proposed
                    .iter()
                    .any(|(r, cmd)| *r == c.id && matches!(cmd, Command::Put { .. } | Command::Txn(_)));
                if is_put {
                    self.report.acknowledged += 1;
                    let key = self.key_of(id, c.index);
                    self.acked.insert(c.id, (key, c.result.revision));
                }
            }
            if let Some(t) = self.cfg.compact_threshold {
                let n = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
                n.maybe_compact(t, t / 10).map_err(|e| format!("node {id}: {e}"))?;
            }
            if let Some(r) = self.cfg.history_retention {
                let n = self.nodes.get_mut(&id).unwrap().as_mut().unwrap();
                // Once per point, as the worker does (it waits for the last one to apply).
                let due = n.history_compaction_due(r).filter(|at| self.compact_asked.get(&id) != Some(at));
                if let Some(at) = due {
                    self.compact_asked.insert(id, at);
                    self.seq += 1;
                    let _ = n.propose_compact(RequestId { node: id, nonce: 1, seq: self.seq }, at);
                }
            }
            for m in msgs {
                if self.rng.gen_bool(self.cfg.drop_rate) {
                    continue;
                }
                let copies = if self.rng.gen_bool(self.cfg.dup_rate) { 2 } else { 1 };
                for _ in 0..copies {
                    let at = self.step + self.rng.gen_range(1..=self.cfg.max_delay);
                    self.in_flight.push((at, id, m.clone()));
                }
            }
        }
        self.check()
    }

    fn key_of(&self, id: u64, index: u64) -> String {
        let mut b = self.backends[&id].clone();
        let e = b.read_entries(index, index + 1).expect("applied entry is stored");
        match Proposal::decode(&e[0].data).map(|p| p.cmd) {
            // The key every branch of the simulation's transactions writes.
            Ok(Command::Txn(t)) => match t.success.first() {
                Some(crate::txn::TxnOp::Put { key, .. }) => key.clone(),
                _ => String::new(),
            },
            Ok(cmd) => cmd.key().to_string(),
            Err(_) => String::new(),
        }
    }

    fn check(&mut self) -> Result<(), String> {
        for (id, n) in &self.nodes {
            let Some(n) = n else { continue };
            let st = n.status();
            if st.role == StateRole::Leader {
                match self.leaders.insert(st.term, *id) {
                    Some(other) if other != *id => {
                        return Err(format!("step {}: two leaders in term {}: {other} and {id}", self.step, st.term))
                    }
                    None => self.report.elections += 1,
                    _ => {}
                }
            }
            if !(st.applied <= st.commit && st.commit <= st.last_index) {
                return Err(format!(
                    "step {}: node {id}: applied {} commit {} last {}",
                    self.step, st.applied, st.commit, st.last_index
                ));
            }
        }
        // Committed entries never change; compare each node's stored committed prefix.
        for (id, b) in &self.backends {
            let mut b = b.clone();
            let s = b.load().unwrap();
            let lo = s.snapshot_index + 1;
            let hi = s.hard_state.commit.min(s.last_index);
            // Only look at the recently committed part (older entries were checked before).
            let from = lo.max(hi.saturating_sub(20));
            if from <= hi {
                for e in b.read_entries(from, hi + 1).unwrap() {
                    let cur = (e.term, e.data.to_vec());
                    if let Some(prev) = self.committed.get(&e.index) {
                        if *prev != cur {
                            return Err(format!(
                                "step {}: committed entry {} changed on node {id} (term {} -> {})",
                                self.step, e.index, prev.0, e.term
                            ));
                        }
                    } else {
                        self.committed.insert(e.index, cur);
                    }
                }
            }
            let applied = s.applied;
            let kv = b.kv_with_leases();
            match self.states.get(&applied) {
                Some(prev) if *prev != kv => {
                    return Err(format!("step {}: node {id} state at applied index {applied} differs", self.step))
                }
                Some(_) => {}
                None => {
                    self.states.insert(applied, kv);
                }
            }
        }
        Ok(())
    }
}

/// Runs `seeds` simulations; returns the first failing seed and its error.
pub fn run_seeds(seeds: impl Iterator<Item = u64>, cfg: &SimConfig) -> Result<Vec<SimReport>, (u64, String)> {
    let mut reports = Vec::new();
    for seed in seeds {
        match Sim::new(seed, cfg.clone()).run() {
            Ok(r) => reports.push(r),
            Err(e) => return Err((seed, e)),
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests;
