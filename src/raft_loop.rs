//! The Raft worker's loop, in named steps: wait, receive from peers, tick, take requests from
//! backends, run the Ready, answer backends, maintenance (promotions, the cluster id,
//! compaction), publish the status. It owns the node, the transport and the request tracker;
//! only this (main) thread calls into Postgres.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use raft_kv_core::command::{Command, Proposal, RequestId};
use raft_kv_core::config::format_peers;
use raft_kv_core::lease::LeaseClock;
use raft_kv_core::node::{role_name, MemberChange, Node, NodeError, NodeStatus, Outbound, Output};
use raft_kv_core::pending::{Answer, Pending};
use raft_kv_core::raft::StateRole;
use raft_kv_core::snapshot::SnapFrame;
use raft_kv_core::transport::{frame_limit, Event, Security, Transport};
use raft_kv_core::types::Member;

use crate::freeze::BackgroundFreeze;
use crate::guc;
use crate::peers::Peers;
use crate::raft_log::RaftLog;
use crate::requests::{self, Taken};
use crate::settings::Settings;
use crate::shmem::set_state;
use crate::shmem::{Op, Outcome, Stats, SHARED};
use crate::spi::in_txn;
use crate::storage::PgBackend;

mod recovery;
mod wake;

use wake::{EventFd, Wake};

type Client = (usize, u64);

/// How long a commit of the leader's own writes may wait for an append to carry it to the
/// followers before it is sent on its own: at one client the next write comes sooner, and
/// a follower's `'local'` read or watch learns of an idle leader's last write this much later.
const COMMIT_ANNOUNCE_DELAY: Duration = Duration::from_millis(2);

/// How long committed entries may wait to be applied on a follower on which no request waits
/// (see `core/src/node/deferred_apply.rs`): a `'local'` read or a watch there sees a write
/// this much later.
const APPLY_DELAY: Duration = Duration::from_millis(5);

pub struct RaftLoop {
    me: u64,
    epoch: u64,
    tick: Duration,
    /// An election timeout: how long a promotion or a cluster-id proposal is given to apply.
    patience: Duration,
    wake: Wake,
    node: Node<PgBackend>,
    transport: Transport,
    peers: Peers,
    pending: Pending<Client>,
    raft_log: RaftLog,
    out: Output,
    taken: Vec<Taken>,
    abandoned: Vec<Client>,
    answers: Vec<(Client, Answer)>,
    next_tick: Instant,
    /// When to tell the followers a commit that no append has carried yet (see
    /// `Node::announce_or_defer`).
    announce_at: Option<Instant>,
    /// When a follower applies the committed entries it holds back.
    apply_at: Option<Instant>,
    /// Worker-internal proposals (promotions, the cluster id) have ids of their own.
    internal_nonce: u64,
    internal_seq: u64,
    promoting: BTreeMap<u64, Instant>,
    cluster_id: u128,
    cluster_id_asked: Option<Instant>,
    last_role: (StateRole, u64),
    sending: Vec<(u64, u64)>,
    published: Option<NodeStatus>,
    /// The revision and compaction point last published.
    published_revision: (u64, u64),
    /// The revision to send NOTIFY raft_kv with after this pass's answers.
    notify_due: Option<u64>,
    /// The history compaction last proposed, and when.
    compact_asked: Option<(u64, Instant)>,
    /// Why the node must stop (a log entry it cannot read), once it must.
    halted: Option<String>,
    /// (leader, term) of the last early election started, so it is logged once.
    early_election: Option<(u64, u64)>,
    /// When statistics held back by the last report must be flushed.
    stats_due: Option<Instant>,
    /// Dropped messages are logged at most once a second.
    dropped_since_log: u64,
    last_drop_log: Option<Instant>,
    /// Lease deadlines; the leader proposes the expiry of those past theirs.
    leases: LeaseClock,
    /// Counters for `raft_kv.stat`, and what was last published of them.
    stats: Stats,
    published_stats: Option<Stats>,
    published_at: Option<Instant>,
    /// Per peer: when a message last arrived (`mono_ms`), whether a connection is up.
    contact: BTreeMap<u64, (u64, bool)>,
    applied_seen: u64,
    /// The address the other nodes dial (this node's row in raft_members()).
    advertised: std::net::SocketAddr,
    /// Recovery requests taken this pass (restore, force a new cluster).
    recovery: Vec<(Op, Client)>,
    /// A forced new cluster waiting for its entries up to this index to apply, and its caller.
    forcing: Option<(u64, Client)>,
    /// The worker exits to be started again (after forcing a new cluster).
    restart: bool,
}

