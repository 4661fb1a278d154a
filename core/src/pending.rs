//! Client requests a node is answering: writes waiting to be proposed, proposed writes
//! waiting to apply, and linearizable reads waiting for a read index and then for the
//! node to apply up to it.
//!
//! Retries are safe because every write carries its request id and the state machine applies
//! an id at most once: a write is proposed again when its log slot went to another entry, and
//! every unfinished write is proposed again when the leader changes (a forwarded proposal can
//! be lost silently). Reads ask again, with a fresh context, until answered or timed out,
//! since raft drops ReadIndex requests silently while no leader is known.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::command::{Command, Proposal, RequestId};
use crate::node::{MemberChange, Node, Output};
use crate::storage::Backend;

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Applied (writes: at `revision`, `flag` as in `ApplyResult`; `wrote`: whether this
    /// request's entry changed something, `None` when not known: a retry of one applied
    /// before, or not a write); for reads, `revision` is the read index, applied on this node,
    /// at or after which the read must be served.
    /// `refused`: why the state machine refused a write (it changed nothing).
    Done { revision: u64, flag: bool, wrote: Option<bool>, refused: Option<crate::lease::Refusal> },
    /// The write certainly did not happen.
    NotCommitted(&'static str),
    /// The write may or may not happen.
    Unknown(&'static str),
    /// A linearizable read could not be served; nothing was read.
    ReadFailed(&'static str),
    /// Not possible in the cluster's present state (a rolling upgrade not yet finished);
    /// certainly not applied.
    Refused(&'static str),
}

#[derive(Debug, Clone)]
enum WriteKind {
    Kv(Command),
    Member(MemberChange),
}

struct Write<T> {
    client: T,
    kind: WriteKind,
    deadline: Instant,
    /// Proposals of this write that may still be in some log (forwarded ones, or appended and
    /// not yet superseded). Zero means it certainly has not applied.
    live: u32,
    /// When it was last proposed.
    proposed_at: Option<Instant>,
    /// Refused before any log: some member cannot read its format yet.
    too_new: bool,
}

struct Transfer<T> {
    client: T,
    target: u64,
    deadline: Instant,
    asked: Option<Instant>,
}

struct Read<T> {
    client: T,
    deadline: Instant,
    /// When the last ReadIndex request covering it was made.
    asked: Option<Instant>,
    index: Option<u64>,
}

pub struct Pending<T> {
    me: u64,
    nonce: u64,
    seq: u64,
    writes: HashMap<RequestId, Write<T>>,
    unproposed: VecDeque<RequestId>,
    reads: HashMap<u64, Read<T>>,
    /// One ReadIndex request serves every read waiting when it was made: batch id → reads.
    read_batches: HashMap<u64, Vec<u64>>,
    transfers: Vec<Transfer<T>>,
    read_retry: Duration,
    last_leader: u64,
    /// The ReadIndex request asked for and not yet answered (batch, when), as in etcd's read
    /// loop: reads arriving meanwhile wait for its answer and share the next request. Each
    /// request costs a heartbeat round to every voter, and the followers' wake-ups for them;
    /// asking every pass cost 10-20 % of linearizable reads' throughput at 32 clients
    /// (measured in paired runs).
    read_in_flight: Option<(u64, Instant)>,
    /// Reads were held back by the request in flight at the last `drive`.
    held_back: bool,
}

/// A ReadIndex context unique cluster-wide: the leader ignores a context already pending,
/// whichever node sent it.
fn read_ctx(me: u64, nonce: u64, batch: u64) -> Vec<u8> {
    [me, nonce, batch].iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn parse_read_ctx(ctx: &[u8], me: u64, nonce: u64) -> Option<u64> {
    let word = |i: usize| ctx.get(i * 8..i * 8 + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    (ctx.len() == 24 && word(0) == Some(me) && word(1) == Some(nonce)).then(|| word(2)).flatten()
}

impl<T: Copy + PartialEq> Pending<T> {
    /// `nonce` must differ between incarnations of the node (see `RequestId`); `read_retry`
    /// is how long a read waits for an answer before asking again.
    pub fn new(me: u64, nonce: u64, read_retry: Duration) -> Self {
        Pending {
            me,
            nonce,
            seq: 0,
            writes: HashMap::new(),
            unproposed: VecDeque::new(),
            reads: HashMap::new(),
            read_batches: HashMap::new(),
            transfers: Vec::new(),
            read_retry,
            last_leader: 0,
            read_in_flight: None,
            held_back: false,
        }
    }

    /// Whether reads wait to be asked for and nothing stops asking now: the loop then runs
    /// another pass at once instead of sleeping.
    pub fn reads_to_ask(&self) -> bool {
        self.held_back && self.read_in_flight.is_none()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.reads.is_empty() && self.transfers.is_empty()
    }

    /// Tracks a write. With `client_key`, the client named the request: a retry of it, on
    /// any node, is answered with the first result instead of applied again.
    pub fn add_write(
        &mut self,
        client: T,
        cmd: Command,
        deadline: Instant,
        client_key: Option<&str>,
        answers: &mut Vec<(T, Answer)>,
    ) {
        let id = match client_key {
            Some(k) => RequestId::for_client_key(self.me, k),
            None => {
                self.seq += 1;
                RequestId { node: self.me, nonce: self.nonce, seq: self.seq }
            }
        };
        if self.writes.contains_key(&id) {
            answers.push((
                client,
                Answer::NotCommitted("a call with the same request_id is already in flight on this node"),
            ));
            return;
        }
        self.writes.insert(
            id,
            Write { client, kind: WriteKind::Kv(cmd), deadline, live: 0, proposed_at: None, too_new: false },
        );
        self.unproposed.push_back(id);
    }

    /// Tracks a membership change; answered when it applies on this node.
    pub fn add_change(&mut self, client: T, change: MemberChange, deadline: Instant) {
        self.seq += 1;
        let id = RequestId { node: self.me, nonce: self.nonce, seq: self.seq };
        self.writes.insert(
            id,
            Write { client, kind: WriteKind::Member(change), deadline, live: 0, proposed_at: None, too_new: false },
        );
        self.unproposed.push_back(id);
    }

    /// Tracks a leadership transfer; answered once `target` is the leader this node follows.
    pub fn add_transfer(&mut self, client: T, target: u64, deadline: Instant) {
        self.transfers.push(Transfer { client, target, deadline, asked: None });
    }

    pub fn add_read(&mut self, client: T, deadline: Instant) {
        self.seq += 1;
        self.reads.insert(self.seq, Read { client, deadline, asked: None, index: None });
    }

    /// The client went away: stop tracking its request (a write may still apply).
    pub fn forget(&mut self, client: T) {
        self.writes.retain(|_, w| w.client != client);
        self.reads.retain(|_, r| r.client != client);
        self.transfers.retain(|t| t.client != client);
    }

    /// Proposes what can be proposed and (re)asks for read indexes.
    pub fn drive<B: Backend>(&mut self, node: &mut Node<B>, now: Instant) {
        self.held_back = false;
        let leader = node.leader_id();
        if leader != 0 && leader != self.last_leader && self.last_leader != 0 {
            // A new leader: anything forwarded to the old one may be lost. Propose again;
            // the state machine applies each request id once.
            for (id, w) in &self.writes {
                // Membership changes are not deduplicated by the state machine: never twice.
                if w.live > 0 && matches!(w.kind, WriteKind::Kv(_)) && !self.unproposed.contains(id) {
                    self.unproposed.push_back(*id);
                }
            }
            for r in self.reads.values_mut() {
                if r.index.is_none() {
                    r.asked = None;
                }
            }
            self.read_in_flight = None;
        }
        if leader != 0 {
            self.last_leader = leader;
        }
        if leader != 0 && !node.is_leader() {
            // A forwarded proposal can be lost on the way (a connection that breaks, a leader
            // over its inbound share from this peer) with nothing telling us: propose again
            // what has not applied after a while. Each request id applies once.
            let resend = self.read_retry * 4;
            for (id, w) in &self.writes {
                let stale = w.proposed_at.is_some_and(|at| now.duration_since(at) >= resend);
                if stale && matches!(w.kind, WriteKind::Kv(_)) && !self.unproposed.contains(id) {
                    self.unproposed.push_back(*id);
                }
            }
        }
        while let Some(&id) = self.unproposed.front() {
            let Some(w) = self.writes.get_mut(&id) else {
                self.unproposed.pop_front();
                continue;
            };
            let proposed = match &w.kind {
                WriteKind::Kv(cmd) => node.propose(&Proposal { id, cmd: cmd.clone() }),
                WriteKind::Member(change) => node.propose_change(id, change),
            };
            match proposed {
                Ok(()) => {
                    w.live += 1;
                    w.proposed_at = Some(now);
                    self.unproposed.pop_front();
                }
                // Not before every member reads it: fails now, as certainly not applied.
                Err(crate::node::ProposeError::TooNew) => {
                    if w.live == 0 {
                        w.too_new = true;
                        w.deadline = now;
                    }
                    self.unproposed.pop_front();
                }
                // No leader (an election): wait for one.
                Err(_) => break,
            }
        }
        if leader == 0 {
            return;
        }
        for t in self.transfers.iter_mut() {
            let ask = match t.asked {
                Some(at) => now.duration_since(at) >= self.read_retry * 4,
                None => true,
            };
            if ask && leader != t.target {
                node.transfer_leader(t.target);
                t.asked = Some(now);
            }
        }
        // Every read waiting for an index shares one request: a read index obtained after a
        // read started is valid for it, whichever other reads it also serves.
        let ask: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_none() && r.asked.is_none_or(|at| now.duration_since(at) >= self.read_retry))
            .map(|(&id, _)| id)
            .collect();
        // One that goes unanswered (lost, or dropped by the leader) is given up after the
        // retry interval, like the reads it covers.
        let busy = self.read_in_flight.is_some_and(|(_, at)| now.duration_since(at) < self.read_retry);
        self.held_back = busy && !ask.is_empty();
        if !ask.is_empty() && !busy {
            // Forget requests that can no longer serve anyone (lost, or overtaken by another).
            let reads = &self.reads;
            self.read_batches.retain(|_, ids| ids.iter().any(|id| reads.get(id).is_some_and(|r| r.index.is_none())));
            self.seq += 1;
            node.read_index(read_ctx(self.me, self.nonce, self.seq));
            for id in &ask {
                self.reads.get_mut(id).expect("listed above").asked = Some(now);
            }
            self.read_batches.insert(self.seq, ask);
            self.read_in_flight = Some((self.seq, now));
        }
    }

    /// Takes the node's output: applied writes, superseded proposals, read indexes.
    pub fn on_output(&mut self, out: &mut Output, applied: u64, answers: &mut Vec<(T, Answer)>) {
        for c in out.completed.drain(..) {
            if let Some(w) = self.writes.remove(&c.id) {
                let wrote = (!c.result.duplicate).then_some(c.result.wrote);
                answers.push((
                    w.client,
                    Answer::Done { revision: c.result.revision, flag: c.result.flag, wrote, refused: c.result.refused },
                ));
            }
        }
        for id in out.refused.drain(..) {
            if self.writes.get(&id).is_some_and(|w| matches!(w.kind, WriteKind::Member(_))) {
                let w = self.writes.remove(&id).unwrap();
                answers.push((w.client, Answer::NotCommitted("another membership change was in progress")));
            }
        }
        // Certainly not applied: propose again while time is left.
        for id in out.superseded.drain(..) {
            let Some(w) = self.writes.get_mut(&id) else { continue };
            w.live = w.live.saturating_sub(1);
            if matches!(w.kind, WriteKind::Member(_)) {
                // The leader turns a change proposed while another is pending into an empty
                // entry: report it rather than retry.
                if w.live == 0 {
                    let w = self.writes.remove(&id).unwrap();
                    answers.push((w.client, Answer::NotCommitted("another membership change was in progress")));
                }
            } else if !self.unproposed.contains(&id) {
                self.unproposed.push_back(id);
            }
        }
        for (ctx, index) in out.read_states.drain(..) {
            let seq = parse_read_ctx(&ctx, self.me, self.nonce);
            if seq.is_some() && seq == self.read_in_flight.map(|(s, _)| s) {
                self.read_in_flight = None;
            }
            let batch = seq.and_then(|b| self.read_batches.remove(&b));
            for id in batch.unwrap_or_default() {
                if let Some(r) = self.reads.get_mut(&id) {
                    r.index.get_or_insert(index);
                }
            }
        }
        self.reads.retain(|_, r| match r.index {
            Some(index) if index <= applied => {
                answers.push((r.client, Answer::Done { revision: index, flag: false, wrote: None, refused: None }));
                false
            }
            _ => true,
        });
    }

    /// Answers transfers whose target now leads.
    pub fn check_transfers(&mut self, leader: u64, answers: &mut Vec<(T, Answer)>) {
        self.transfers.retain(|t| {
            if t.target == leader {
                answers.push((t.client, Answer::Done { revision: 0, flag: true, wrote: None, refused: None }));
                false
            } else {
                true
            }
        });
    }

    /// Fails every request whose deadline has passed.
    pub fn expire(&mut self, now: Instant, answers: &mut Vec<(T, Answer)>) {
        self.transfers.retain(|t| {
            if now < t.deadline {
                return true;
            }
            answers.push((t.client, Answer::NotCommitted("leadership did not move before raft_kv.apply_timeout")));
            false
        });
        self.writes.retain(|_, w| {
            if now < w.deadline {
                return true;
            }
            let answer = if w.too_new {
                Answer::Refused(
                    "not every member reads this command's log format yet: finish upgrading raft_kv on every node \
                     (raft_members() shows each member's version)",
                )
            } else if w.live == 0 {
                Answer::NotCommitted("no leader accepted the write before raft_kv.apply_timeout")
            } else {
                Answer::Unknown("the write was proposed but not applied before raft_kv.apply_timeout")
            };
            answers.push((w.client, answer));
            false
        });
        self.unproposed.retain(|id| self.writes.contains_key(id));
        self.reads.retain(|_, r| {
            if now < r.deadline {
                return true;
            }
            let why = if r.index.is_none() {
                "could not confirm the leader's read index before raft_kv.apply_timeout"
            } else {
                "this node did not apply up to the read index before raft_kv.apply_timeout"
            };
            answers.push((r.client, Answer::ReadFailed(why)));
            false
        });
    }

    /// Fails everything (the node is shutting down).
    pub fn fail_all(&mut self, why: &'static str, answers: &mut Vec<(T, Answer)>) {
        for (_, w) in self.writes.drain() {
            answers.push((w.client, if w.live > 0 { Answer::Unknown(why) } else { Answer::NotCommitted(why) }));
        }
        for (_, r) in self.reads.drain() {
            answers.push((r.client, Answer::ReadFailed(why)));
        }
        for t in self.transfers.drain(..) {
            answers.push((t.client, Answer::NotCommitted(why)));
        }
        self.unproposed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem_backend::MemBackend;
    use crate::node::NodeOptions;

    fn single_node() -> Node<MemBackend> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let one = crate::types::Member { id: 1, address: "a".into(), promote: false };
        let mut n = Node::open(MemBackend::new(), &NodeOptions::new(1), &[one], &logger).unwrap();
        for _ in 0..30 {
            n.tick().unwrap();
            let mut out = Output::default();
            n.handle_ready(&mut out, &mut |_| {}).unwrap();
        }
        assert!(n.is_leader());
        n
    }

    fn step(n: &mut Node<MemBackend>, p: &mut Pending<u32>, answers: &mut Vec<(u32, Answer)>) {
        let now = Instant::now();
        p.drive(n, now);
        let mut out = Output::default();
        n.handle_ready(&mut out, &mut |_| {}).unwrap();
        p.on_output(&mut out, n.status().applied, answers);
        p.expire(now, answers);
    }

    #[test]
    fn writes_and_reads_complete_on_a_single_node() {
        let mut n = single_node();
        let mut p = Pending::new(1, 7, Duration::from_millis(100));
        let far = Instant::now() + Duration::from_secs(60);
        let mut answers = Vec::new();
        p.add_write(1u32, Command::Put { key: "k".into(), value: "v".into() }, far, None, &mut answers);
        p.add_write(
            2,
            Command::Cas { key: "k".into(), expected: Some("v".into()), value: "w".into() },
            far,
            None,
            &mut answers,
        );
        p.add_read(3, far);
        for _ in 0..5 {
            step(&mut n, &mut p, &mut answers);
        }
        answers.sort_by_key(|a| a.0);
        assert_eq!(answers.len(), 3, "{answers:?}");
        let Answer::Done { revision: r1, flag: true, .. } = answers[0].1 else { panic!("{answers:?}") };
        let Answer::Done { revision: r2, flag: true, .. } = answers[1].1 else { panic!("{answers:?}") };
        assert!(r2 > r1);
        let Answer::Done { revision: ri, .. } = answers[2].1 else { panic!("{answers:?}") };
        assert!(ri >= 2);
        assert!(p.is_empty());
    }

    /// Node 2 of two, following node 1 after one heartbeat; nothing it sends is delivered.
    fn follower_of_node_1() -> Node<MemBackend> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let two: Vec<_> = (1..=2).map(|id| crate::types::Member { id, address: "a".into(), promote: false }).collect();
        let mut n = Node::open(MemBackend::new(), &NodeOptions::new(2), &two, &logger).unwrap();
        let mut hb = raft::eraftpb::Message::default();
        hb.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
        (hb.from, hb.to, hb.term) = (1, 2, n.status().term.max(1));
        n.step(hb);
        n
    }

    /// Runs the node's Ready: the contexts of the ReadIndex requests it sends (to node 1).
    fn asked(n: &mut Node<MemBackend>) -> Vec<Vec<u8>> {
        let mut out = Output::default();
        let mut ctxs = Vec::new();
        n.handle_ready(&mut out, &mut |m| {
            if let crate::node::Outbound::Raft(m) = m {
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgReadIndex {
                    ctxs.push(m.entries[0].data.to_vec());
                }
            }
        })
        .unwrap();
        ctxs
    }

    /// Node 1 answers the ReadIndex request `ctx` with index 0; what `p` then answers.
    fn answer_read_index(n: &mut Node<MemBackend>, p: &mut Pending<u32>, ctx: &[u8]) -> Vec<(u32, Answer)> {
        let mut resp = raft::eraftpb::Message::default();
        resp.set_msg_type(raft::eraftpb::MessageType::MsgReadIndexResp);
        (resp.from, resp.to, resp.term, resp.index) = (1, 2, n.status().term, 0);
        let mut e = raft::eraftpb::Entry::default();
        e.data = ctx.to_vec().into();
        resp.entries = vec![e].into();
        n.step(resp);
        let mut out = Output::default();
        n.handle_ready(&mut out, &mut |_| {}).unwrap();
        let mut answers = Vec::new();
        p.on_output(&mut out, 0, &mut answers);
        answers
    }

    #[test]
    fn reads_waiting_together_share_one_read_index_request() {
        // Node 2 follows node 1: every ReadIndex request it makes is a message to count.
        let mut n = follower_of_node_1();
        let retry = Duration::from_millis(10);
        let mut p = Pending::new(2, 7, retry);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        for c in 0..5u32 {
            p.add_read(c, far);
        }
        p.drive(&mut n, t0);
        let first = asked(&mut n);
        assert_eq!(first.len(), 1, "five waiting reads, one request");
        p.drive(&mut n, t0 + retry / 2);
        assert!(asked(&mut n).is_empty(), "not asked again before the retry interval");
        p.add_read(5, far);
        p.drive(&mut n, t0 + retry);
        assert_eq!(asked(&mut n).len(), 1, "the retry and the newcomer share one request");
        // The first request's answer serves the five reads it covered, not the newcomer.
        // (The second, asked after the first timed out, is still in flight.)
        let answers = answer_read_index(&mut n, &mut p, &first[0]);
        let mut done: Vec<u32> = answers.iter().map(|a| a.0).collect();
        done.sort();
        assert_eq!(done, vec![0, 1, 2, 3, 4]);
        assert!(!p.is_empty(), "the newcomer still waits");
    }

    #[test]
    fn reads_arriving_while_a_read_index_is_asked_wait_for_its_answer_then_share_one() {
        let mut n = follower_of_node_1();
        let retry = Duration::from_secs(10);
        let mut p = Pending::new(2, 7, retry);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        p.add_read(0u32, far);
        p.drive(&mut n, t0);
        let first = asked(&mut n);
        assert_eq!(first.len(), 1);
        assert!(!p.reads_to_ask());
        for c in 1..4 {
            p.add_read(c, far);
            p.drive(&mut n, t0 + Duration::from_millis(c as u64));
            assert!(asked(&mut n).is_empty(), "read {c} waits for the request in flight");
        }
        assert!(!p.reads_to_ask(), "nothing to do until the answer");
        let answers = answer_read_index(&mut n, &mut p, &first[0]);
        assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0]);
        assert!(p.reads_to_ask(), "the held-back reads are asked for without waiting for a wake-up");
        p.drive(&mut n, t0 + Duration::from_millis(5));
        assert_eq!(asked(&mut n).len(), 1, "the three held-back reads share one request");
        assert!(!p.reads_to_ask());
    }

    #[test]
    fn a_forwarded_write_lost_on_the_way_is_proposed_again() {
        // Node 2 follows node 1, whose messages we deliver but whose answers never come.
        let mut n = follower_of_node_1();
        assert_eq!(n.leader_id(), 1);
        let proposals = |n: &mut Node<MemBackend>| {
            let mut out = Output::default();
            let mut sent = 0;
            n.handle_ready(&mut out, &mut |m| {
                if let crate::node::Outbound::Raft(m) = m {
                    sent += (m.get_msg_type() == raft::eraftpb::MessageType::MsgPropose) as usize;
                }
            })
            .unwrap();
            sent
        };
        let retry = Duration::from_millis(10);
        let mut p = Pending::new(2, 7, retry);
        let t0 = Instant::now();
        let mut answers = Vec::new();
        p.add_write(
            1u32,
            Command::Put { key: "k".into(), value: "v".into() },
            t0 + Duration::from_secs(60),
            None,
            &mut answers,
        );
        p.drive(&mut n, t0);
        assert_eq!(proposals(&mut n), 1, "forwarded once");
        p.drive(&mut n, t0 + retry);
        assert_eq!(proposals(&mut n), 0, "not again before the resend interval");
        p.drive(&mut n, t0 + retry * 4);
        assert_eq!(proposals(&mut n), 1, "forwarded again once nothing came back");
        assert!(answers.is_empty());
    }

    #[test]
    fn deadlines_fail_with_the_right_certainty() {
        // A node with two unreachable peers never has a leader.
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let three: Vec<_> =
            (1..=3).map(|id| crate::types::Member { id, address: "a".into(), promote: false }).collect();
        let mut n = Node::open(MemBackend::new(), &NodeOptions::new(1), &three, &logger).unwrap();
        let mut p = Pending::new(1, 7, Duration::from_millis(1));
        let past = Instant::now();
        let mut answers = Vec::new();
        p.add_write(1u32, Command::Delete { key: "k".into() }, past, None, &mut answers);
        p.add_read(2, past);
        step(&mut n, &mut p, &mut answers);
        answers.sort_by_key(|a| a.0);
        assert!(matches!(answers[0].1, Answer::NotCommitted(_)), "{answers:?}");
        assert!(matches!(answers[1].1, Answer::ReadFailed(_)), "{answers:?}");
        p.add_write(3, Command::Delete { key: "k".into() }, past, None, &mut answers);
        p.forget(3);
        assert!(p.is_empty());
    }

    #[test]
    fn client_named_requests_apply_once_and_collide_while_in_flight() {
        let mut n = single_node();
        let mut p = Pending::new(1, 7, Duration::from_millis(100));
        let far = Instant::now() + Duration::from_secs(60);
        let mut answers = Vec::new();
        let put = |v: &str| Command::Put { key: "k".into(), value: v.into() };
        p.add_write(1u32, put("a"), far, Some("op-1"), &mut answers);
        p.add_write(2, put("a"), far, Some("op-1"), &mut answers);
        assert!(matches!(answers.pop(), Some((2, Answer::NotCommitted(_)))));
        for _ in 0..5 {
            step(&mut n, &mut p, &mut answers);
        }
        let Some((1, Answer::Done { revision: first, .. })) = answers.pop() else { panic!("{answers:?}") };
        p.add_write(3, put("b"), far, None, &mut answers);
        p.add_write(4, put("a"), far, Some("op-1"), &mut answers);
        for _ in 0..5 {
            step(&mut n, &mut p, &mut answers);
        }
        answers.sort_by_key(|a| a.0);
        // The retry answers with the first application's revision; the later write stands.
        assert_eq!(answers[1], (4, Answer::Done { revision: first, flag: true, wrote: None, refused: None }));
        let Answer::Done { revision: later, .. } = answers[0].1 else { panic!() };
        assert!(later > first);
    }
}
