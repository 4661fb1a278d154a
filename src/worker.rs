//! The background worker: hosts the Raft node and owns all of its I/O.
//!
//! Only this process's main thread calls into Postgres. The transport's tokio threads hand
//! messages over a channel and write to an eventfd; backends set the worker's latch. One
//! `WaitLatchOrSocket` waits for both, or for the next tick.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use raft_kv_core::command::{Command, RequestId};
use raft_kv_core::config::{format_peers, ClusterConfig};
use raft_kv_core::node::{role_name, MemberChange, Node, NodeOptions, NodeStatus, Outbound, Output};
use raft_kv_core::pending::{Answer, Pending};
use raft_kv_core::raft::StateRole;
use raft_kv_core::state_machine::Member;
use raft_kv_core::tls::TlsSetup;
use raft_kv_core::transport::{frame_limit, Event, Security, Transport, Waker};

use crate::guc;
use crate::requests::{self, Taken};
use crate::shmem::{Op, Outcome, SHARED};
use crate::storage::{in_txn, pin_search_path, PgBackend};

pub fn register() {
    BackgroundWorkerBuilder::new("raft_kv worker")
        .set_type("raft_kv worker")
        .set_function("raft_kv_worker_main")
        .set_library("raft_kv")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Settings the worker runs with, read once at start (they are all postmaster-level).
struct Settings {
    cluster: ClusterConfig,
    database: String,
    tick: Duration,
    opts: NodeOptions,
    security: Security,
}

/// A path setting, relative to the data directory unless absolute (as Postgres's own).
fn path_setting(s: &pgrx::guc::GucSetting<Option<std::ffi::CString>>, name: &str) -> Result<PathBuf, String> {
    let p = guc::string(s).filter(|p| !p.is_empty()).ok_or_else(|| format!("{name} is not set"))?;
    // SAFETY: DataDir is set before any worker starts and never changes.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    Ok(Path::new(&data).join(p))
}

/// Mutual TLS from the certificate settings, or the development-only plain mode.
fn security(cluster: &ClusterConfig) -> Result<Security, String> {
    if !guc::PEER_TLS.get() {
        if !cluster.listen_addr.ip().is_loopback() {
            return Err(format!(
                "raft_kv.peer_tls = off is for development only and needs a loopback raft_kv.listen_addr, not {}",
                cluster.listen_addr
            ));
        }
        return Ok(Security::Plain);
    }
    let cert = path_setting(&guc::SSL_CERT_FILE, "raft_kv.ssl_cert_file")?;
    let key = path_setting(&guc::SSL_KEY_FILE, "raft_kv.ssl_key_file")?;
    let ca = path_setting(&guc::SSL_CA_FILE, "raft_kv.ssl_ca_file")?;
    let tls = TlsSetup::load(&cert, &key, &ca, cluster.node_id).map_err(|e| format!("raft_kv peer TLS: {e}"))?;
    Ok(Security::Tls(Arc::new(tls)))
}

fn read_settings() -> Result<Settings, String> {
    let listen = guc::string(&guc::LISTEN_ADDR);
    let peers = guc::string(&guc::PEERS);
    let cluster = ClusterConfig::from_settings(guc::NODE_ID.get() as i64, listen.as_deref(), peers.as_deref())
        .map_err(|e| e.to_string())?;
    let (election, heartbeat) = (guc::ELECTION_TICKS.get(), guc::HEARTBEAT_TICKS.get());
    if heartbeat >= election {
        return Err(format!(
            "raft_kv.heartbeat_ticks ({heartbeat}) must be less than raft_kv.election_ticks ({election})"
        ));
    }
    let database = guc::string(&guc::DATABASE).filter(|d| !d.is_empty()).ok_or("raft_kv.database is empty")?;
    let mut opts = NodeOptions::new(cluster.node_id);
    opts.election_ticks = election as usize;
    opts.heartbeat_ticks = heartbeat as usize;
    let security = security(&cluster)?;
    Ok(Settings { cluster, database, tick: Duration::from_millis(guc::TICK_MS.get() as u64), opts, security })
}

fn set_state(running: bool, state: &str) {
    let mut sh = SHARED.exclusive();
    sh.status.running = running;
    sh.status.state.set(state);
}

/// Waits on the latch for `d`; false when the worker must exit.
fn pause(d: Duration) -> bool {
    let alive = BackgroundWorker::wait_latch(Some(d));
    if BackgroundWorker::sighup_received() {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    alive
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn raft_kv_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let epoch = {
        let mut sh = SHARED.exclusive();
        sh.status.epoch += 1;
        sh.status.worker_pid = unsafe { pg_sys::MyProcPid };
        sh.status.worker_procno = crate::shmem::my_procno();
        sh.status.running = false;
        sh.status.state.set("starting");
        sh.status.node_id = guc::NODE_ID.get().max(0) as u64;
        sh.status.listen_addr.set(&guc::string(&guc::LISTEN_ADDR).unwrap_or_default());
        sh.status.peers.set(&guc::string(&guc::PEERS).unwrap_or_default());
        requests::resolve_all(&mut sh, "the raft_kv worker restarted while the request was in flight");
        sh.status.epoch
    };

    let settings = match read_settings() {
        Ok(s) => s,
        Err(e) => {
            let state = format!("configuration error: {e}");
            pgrx::warning!("raft_kv: {state}; the node stays down until the setting is fixed and the server restarted");
            set_state(false, &state);
            while pause(Duration::from_secs(60)) {}
            return exit_cleanly();
        }
    };

    BackgroundWorker::connect_worker_to_spi(Some(&settings.database), None);
    pin_search_path();
    let mut announced = false;
    loop {
        let present = in_txn(|| {
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'raft_kv')")
                .ok()
                .flatten()
                .unwrap_or(false)
        });
        if present {
            break;
        }
        if !announced {
            announced = true;
            let state = format!("waiting for CREATE EXTENSION raft_kv in database \"{}\"", settings.database);
            pgrx::log!("raft_kv: {state}");
            set_state(false, &state);
        }
        if !pause(Duration::from_millis(500)) {
            return exit_cleanly();
        }
    }

    run(settings, epoch);
    exit_cleanly();
}

/// Fails every waiting request and exits with code 1, so the postmaster starts the worker
/// again (after `pg_terminate_backend`, say) unless the whole server is shutting down.
fn exit_cleanly() {
    {
        let mut sh = SHARED.exclusive();
        sh.status.running = false;
        sh.status.worker_procno = -1;
        sh.status.worker_pid = 0;
        sh.status.state.set("stopped");
        requests::resolve_all(&mut sh, "the raft_kv worker stopped while the request was in flight");
    }
    unsafe { pg_sys::proc_exit(1) };
}

/// An eventfd the transport threads write to, so the latch wait also wakes for network input.
struct EventFd(RawFd);

impl EventFd {
    fn new() -> Self {
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            pgrx::error!("raft_kv: eventfd failed: {}", std::io::Error::last_os_error());
        }
        EventFd(fd)
    }
    fn waker(&self) -> Waker {
        let fd = self.0;
        Arc::new(move || {
            let one: u64 = 1;
            unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
        })
    }
    fn drain(&self) {
        let mut v: u64 = 0;
        unsafe { libc::read(self.0, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

/// Builds the tokio runtime with every signal blocked in its threads, so Postgres's signals
/// (SIGTERM, SIGHUP, latch wake-ups) are always delivered to the main thread.
fn runtime() -> tokio::runtime::Runtime {
    unsafe { pg_sys::BackgroundWorkerBlockSignals() };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("raft_kv-net")
        .enable_all()
        .on_thread_start(|| unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        })
        .build();
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    rt.unwrap_or_else(|e| pgrx::error!("raft_kv: cannot start the network runtime: {e}"))
}

fn run(settings: Settings, epoch: u64) {
    let me = settings.cluster.node_id;
    let efd = EventFd::new();
    let mut transport = loop {
        let max_frame = frame_limit(guc::MAX_VALUE_BYTES.get() as usize);
        let security = settings.security.clone();
        match Transport::start(runtime(), me, settings.cluster.listen_addr, security, max_frame, efd.waker()) {
            Ok(t) => break t,
            Err(e) => {
                let state = format!("cannot listen on {}: {e}", settings.cluster.listen_addr);
                pgrx::warning!("raft_kv: {state}; retrying");
                set_state(false, &state);
                if !pause(Duration::from_secs(1)) {
                    return;
                }
            }
        }
    };
    let bootstrap: Vec<Member> = if settings.cluster.bootstraps() {
        settings.cluster.peers.iter().map(|(&id, a)| Member { id, address: a.to_string(), promote: false }).collect()
    } else {
        Vec::new()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut node = in_txn(|| {
        Node::open(PgBackend::with_background_freeze(&settings.database), &settings.opts, &bootstrap, &logger)
    })
    .unwrap_or_else(|e| pgrx::error!("raft_kv: cannot open the raft node: {e}"));
    let mut peers =
        Peers { me, configured: settings.cluster.peers.clone(), learned: BTreeMap::new(), addrs: BTreeMap::new() };
    peers.sync(&node, &mut transport);
    let (addr, peer_list) = (transport.local_addr(), format_peers(&peers.addrs));
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
    let mut promoting: BTreeMap<u64, Instant> = BTreeMap::new();
    let internal_nonce = RequestId::worker_nonce(rand_nonce());
    let mut internal_seq = 0u64;

    // Reads ask again for a read index after about a heartbeat without an answer.
    let read_retry = settings.tick * settings.opts.heartbeat_ticks as u32 * 2;
    let mut pending: Pending<(usize, u64)> = Pending::new(me, RequestId::worker_nonce(rand_nonce()), read_retry);
    let mut taken: Vec<Taken> = Vec::new();
    let mut abandoned: Vec<(usize, u64)> = Vec::new();
    let mut answers: Vec<((usize, u64), Answer)> = Vec::new();
    let mut published: Option<NodeStatus> = None;
    let mut next_tick = Instant::now() + settings.tick;
    let mut out = Output::default();
    let mut last_role = (StateRole::Follower, 0u64);
    let mut sending: Vec<(u64, u64)> = Vec::new();
    let mut cluster_id = node.cluster_id();
    transport.set_cluster_id(cluster_id);
    let mut cluster_id_asked: Option<Instant> = None;
    // Dropped messages are logged at most once a second.
    let mut dropped_since_log = 0u64;
    let mut last_drop_log: Option<Instant> = None;

    set_state(true, "running");
    loop {
        let wait_ms = next_tick.saturating_duration_since(Instant::now()).as_millis() as std::ffi::c_long;
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_SOCKET_READABLE | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                    as i32,
                efd.0,
                wait_ms,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: on the worker's main thread, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            transport.set_max_frame(frame_limit(guc::MAX_VALUE_BYTES.get() as usize));
        }
        efd.drain();

        while let Ok(delivery) = transport.events().try_recv() {
            match delivery.event {
                Event::Message(m) => {
                    if peers.admits(&node, m.from) {
                        node.step(m);
                    }
                }
                Event::Hello { peer, addr, .. } => {
                    // Only a node waiting to be added learns addresses this way (from an
                    // authenticated peer): members know theirs from the log.
                    if node.members().is_empty() && !peers.addrs.contains_key(&peer) {
                        peers.learned.insert(peer, addr);
                        peers.sync(&node, &mut transport);
                    }
                }
                Event::Refused { addr, reason, more } => {
                    let more = if more > 0 { format!(" ({more} more refused since the last report)") } else { String::new() };
                    pgrx::log!("raft_kv: refused a peer connection from {addr}: {reason}{more}");
                }
                Event::Snap { from, frame } => {
                    if peers.admits(&node, from) {
                        node.receive_snap(from, frame)
                            .unwrap_or_else(|e| pgrx::error!("raft_kv: storing a snapshot chunk failed: {e}"));
                    }
                }
                Event::Unreachable { peer, snapshot_failed } => {
                    node.report_unreachable(peer);
                    if snapshot_failed {
                        node.send_failed(peer);
                    }
                }
                Event::Connected { peer, addr } => pgrx::log!("raft_kv: connected to node {peer} at {addr}"),
                Event::Disconnected { peer, addr, error } => {
                    pgrx::log!("raft_kv: lost connection to node {peer} at {addr}: {error}")
                }
            }
        }

        let now = Instant::now();
        if now >= next_tick {
            node.tick().unwrap_or_else(|e| pgrx::error!("raft_kv: storage failure: {e}"));
            next_tick += settings.tick;
            if next_tick <= now {
                next_tick = now + settings.tick;
            }
        }

        requests::take_new(epoch, &mut taken, &mut abandoned);
        for client in abandoned.drain(..) {
            // The client is gone; a write may still apply, but nobody waits for it.
            pending.forget(client);
        }
        for t in taken.drain(..) {
            let client = (t.slot, t.gen);
            let cmd = match t.op {
                Op::Set => Command::Put { key: t.key, value: t.value },
                Op::Delete => Command::Delete { key: t.key },
                Op::Cas => Command::Cas { key: t.key, expected: t.expected, value: t.value },
                Op::Read => {
                    pending.add_read(client, t.deadline);
                    continue;
                }
                Op::Join => {
                    let change = MemberChange::AddLearner { id: t.target, address: t.key, promote: !t.as_learner };
                    pending.add_change(client, change, t.deadline);
                    continue;
                }
                Op::Remove => {
                    pending.add_change(client, MemberChange::Remove { id: t.target }, t.deadline);
                    continue;
                }
                Op::Transfer => {
                    pending.add_transfer(client, t.target, t.deadline);
                    continue;
                }
            };
            pending.add_write(client, cmd, t.deadline, t.request_id.as_deref(), &mut answers);
        }
        pending.drive(&mut node, now);

        let mut unreachable = Vec::new();
        node.handle_ready(&mut out, &mut |m: Outbound| {
            let (to, snap) = (m.to(), matches!(m, Outbound::Snap { .. }));
            if !transport.send(m) {
                unreachable.push((to, snap));
            }
        })
        .unwrap_or_else(|e| pgrx::error!("raft_kv: storage failure: {e}"));
        for (to, snap) in unreachable {
            node.report_unreachable(to);
            if snap {
                node.send_failed(to);
            }
        }
        for (index, reason) in out.invalid.drain(..) {
            pgrx::warning!("raft_kv: skipped the log entry at index {index}: {reason}; every node skips it alike");
        }
        let dropped = node.take_dropped();
        if dropped.count > 0 {
            dropped_since_log += dropped.count;
            if last_drop_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                if let Some((from, kind, reason)) = dropped.last {
                    pgrx::log!(
                        "raft_kv: dropped {dropped_since_log} malformed message(s) from peers; the latest, a {kind:?} from node {from}: {reason}"
                    );
                }
                dropped_since_log = 0;
                last_drop_log = Some(Instant::now());
            }
        }
        if let Some(index) = out.snapshot_installed.take() {
            pgrx::log!("raft_kv: node {me} installed the snapshot at index {index}");
        }
        for (to, index) in node.take_failed_transfers() {
            pgrx::log!("raft_kv: the snapshot transfer at index {index} to node {to} failed; it will be sent again");
        }
        let transfers = node.snapshot_transfers();
        if transfers != sending {
            for (to, index) in transfers.iter().filter(|t| !sending.contains(t)) {
                pgrx::log!("raft_kv: sending the snapshot at index {index} to node {to}");
            }
            sending = transfers;
        }
        pending.on_output(&mut out, node.storage().applied(), &mut answers);
        pending.check_transfers(node.leader_id(), &mut answers);
        pending.expire(Instant::now(), &mut answers);
        peers.sync(&node, &mut transport);
        // The leader promotes caught-up learners that joined to become voters: together, in
        // one joint change, when several are ready.
        let ready: Vec<u64> = node
            .learners_to_promote(guc::PROMOTE_LAG.get() as u64)
            .into_iter()
            .filter(|id| {
                promoting.get(id).is_none_or(|at| at.elapsed() >= settings.tick * settings.opts.election_ticks as u32)
            })
            .collect();
        if !ready.is_empty() {
            internal_seq += 1;
            let rid = RequestId { node: me, nonce: internal_nonce, seq: internal_seq };
            if node.propose_change(rid, &MemberChange::Promote { ids: ready.clone() }).is_ok() {
                pgrx::log!("raft_kv: promoting learner(s) {ready:?} to voter");
                for id in ready {
                    promoting.insert(id, Instant::now());
                }
            }
        }
        // The first leader names the cluster with a random id; every hello carries it, so
        // nodes of another cluster (say, pointed here by mistake) are refused.
        if node.is_leader()
            && node.cluster_id() == 0
            && cluster_id_asked.is_none_or(|at| at.elapsed() >= settings.tick * settings.opts.election_ticks as u32)
        {
            internal_seq += 1;
            let rid = RequestId { node: me, nonce: internal_nonce, seq: internal_seq };
            let id = (rand_nonce() as u128) << 64 | rand_nonce() as u128 | 1;
            if node.propose_cluster_id(rid, id).is_ok() {
                cluster_id_asked = Some(Instant::now());
            }
        }
        if node.cluster_id() != cluster_id {
            cluster_id = node.cluster_id();
            transport.set_cluster_id(cluster_id);
            pgrx::log!("raft_kv: node {me} belongs to cluster id {cluster_id:032x}");
        }
        let threshold = guc::SNAPSHOT_THRESHOLD.get() as u64;
        if node
            .maybe_compact(threshold, (threshold / 10).max(10))
            .unwrap_or_else(|e| pgrx::error!("raft_kv: compaction failed: {e}"))
        {
            pgrx::debug1!("raft_kv: compacted the log");
        }
        for ((slot, gen), answer) in answers.drain(..) {
            let (outcome, rev, flag, msg) = match answer {
                Answer::Done { revision, flag } => (Outcome::Ok, revision as i64, flag, ""),
                Answer::NotCommitted(m) => (Outcome::NotCommitted, 0, false, m),
                Answer::Unknown(m) => (Outcome::Unknown, 0, false, m),
                Answer::ReadFailed(m) => (Outcome::ReadFailed, 0, false, m),
            };
            requests::complete(slot, gen, outcome, rev, flag, msg);
        }
        if out.role_changed {
            out.role_changed = false;
            let st = node.status();
            if (st.role, st.leader_id) != last_role {
                last_role = (st.role, st.leader_id);
                pgrx::log!(
                    "raft_kv: node {me} is {} in term {}; leader is {}",
                    role_name(st.role),
                    st.term,
                    if st.leader_id == 0 { "unknown".to_string() } else { st.leader_id.to_string() }
                );
            }
        }

        let st = node.status();
        if published.as_ref() != Some(&st) {
            publish(&st, &peers.addrs, transport.local_addr());
            published = Some(st);
        }
    }
    pgrx::log!("raft_kv: node {me} shutting down");
    transport.shutdown();
}

fn rand_nonce() -> u64 {
    let mut b = [0u8; 8];
    unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    u64::from_le_bytes(b) ^ (unsafe { pg_sys::MyProcPid } as u64)
}

/// Where each other node is reached: the addresses raft_kv.peers gives win (an operator's
/// word, and the tests' proxies), then those the log recorded, then those learned from a
/// peer's hello. Keeps the transport's peers in step.
struct Peers {
    me: u64,
    configured: BTreeMap<u64, SocketAddr>,
    learned: BTreeMap<u64, SocketAddr>,
    addrs: BTreeMap<u64, SocketAddr>,
}

impl Peers {
    /// Only members speak to us (a removed node is no longer one), except to a node that
    /// belongs to no cluster yet: it waits for a leader to add it.
    fn admits<B: raft_kv_core::storage::Backend>(&self, node: &Node<B>, from: u64) -> bool {
        let blank = !node.is_member(self.me) && node.members().is_empty();
        blank || node.is_member(from)
    }

    fn sync<B: raft_kv_core::storage::Backend>(&mut self, node: &Node<B>, transport: &mut Transport) {
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

fn publish(st: &NodeStatus, addrs: &BTreeMap<u64, SocketAddr>, mine: SocketAddr) {
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
        let addr = if m.id == st.id { Some(mine) } else { addrs.get(&m.id).copied() };
        row.addr.set(&addr.map(|a| a.to_string()).unwrap_or_default());
        row.voter = m.voter;
        row.has_progress = m.matched.is_some();
        row.matched = m.matched.unwrap_or(0);
        row.active = m.recent_active.unwrap_or(false);
    }
}