impl RaftLoop {
    /// Listens (retrying while the address is taken) and opens the node; `None` when told to
    /// exit meanwhile.
    pub fn start(settings: &Settings, epoch: u64) -> Option<RaftLoop> {
        let me = settings.cluster.node_id;
        let wake = Wake::new(EventFd::new());
        let mut transport = loop {
            let max_frame = frame_limit(guc::MAX_VALUE_BYTES.get() as usize);
            let security = settings.security.clone();
            match Transport::start(runtime(), me, settings.cluster.listen_addr, security, max_frame, wake.waker()) {
                Ok(t) => break t,
                Err(e) => {
                    let state = format!("cannot listen on {}: {e}", settings.cluster.listen_addr);
                    pgrx::warning!("raft_kv: {state}; retrying");
                    set_state(false, &state);
                    if !pause(Duration::from_secs(1)) {
                        return None;
                    }
                }
            }
        };
        let bootstrap: Vec<Member> = if settings.cluster.bootstraps() {
            settings
                .cluster
                .peers
                .iter()
                .map(|(&id, a)| Member { id, address: a.to_string(), promote: false })
                .collect()
        } else {
            Vec::new()
        };
        let raft_log = RaftLog::default();
        let logger = raft_log.logger();
        let backend = PgBackend::with_freezer(Box::new(BackgroundFreeze::new(&settings.database)));
        let node = in_txn(|| Node::open(backend, &settings.opts, &bootstrap, &logger))
            .unwrap_or_else(|e| pgrx::error!("raft_kv: cannot open the raft node: {e}"));
        transport.advertise(settings.cluster.advertise_addr);
        let mut peers = Peers::new(me, settings.cluster.peers.clone());
        peers.sync(&node, &mut transport);
        let (addr, peer_list) = (transport.local_addr(), format_peers(peers.addrs()));
        let addr = if addr == settings.cluster.advertise_addr {
            addr.to_string()
        } else {
            format!("{addr} (advertised as {})", settings.cluster.advertise_addr)
        };
        match &settings.security {
            Security::Tls(t) => pgrx::log!(
                "raft_kv: node {me} listening on {addr} with peers {peer_list} (mutual TLS, cluster \"{}\")",
                t.me.cluster
            ),
            Security::Plain => pgrx::warning!(
                "raft_kv: node {me} listening on {addr} with peers {peer_list} WITHOUT TLS (raft_kv.peer_tls = off): \
                 Raft traffic is neither authenticated nor encrypted; for development only"
            ),
        }
        if node.members().is_empty() && !node.is_member(me) {
            pgrx::log!("raft_kv: node {me} is not a member yet; it waits to be added with raft_join() on the cluster");
        }
        let cluster_id = node.cluster_id();
        transport.set_cluster_id(cluster_id);
        let mut leases = LeaseClock::default();
        let stored =
            in_txn(|| node.storage().leases()).unwrap_or_else(|e| pgrx::error!("raft_kv: cannot read the leases: {e}"));
        leases.load(stored, crate::shmem::mono_ms());
        // Reads ask again for a read index after about a heartbeat without an answer.
        let read_retry = settings.tick * settings.opts.heartbeat_ticks as u32 * 2;
        Some(RaftLoop {
            me,
            epoch,
            tick: settings.tick,
            patience: settings.tick * settings.opts.election_ticks as u32,
            wake,
            node,
            transport,
            peers,
            pending: Pending::new(me, RequestId::worker_nonce(rand_nonce()), read_retry),
            raft_log,
            out: Output::default(),
            taken: Vec::new(),
            abandoned: Vec::new(),
            answers: Vec::new(),
            next_tick: Instant::now() + settings.tick,
            announce_at: None,
            apply_at: None,
            internal_nonce: RequestId::worker_nonce(rand_nonce()),
            internal_seq: 0,
            promoting: BTreeMap::new(),
            cluster_id,
            cluster_id_asked: None,
            last_role: (StateRole::Follower, 0),
            sending: Vec::new(),
            published: None,
            published_revision: (u64::MAX, u64::MAX),
            notify_due: None,
            compact_asked: None,
            halted: None,
            early_election: None,
            stats_due: None,
            dropped_since_log: 0,
            last_drop_log: None,
            leases,
            stats: Stats::default(),
            published_stats: None,
            published_at: None,
            contact: BTreeMap::new(),
            applied_seen: 0,
            advertised: settings.cluster.advertise_addr,
            recovery: Vec::new(),
            forcing: None,
            restart: false,
        })
    }

    /// Runs until SIGTERM or postmaster death.
    pub fn run(mut self) {
        set_state(true, "running");
        while self.wait() {
            self.receive();
            let now = Instant::now();
            self.tick(now);
            self.take_requests(now);
            self.ready();
            if let Some(why) = self.halted.take() {
                self.halt(&why);
                return;
            }
            self.maintenance();
            // Before answering: a client that saw its write applied finds the revision published.
            self.publish_revision();
            self.answer();
            self.notify();
            self.raft_log.flush();
            self.publish_status();
            self.report_table_stats();
            if self.restart {
                return;
            }
        }
        self.hand_over_leadership();
        pgrx::log!("raft_kv: node {} shutting down", self.me);
        self.transport.shutdown();
    }

    /// On shutdown (SIGTERM: a smart or fast stop, a restart), a leader first hands leadership to
    /// its most caught-up voter, so the cluster does not wait out an election timeout: it keeps
    /// running its loop (replicating, answering) until that voter leads, for at most one
    /// election timeout.
    fn hand_over_leadership(&mut self) {
        if !self.node.is_leader() {
            return;
        }
        let st = self.node.status();
        let target = st
            .members
            .iter()
            .filter(|m| m.voter && m.id != self.me)
            .max_by_key(|m| (m.recent_active.unwrap_or(false), m.matched.unwrap_or(0)))
            .map(|m| m.id);
        let Some(target) = target else { return };
        let started = Instant::now();
        let deadline = started + self.patience;
        pgrx::log!("raft_kv: node {} is shutting down: handing leadership to node {target}", self.me);
        self.node.transfer_leader(target);
        while Instant::now() < deadline {
            self.sleep();
            self.receive();
            let now = Instant::now();
            self.tick(now);
            self.ready();
            if self.halted.is_some() {
                return;
            }
            self.answer();
            self.raft_log.flush();
            if self.node.leader_id() == target {
                pgrx::log!(
                    "raft_kv: node {target} leads after {} ms; node {} stops",
                    started.elapsed().as_millis(),
                    self.me
                );
                return;
            }
        }
        pgrx::log!(
            "raft_kv: node {target} did not take over within the election timeout; node {} stops anyway",
            self.me
        );
    }

    /// Stops for good (until the server restarts with an upgraded build): leaves the cluster,
    /// fails the waiting requests, and says why in raft_status().state and the server log.
    fn halt(self, why: &str) {
        pgrx::warning!("raft_kv: node {} stopped: {why}", self.me);
        self.transport.shutdown();
        set_state(false, &format!("stopped: {why}"));
        {
            let mut sh = SHARED.exclusive();
            requests::resolve_all(&mut sh, "the raft_kv worker stopped: it needs an upgrade");
        }
        while pause(Duration::from_secs(60)) {}
    }

    /// Sleeps until the next tick, a backend's request (the latch) or network input (the
    /// eventfd).
    fn sleep(&mut self) {
        if self.pending.reads_to_ask() || !self.transport.events().is_empty() {
            // Reads held back while another read index was asked for, or deliveries left for
            // this pass: go on now.
            self.wake.wait(0);
            return;
        }
        let until = [self.announce_at, self.apply_at].into_iter().flatten().fold(self.next_tick, Instant::min);
        // Rounded up: a wait rounded down to 0 ms would spin until the moment comes.
        self.wake.wait(until.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000) as i64);
    }

    /// `sleep`, then the signals: false when the worker must exit.
    fn wait(&mut self) -> bool {
        self.sleep();
        pgrx::check_for_interrupts!();
        if BackgroundWorker::sigterm_received() {
            return false;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: on the worker's main thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            self.transport.set_max_frame(frame_limit(guc::MAX_VALUE_BYTES.get() as usize));
        }
        self.wake.drain();
        true
    }

    /// Everything the transport delivered: messages and snapshot frames (from members only),
    /// hellos, connection changes, refusals.
    fn receive(&mut self) {
        let (node, peers, transport) = (&mut self.node, &mut self.peers, &mut self.transport);
        let (stats, contact) = (&mut self.stats, &mut self.contact);
        let mut unsent = Vec::new();
        // What was queued when the pass began, for at most half a tick: a snapshot transfer's
        // frames keep arriving while each is staged or answered with the next chunk, and the
        // pass must still come round to ticking (heartbeats) and to its Ready. What is left
        // waits for the next pass, which does not sleep (`sleep`).
        let (started, budget) = (Instant::now(), self.tick / 2);
        for _ in 0..transport.events().len() {
            if started.elapsed() > budget {
                break;
            }
            let Ok(delivery) = transport.events().try_recv() else { break };
            match delivery.event {
                Event::Message(m) => {
                    contact.entry(m.from).or_insert((0, true)).0 = crate::shmem::mono_ms();
                    if peers.admits(node, m.from) {
                        node.step(m);
                    }
                }
                Event::Hello { peer, addr, .. } => peers.hello(node, transport, peer, addr),
                Event::Refused { addr, reason, more } => {
                    let more =
                        if more > 0 { format!(" ({more} more refused since the last report)") } else { String::new() };
                    pgrx::log!("raft_kv: refused a peer connection from {addr}: {reason}{more}");
                }
                Event::Snap { from, frame } => {
                    if let SnapFrame::Chunk { rows, .. } = &frame {
                        stats.snapshot_bytes_received += rows.iter().map(|r| r.bytes() as u64).sum::<u64>();
                    }
                    if peers.admits(node, from) {
                        node.receive_snap(from, frame)
                            .unwrap_or_else(|e| pgrx::error!("raft_kv: storing a snapshot chunk failed: {e}"));
                        // The acknowledgement (follower) or the next chunks (leader) go now, not
                        // after every delivery of this pass is handled: else each side waits
                        // while the other works through a window of chunks.
                        let sent_bytes = &mut stats.snapshot_bytes_sent;
                        node.flush_outbox(&mut |m| send_out(transport, sent_bytes, &mut unsent, m));
                    }
                }
                Event::Unreachable { peer, snapshot_failed } => {
                    node.report_unreachable(peer);
                    if snapshot_failed {
                        node.send_failed(peer);
                    }
                }
                Event::Unsendable { peer, error } => {
                    pgrx::warning!("raft_kv: a message to node {peer} could not be encoded and was dropped: {error}")
                }
                Event::Gone { peer } => {
                    // The leader's process is gone (its host closed or refused the
                    // connection): elect a new one now rather than after the timeout.
                    let term = node.status().term;
                    if node.peer_gone(peer) && self.early_election != Some((peer, term)) {
                        self.early_election = Some((peer, term));
                        pgrx::log!(
                            "raft_kv: node {}: the connection to the leader, node {peer}, was closed by its host; \
                             starting an election early",
                            self.me
                        );
                    }
                }
                Event::Connected { peer, addr } => {
                    contact.entry(peer).or_insert((0, true)).1 = true;
                    pgrx::log!("raft_kv: connected to node {peer} at {addr}")
                }
                Event::Disconnected { peer, addr, error } => {
                    contact.entry(peer).or_insert((0, false)).1 = false;
                    pgrx::log!("raft_kv: lost connection to node {peer} at {addr}: {error}")
                }
            }
        }
        self.settle_unsent(unsent);
    }

    /// Tells raft (and a snapshot transfer) about what the transport could not take.
    fn settle_unsent(&mut self, unsent: Vec<(u64, bool)>) {
        self.stats.dropped_outbound += unsent.len() as u64;
        for (to, snap) in unsent {
            self.node.report_unreachable(to);
            if snap {
                self.node.send_failed(to);
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.announce_at.is_some_and(|at| now >= at) {
            self.announce_at = None;
            self.node.announce_commit();
        }
        if now >= self.next_tick {
            self.node.tick().unwrap_or_else(|e| pgrx::error!("raft_kv: storage failure: {e}"));
            self.next_tick += self.tick;
            if self.next_tick <= now {
                self.next_tick = now + self.tick;
            }
        }
    }

    /// Takes what backends submitted, forgets what they gave up on, and proposes.
    fn take_requests(&mut self, now: Instant) {
        requests::take_new(self.epoch, &mut self.taken, &mut self.abandoned);
        for client in self.abandoned.drain(..) {
            // The client is gone; a write may still apply, but nobody waits for it.
            self.pending.forget(client);
        }
        for t in self.taken.drain(..) {
            let client = (t.slot, t.gen);
            if t.op == Op::Read {
                self.stats.read_index_requests += 1;
            } else if !matches!(t.op, Op::Transfer | Op::Restore | Op::ForceNewCluster) {
                self.stats.proposals += 1;
                if !self.node.is_leader() {
                    self.stats.forwarded += 1;
                }
            }
            let cmd = match t.op {
                Op::Set if t.target == 0 => Command::Put { key: t.key, value: t.value },
                Op::Set => Command::PutLease { key: t.key, value: t.value, lease: t.target },
                Op::LeaseGrant => Command::LeaseGrant { id: t.target, ttl_ms: t.arg },
                Op::LeaseKeepAlive => Command::LeaseKeepAlive { id: t.target },
                Op::LeaseRevoke => Command::LeaseRevoke { id: t.target },
                Op::Delete => Command::Delete { key: t.key },
                Op::Cas => Command::Cas { key: t.key, expected: t.expected, value: t.value },
                // The backend built both from typed values; refuse anything else unapplied.
                Op::Txn => match serde_json::from_str::<raft_kv_core::txn::Txn>(&t.value) {
                    Ok(txn) if txn.validate().is_ok() => Command::Txn(txn),
                    _ => {
                        self.answers.push((client, Answer::NotCommitted("the transaction could not be decoded")));
                        continue;
                    }
                },
                Op::Compact => match t.value.parse() {
                    Ok(revision) => Command::Compact { revision },
                    Err(_) => {
                        self.answers
                            .push((client, Answer::NotCommitted("the compaction revision could not be decoded")));
                        continue;
                    }
                },
                Op::Read => {
                    self.pending.add_read(client, t.deadline);
                    continue;
                }
                Op::Join => {
                    let change = MemberChange::AddLearner { id: t.target, address: t.key, promote: !t.as_learner };
                    self.pending.add_change(client, change, t.deadline);
                    continue;
                }
                Op::Remove => {
                    self.pending.add_change(client, MemberChange::Remove { id: t.target }, t.deadline);
                    continue;
                }
                Op::Transfer => {
                    self.pending.add_transfer(client, t.target, t.deadline);
                    continue;
                }
                // Run after this pass's Ready, with nothing in flight (see `maintenance`).
                Op::Restore | Op::ForceNewCluster => {
                    self.recovery.push((t.op, client));
                    continue;
                }
            };
            self.pending.add_write(client, cmd, t.deadline, t.request_id.as_deref(), &mut self.answers);
        }
        self.pending.drive(&mut self.node, now);
    }

    /// Persists and applies the Ready, sends its messages, and settles what it answered.
    fn ready(&mut self) {
        let me = self.me;
        let mut unreachable = Vec::new();
        let transport = &self.transport;
        let started = Instant::now();
        // Entries wait only while nothing on this node waits for them, and not past their time.
        let due = self.apply_at.is_some_and(|at| started >= at);
        self.node.set_may_defer(!due && self.pending.is_empty() && self.recovery.is_empty());
        let snap_bytes = &mut self.stats.snapshot_bytes_sent;
        let done = self
            .node
            .handle_ready(&mut self.out, &mut |m: Outbound| send_out(transport, snap_bytes, &mut unreachable, m));
        match done {
            Ok(()) => {}
            Err(e @ NodeError::NeedsUpgrade { .. }) => {
                self.halted = Some(e.to_string());
                return;
            }
            Err(e) => pgrx::error!("raft_kv: storage failure: {e}"),
        }
        self.settle_unsent(unreachable);
        self.announce_at =
            deadline(self.announce_at, self.node.commit_unannounced(), Instant::now() + COMMIT_ANNOUNCE_DELAY);
        self.apply_at = deadline(self.apply_at, self.node.has_deferred(), started + APPLY_DELAY);
        let now = crate::shmem::mono_ms();
        if let Some(all) = self.out.leases_installed.take() {
            self.leases.load(all, now);
        }
        for (id, lease) in self.out.lease_changes.drain(..) {
            self.leases.applied(id, lease, now);
        }
        for (index, reason) in self.out.invalid.drain(..) {
            pgrx::warning!("raft_kv: skipped the log entry at index {index}: {reason}; every node skips it alike");
        }
        self.log_dropped();
        let applied = self.node.storage().applied();
        self.stats.applied_entries += applied.saturating_sub(self.applied_seen);
        self.stats.deferred_applies += self.node.take_deferred_applies();
        self.applied_seen = applied;
        if let Some(index) = self.out.snapshot_installed.take() {
            self.stats.snapshots_received += 1;
            pgrx::log!(
                "raft_kv: node {me} installed the snapshot at index {index} in {} ms",
                started.elapsed().as_millis()
            );
        }
        for (to, index) in self.node.take_failed_transfers() {
            self.stats.snapshots_failed += 1;
            pgrx::log!("raft_kv: the snapshot transfer at index {index} to node {to} failed; it will be sent again");
        }
        let transfers = self.node.snapshot_transfers();
        if transfers != self.sending {
            for (to, index) in transfers.iter().filter(|t| !self.sending.contains(t)) {
                self.stats.snapshots_sent += 1;
                pgrx::log!("raft_kv: sending the snapshot at index {index} to node {to}");
            }
            self.sending = transfers;
        }
        self.pending.on_output(&mut self.out, self.node.storage().applied(), &mut self.answers);
        self.pending.check_transfers(self.node.leader_id(), &mut self.answers);
        self.pending.expire(Instant::now(), &mut self.answers);
        if self.out.role_changed {
            self.out.role_changed = false;
            let st = self.node.status();
            if (st.role, st.leader_id) != self.last_role {
                let campaigning = |r: StateRole| matches!(r, StateRole::Candidate | StateRole::PreCandidate);
                if campaigning(st.role) && !campaigning(self.last_role.0) {
                    self.stats.elections_started += 1;
                }
                if st.leader_id != 0 && st.leader_id != self.last_role.1 {
                    self.stats.leader_changes += 1;
                }
                if st.role == StateRole::Leader && self.last_role.0 != StateRole::Leader {
                    self.stats.elections_won += 1;
                    // etcd's rule: a new leader gives every lease its full TTL again, so a
                    // failover never expires a live lease early.
                    self.leases.restart_all(now);
                }
                self.last_role = (st.role, st.leader_id);
                let leader = if st.leader_id == 0 { "unknown".to_string() } else { st.leader_id.to_string() };
                pgrx::log!("raft_kv: node {me} is {} in term {}; leader is {leader}", role_name(st.role), st.term);
            }
        }
    }

    /// Messages admission dropped, logged at most once a second.
    fn log_dropped(&mut self) {
        let dropped = self.node.take_dropped();
        if dropped.count == 0 {
            return;
        }
        self.stats.dropped_inbound += dropped.count;
        self.dropped_since_log += dropped.count;
        if self.last_drop_log.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        if let Some((from, kind, reason)) = dropped.last {
            pgrx::log!(
                "raft_kv: dropped {} malformed message(s) from peers; the latest, a {kind:?} from node {from}: {reason}",
                self.dropped_since_log
            );
        }
        self.dropped_since_log = 0;
        self.last_drop_log = Some(Instant::now());
    }

    /// Addresses, promotions of caught-up learners, the cluster id, compaction.
    fn maintenance(&mut self) {
        for (op, client) in std::mem::take(&mut self.recovery) {
            if op == Op::Restore {
                self.restore(client);
            } else {
                self.force_new_cluster(client);
            }
        }
        self.continue_force();
        self.peers.sync(&self.node, &mut self.transport);
        // The leader promotes caught-up learners that joined to become voters: together, in
        // one joint change, when several are ready.
        let patience = self.patience;
        let ready: Vec<u64> = self
            .node
            .learners_to_promote(guc::PROMOTE_LAG.get() as u64)
            .into_iter()
            .filter(|id| self.promoting.get(id).is_none_or(|at| at.elapsed() >= patience))
            .collect();
        if !ready.is_empty() {
            let rid = self.internal_id();
            if self.node.propose_change(rid, &MemberChange::Promote { ids: ready.clone() }).is_ok() {
                pgrx::log!("raft_kv: promoting learner(s) {ready:?} to voter");
                for id in ready {
                    self.promoting.insert(id, Instant::now());
                }
            }
        }
        // The first leader names the cluster with a random id; every hello carries it, so
        // nodes of another cluster (say, pointed here by mistake) are refused.
        if self.node.is_leader()
            && self.node.cluster_id() == 0
            && self.cluster_id_asked.is_none_or(|at| at.elapsed() >= patience)
        {
            let rid = self.internal_id();
            let id = (rand_nonce() as u128) << 64 | rand_nonce() as u128 | 1;
            if self.node.propose_cluster_id(rid, id).is_ok() {
                self.cluster_id_asked = Some(Instant::now());
            }
        }
        if self.node.cluster_id() != self.cluster_id {
            self.cluster_id = self.node.cluster_id();
            self.transport.set_cluster_id(self.cluster_id);
            pgrx::log!("raft_kv: node {} belongs to cluster id {:032x}", self.me, self.cluster_id);
        }
        // History retention: the leader compacts through the log, once per point (a proposal
        // that is lost is asked again after a while).
        if let Some(at) = self.node.history_compaction_due(guc::HISTORY_RETENTION.get() as u64) {
            if self.compact_asked.is_none_or(|(r, when)| r != at || when.elapsed() >= patience) {
                let rid = self.internal_id();
                if self.node.propose_compact(rid, at).is_ok() {
                    self.compact_asked = Some((at, Instant::now()));
                }
            }
        }
        // Leases past their deadline: the leader proposes their expiry, naming the refresh
        // count it saw (a keepalive that applies first makes the expiry do nothing).
        if self.node.is_leader() {
            for (id, refreshes) in self.leases.due(crate::shmem::mono_ms()) {
                let p = Proposal { id: self.internal_id(), cmd: Command::LeaseExpire { id, refreshes } };
                let _ = self.node.propose(&p);
            }
        }
        if let Some(deadlines) = self.leases.take_changed() {
            crate::shmem::publish_leases(&deadlines);
        }
        let threshold = guc::SNAPSHOT_THRESHOLD.get() as u64;
        if self
            .node
            .maybe_compact(threshold, (threshold / 10).max(10))
            .unwrap_or_else(|e| pgrx::error!("raft_kv: compaction failed: {e}"))
        {
            pgrx::debug1!("raft_kv: compacted the log");
        }
    }

    fn internal_id(&mut self) -> RequestId {
        self.internal_seq += 1;
        RequestId { node: self.me, nonce: self.internal_nonce, seq: self.internal_seq }
    }

    /// Hands every settled request's outcome to its backend.
    fn answer(&mut self) {
        if self.answers.is_empty() {
            return;
        }
        let stats = &mut self.stats;
        requests::complete_all(self.answers.drain(..).map(|(client, answer)| {
            let (outcome, reply, msg) = match answer {
                Answer::Done { revision, flag, wrote, refused } => {
                    (Outcome::Ok, (revision as i64, flag, wrote, refused.map_or(0, |r| r.code())), "")
                }
                Answer::NotCommitted(m) => (Outcome::NotCommitted, (0, false, None, 0), m),
                Answer::Unknown(m) => (Outcome::Unknown, (0, false, None, 0), m),
                Answer::Refused(m) => (Outcome::Refused, (0, false, None, 0), m),
                Answer::ReadFailed(m) => {
                    stats.read_index_failures += 1;
                    (Outcome::ReadFailed, (0, false, None, 0), m)
                }
            };
            (client, outcome, reply, msg)
        }));
    }

    /// Sends this process's table statistics to the cumulative statistics system, so autovacuum
    /// sees the worker's writes (dead log, kv and request rows) as it sees a backend's. As a
    /// backend does: at most once a second, and forced a second after statistics were first
    /// held back, since Postgres dates an unforced flush by the last commit, which keeps the
    /// writes before an idle spell (or a second of back-to-back ones) pending indefinitely.
    fn report_table_stats(&mut self) {
        let now = Instant::now();
        let force = self.stats_due.is_some_and(|due| now >= due);
        // SAFETY: on the main thread, outside any transaction (every pass ends committed).
        let wait_ms = unsafe { pg_sys::pgstat_report_stat(force) };
        if wait_ms <= 0 {
            self.stats_due = None;
        } else if force || self.stats_due.is_none() {
            // Counted from when statistics were first held back, not pushed on by each pass.
            self.stats_due = Some(now + Duration::from_millis(wait_ms.min(1000) as u64));
        }
    }

    /// When applying moved the revision: publishes it and wakes the watchers (`raft_watch`).
    /// The NOTIFY follows in `notify`, after the answers.
    fn publish_revision(&mut self) {
        let (revision, compact) = self.node.revisions();
        if (revision, compact) == self.published_revision {
            return;
        }
        if revision != self.published_revision.0 {
            self.notify_due = Some(revision);
        }
        self.published_revision = (revision, compact);
        crate::shmem::publish_revision(revision, compact);
    }

    /// Sends NOTIFY raft_kv with the revision applied this pass, once per pass, in a
    /// transaction of its own so that a full notification queue can never fail or stall an
    /// apply; after the answers, since its commit (which takes an xid) need not delay them.
    fn notify(&mut self) {
        if let Some(revision) = self.notify_due.take() {
            crate::spi::notify("raft_kv", &revision.to_string());
        }
    }

    /// Publishes the status for raft_status() and raft_members() when it changed.
    fn publish_status(&mut self) {
        let st = self.node.status();
        // Unchanged: publish again only once a second, for the peers' last contact.
        let fresh = self.published_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if self.published.as_ref() == Some(&st) && self.published_stats == Some(self.stats) && fresh {
            return;
        }
        self.published_at = Some(Instant::now());
        let mine = self.advertised;
        let mut sh = SHARED.exclusive();
        let s = &mut sh.status;
        let role = if st.removed {
            "removed"
        } else if st.members.is_empty() {
            "joining"
        } else {
            role_name(st.role)
        };
        s.role.set(role);
        s.cluster_id = st.cluster_id;
        s.change_pending = st.change_pending;
        s.term = st.term;
        s.leader_id = st.leader_id;
        s.commit = st.commit;
        s.applied = st.applied;
        s.first_index = st.first_index;
        s.last_index = st.last_index;
        s.snapshot_index = st.snapshot_index;
        s.snapshot_term = st.snapshot_term;
        let n = st.members.len().min(s.members.len());
        s.n_members = n as u32;
        for (row, m) in s.members.iter_mut().zip(st.members.iter()) {
            row.id = m.id;
            let addr = if m.id == st.id { Some(mine) } else { self.peers.addrs().get(&m.id).copied() };
            row.addr.set(&addr.map(|a| a.to_string()).unwrap_or_default());
            row.voter = m.voter;
            row.has_progress = m.matched.is_some();
            row.matched = m.matched.unwrap_or(0);
            row.active = m.recent_active.unwrap_or(false);
            let (last, up) = self.contact.get(&m.id).copied().unwrap_or((0, false));
            row.last_contact_ms = last;
            row.connected = up;
            let (format, version) = m.version.clone().unwrap_or((0, String::new()));
            row.format = format;
            row.version.set(&version);
        }
        s.stats = self.stats;
        drop(sh);
        self.published = Some(st);
        self.published_stats = Some(self.stats);
    }
}

/// Waits on the latch for `d`; false when the worker must exit.
pub fn pause(d: Duration) -> bool {
    let alive = BackgroundWorker::wait_latch(Some(d));
    if BackgroundWorker::sighup_received() {
        // SAFETY: on the worker's main thread, outside any transaction.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    alive
}

/// Builds the tokio runtime with every signal blocked in its threads, so Postgres's signals
/// (SIGTERM, SIGHUP, latch wake-ups) are always delivered to the main thread.
fn runtime() -> tokio::runtime::Runtime {
    // SAFETY: called on the worker's main thread; signals are unblocked again right after.
    unsafe { pg_sys::BackgroundWorkerBlockSignals() };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("raft_kv-net")
        .enable_all()
        // SAFETY: blocks signals in a thread tokio just created; touches no Postgres state.
        .on_thread_start(|| unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        })
        .build();
    // SAFETY: as above.
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    rt.unwrap_or_else(|e| pgrx::error!("raft_kv: cannot start the network runtime: {e}"))
}

/// 64 random bits from the kernel (getrandom), mixed with the pid in case it fails.
/// A deadline for something left for later: kept while it is still left, set to `first` when
/// it was not, gone once it is done.
fn deadline(at: Option<Instant>, left: bool, first: Instant) -> Option<Instant> {
    left.then(|| at.unwrap_or(first))
}

fn rand_nonce() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: fills the 8-byte buffer it is given.
    unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    // SAFETY: MyProcPid is set before any worker code runs.
    u64::from_le_bytes(b) ^ (unsafe { pg_sys::MyProcPid } as u64)
}

/// Hands `m` to the transport, counting a chunk's bytes; what it cannot take goes to `unsent`
/// as (peer, whether it was a snapshot frame).
fn send_out(transport: &Transport, chunk_bytes: &mut u64, unsent: &mut Vec<(u64, bool)>, m: Outbound) {
    let (to, snap) = (m.to(), matches!(m, Outbound::Snap { .. }));
    if let Outbound::Snap { frame: SnapFrame::Chunk { rows, .. }, .. } = &m {
        *chunk_bytes += rows.iter().map(|r| r.bytes() as u64).sum::<u64>();
    }
    if !transport.send(m) {
        unsent.push((to, snap));
    }
}
