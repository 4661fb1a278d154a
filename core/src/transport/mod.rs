//! The Raft port: mutually authenticated TLS connections to and from peers, run on tokio
//! threads that never touch Postgres.
//!
//! Outbound: one connection and one bounded queue per peer. `send` never blocks: when a
//! peer's queue is full (the peer is dead, paused or slow) the message is dropped and the
//! caller reports the peer unreachable to raft, which retries on its own schedule.
//! Inbound: every accepted connection must finish the TLS handshake and say hello within
//! [`HANDSHAKE_TIMEOUT`]; the identity its certificate proves must be the node its hello
//! names and the `from` of every message it carries. Nothing is decoded before that. Frames
//! are tokio-util length-delimited, the length checked against the limit before anything is
//! allocated: a hello first, then each frame a kind byte and a body — `M` and a protobuf
//! `eraftpb::Message`, `S` and a snapshot frame, `K` (keepalive, empty).
//! Anything else ends the connection, and is reported as an [`Event::Refused`] at most once
//! a second (with a count of what was not reported), so a flood cannot flood the log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel as cb;
use futures::StreamExt;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::node::Outbound;
use crate::snapshot::SnapFrame;
use crate::tls::{identity_of, TlsSetup};

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 1024;
/// Inbound messages buffered for the main loop before new ones are dropped.
pub const INBOUND_QUEUE: usize = 16384;
/// Connections still in their handshake at once; more are closed at once.
pub const MAX_HANDSHAKING: usize = 128;
/// Authenticated connections from one peer at once.
pub const MAX_CONNS_PER_PEER: usize = 4;
/// Inbound messages one connection may have waiting for the main loop: a flooding peer fills
/// its own share, never another peer's (`INBOUND_QUEUE` holds every peer's share).
pub const PER_CONN_INFLIGHT: usize = 256;
/// A new connection must finish TLS and say hello within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// An inbound connection silent this long is closed; writers send keepalives well within it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE: Duration = Duration::from_secs(10);

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The largest frame for values up to `max_value_bytes`: one raft message carries up to 1 MiB
/// of entries plus one entry of any size, and an entry (a CAS) holds up to two values.
pub fn frame_limit(max_value_bytes: usize) -> usize {
    (1 << 20) + 2 * max_value_bytes + (64 << 10)
}

/// How the port authenticates peers.
#[derive(Clone, Debug)]
pub enum Security {
    Tls(Arc<TlsSetup>),
    /// No authentication or encryption: development only, loopback only (the worker refuses
    /// it elsewhere). A peer is whoever its hello says.
    Plain,
}

/// What the transport reports to the loop that owns the raft node.
#[derive(Debug)]
pub enum Event {
    Message(Message),
    /// A frame of a snapshot transfer, from the peer authenticated on its connection.
    Snap {
        from: u64,
        frame: SnapFrame,
    },
    /// Sending to this peer failed; raft should be told (`report_unreachable`).
    Unreachable {
        peer: u64,
        snapshot_failed: bool,
    },
    Connected {
        peer: u64,
        addr: SocketAddr,
    },
    /// An authenticated peer opened a connection and said where it listens: how a node that
    /// was never told its peers' addresses (one waiting to be added) learns where to answer.
    Hello {
        peer: u64,
        addr: SocketAddr,
        cluster_id: u128,
    },
    Disconnected {
        peer: u64,
        addr: SocketAddr,
        error: String,
    },
    /// The peer's host closed or reset our connection, or refused a new one: its process is
    /// gone, not merely slow or cut off (which shows as silence or timeouts). The raft node
    /// uses it to replace a crashed leader early (`Node::peer_gone`).
    Gone {
        peer: u64,
    },
    /// A message to `peer` could not be encoded (a bug, not a peer's doing): dropped.
    Unsendable {
        peer: u64,
        error: String,
    },
    /// A connection or frame was refused. `more`: refusals since the last one reported.
    Refused {
        addr: SocketAddr,
        reason: String,
        more: u64,
    },
}

/// An event, holding its connection's share of the inbound queue until it is dropped.
#[derive(Debug)]
pub struct Delivery {
    pub event: Event,
    _permit: Option<Permit>,
}

#[derive(Debug)]
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type Waker = Arc<dyn Fn() + Send + Sync>;

struct Peer {
    addr: SocketAddr,
    tx: mpsc::Sender<Outbound>,
}

const KIND_RAFT: u8 = b'M';
const KIND_SNAP: u8 = b'S';
const KIND_KEEPALIVE: u8 = b'K';

fn encode(o: &Outbound) -> Result<Bytes, String> {
    let mut v = Vec::new();
    match o {
        Outbound::Raft(m) => {
            v.push(KIND_RAFT);
            m.write_to_vec(&mut v).map_err(|e| e.to_string())?;
        }
        Outbound::Snap { frame, .. } => {
            v.push(KIND_SNAP);
            v.extend_from_slice(&frame.encode());
        }
    }
    Ok(v.into())
}

/// Whether losing this frame fails a snapshot transfer.
fn is_snapshot(o: &Outbound) -> bool {
    match o {
        Outbound::Raft(m) => m.get_msg_type() == MessageType::MsgSnapshot,
        Outbound::Snap { .. } => true,
    }
}

/// First frame on every connection: magic, the sender's id, its cluster id (0 while it knows
/// none), its listen address.
const HELLO_MAGIC: &[u8; 4] = b"RKV2";

fn hello_frame(id: u64, cluster_id: u128, addr: SocketAddr) -> Bytes {
    let mut v = HELLO_MAGIC.to_vec();
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&cluster_id.to_le_bytes());
    v.extend_from_slice(addr.to_string().as_bytes());
    v.into()
}

fn parse_hello(frame: &[u8]) -> Option<(u64, u128, SocketAddr)> {
    let rest = frame.strip_prefix(HELLO_MAGIC.as_slice())?;
    if rest.len() > 8 + 16 + 64 {
        return None;
    }
    let id = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let cluster_id = u128::from_le_bytes(rest.get(8..24)?.try_into().ok()?);
    let addr = std::str::from_utf8(&rest[24..]).ok()?.parse().ok()?;
    (id != 0).then_some((id, cluster_id, addr))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What every connection task shares.
struct Shared {
    me: u64,
    security: Security,
    events: cb::Sender<Delivery>,
    wake: Waker,
    max_frame: AtomicUsize,
    /// This node's cluster id (0: not known yet), split in two halves.
    cluster_id: [AtomicU64; 2],
    handshaking: AtomicUsize,
    per_peer: Mutex<HashMap<u64, usize>>,
    refusals: Mutex<(Option<Instant>, u64)>,
}

impl Shared {
    fn emit(&self, event: Event, permit: Option<Permit>) -> bool {
        let ok = self.events.try_send(Delivery { event, _permit: permit }).is_ok();
        if ok {
            (self.wake)();
        }
        ok
    }

    /// Reports a refusal, at most one a second.
    fn refuse(&self, addr: SocketAddr, reason: impl FnOnce() -> String) {
        let more = {
            let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if r.0.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                r.1 += 1;
                return;
            }
            r.0 = Some(Instant::now());
            std::mem::take(&mut r.1)
        };
        self.emit(Event::Refused { addr, reason: reason(), more }, None);
    }

    fn codec(&self) -> LengthDelimitedCodec {
        LengthDelimitedCodec::builder().max_frame_length(self.max_frame.load(Ordering::Relaxed)).new_codec()
    }

    fn cluster_id(&self) -> u128 {
        (self.cluster_id[0].load(Ordering::Relaxed) as u128) << 64 | self.cluster_id[1].load(Ordering::Relaxed) as u128
    }
}

pub struct Transport {
    rt: Option<Runtime>,
    peers: HashMap<u64, Peer>,
    shared: Arc<Shared>,
    events_rx: cb::Receiver<Delivery>,
    local_addr: SocketAddr,
    /// The address hellos give (see `advertise`).
    advertised: SocketAddr,
}

impl Transport {
    /// Binds `listen` (synchronously, so a bad address is reported at once) and starts
    /// accepting on `rt`. The caller builds the runtime so it controls its threads (the
    /// Postgres worker blocks signals in them).
    pub fn start(
        rt: Runtime,
        me: u64,
        listen: SocketAddr,
        security: Security,
        max_frame: usize,
        wake: Waker,
    ) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let local_addr = std_listener.local_addr()?;
        let (events, events_rx) = cb::bounded(INBOUND_QUEUE);
        let listener = {
            let _g = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            me,
            security,
            events,
            wake,
            max_frame: AtomicUsize::new(max_frame),
            cluster_id: [AtomicU64::new(0), AtomicU64::new(0)],
            handshaking: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            refusals: Mutex::new((None, 0)),
        });
        rt.spawn(accept_loop(listener, shared.clone()));
        Ok(Transport { rt: Some(rt), peers: HashMap::new(), shared, events_rx, local_addr, advertised: local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address this node's hellos give, where it differs from the bound one (a wildcard,
    /// NAT): a joining node dials its peers back there. Set before adding peers.
    pub fn advertise(&mut self, addr: SocketAddr) {
        self.advertised = addr;
    }

    pub fn events(&self) -> &cb::Receiver<Delivery> {
        &self.events_rx
    }

    /// Frames longer than this are refused (connections made from now on).
    pub fn set_max_frame(&self, bytes: usize) {
        self.shared.max_frame.store(bytes, Ordering::Relaxed);
    }

    /// This node's cluster id, said in every hello; a peer saying another is refused.
    pub fn set_cluster_id(&self, id: u128) {
        self.shared.cluster_id[0].store((id >> 64) as u64, Ordering::Relaxed);
        self.shared.cluster_id[1].store(id as u64, Ordering::Relaxed);
    }

    /// Adds or re-addresses a peer. Unchanged peers keep their connection.
    pub fn set_peer(&mut self, id: u64, addr: SocketAddr) {
        if self.peers.get(&id).map(|p| p.addr) == Some(addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let rt = self.rt.as_ref().expect("transport is running");
        rt.spawn(peer_writer(id, addr, self.advertised, rx, self.shared.clone()));
        // Replacing the sender ends the old writer task (its receiver sees the channel close).
        self.peers.insert(id, Peer { addr, tx });
    }

    pub fn remove_peer(&mut self, id: u64) {
        self.peers.remove(&id);
    }

    pub fn peer_addr(&self, id: u64) -> Option<SocketAddr> {
        self.peers.get(&id).map(|p| p.addr)
    }

    /// Queues `m` for its recipient; false when it was dropped (unknown peer or full queue).
    pub fn send(&self, m: Outbound) -> bool {
        match self.peers.get(&m.to()) {
            Some(p) => p.tx.try_send(m).is_ok(),
            None => false,
        }
    }

    /// Stops all tasks, waiting briefly for them.
    pub fn shutdown(mut self) {
        self.peers.clear();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                if shared.handshaking.fetch_add(1, Ordering::Relaxed) >= MAX_HANDSHAKING {
                    shared.handshaking.fetch_sub(1, Ordering::Relaxed);
                    shared.refuse(addr, || format!("more than {MAX_HANDSHAKING} connections are in their handshake"));
                    continue;
                }
                // Without it a message may wait for Nagle's algorithm; the link still works.
                let _ = stream.set_nodelay(true);
                tokio::spawn(read_conn(stream, addr, shared.clone()));
            }
            Err(_) => tokio::time::sleep(BACKOFF_MIN).await,
        }
    }
}

/// Decrements a counter when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection counted against its peer's [`MAX_CONNS_PER_PEER`].
struct PeerSlot<'a>(&'a Shared, u64);

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.0.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

type Frames = FramedRead<Box<dyn Io>, LengthDelimitedCodec>;

/// The TLS handshake and the hello: who is on this connection.
async fn authenticate(stream: TcpStream, shared: &Shared) -> Result<(Frames, u64, u128, SocketAddr), String> {
    let (io, proven): (Box<dyn Io>, Option<u64>) = match &shared.security {
        Security::Plain => (Box::new(stream), None),
        Security::Tls(tls) => {
            let s = tokio_rustls::TlsAcceptor::from(tls.server.clone())
                .accept(stream)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            let certs = s.get_ref().1.peer_certificates().unwrap_or_default();
            let who = identity_of(certs.first().ok_or("no client certificate")?).map_err(|e| e.to_string())?;
            if who.cluster != tls.me.cluster {
                return Err(format!("the certificate is for cluster \"{}\", not this one", who.cluster));
            }
            (Box::new(s), Some(who.node))
        }
    };
    let mut frames = FramedRead::new(io, shared.codec());
    let first = match frames.next().await {
        Some(Ok(f)) => f,
        Some(Err(e)) => return Err(format!("reading the hello: {e}")),
        None => return Err("closed before saying hello".into()),
    };
    let (peer, cluster_id, addr) = parse_hello(&first).ok_or("the first frame is not a hello")?;
    if let Some(proven) = proven {
        if proven != peer {
            return Err(format!("the hello claims node {peer} but the certificate names node {proven}"));
        }
    }
    if peer == shared.me {
        return Err(format!("the hello claims this node's own id {peer}"));
    }
    let ours = shared.cluster_id();
    if ours != 0 && cluster_id != 0 && ours != cluster_id {
        return Err(format!("node {peer} belongs to another cluster (cluster id {cluster_id:032x})"));
    }
    Ok((frames, peer, cluster_id, addr))
}

async fn read_conn(stream: TcpStream, remote: SocketAddr, shared: Arc<Shared>) {
    let handshake = {
        let _counted = Slot(&shared.handshaking);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, authenticate(stream, &shared)).await
    };
    let (mut frames, peer, cluster_id, addr) = match handshake {
        Ok(Ok(v)) => v,
        Ok(Err(reason)) => return shared.refuse(remote, || reason),
        Err(_) => return shared.refuse(remote, || "no TLS handshake and hello within the deadline".into()),
    };
    {
        let mut m = shared.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(peer).or_insert(0);
        if *n >= MAX_CONNS_PER_PEER {
            drop(m);
            return shared.refuse(remote, || format!("node {peer} already has {MAX_CONNS_PER_PEER} connections"));
        }
        *n += 1;
    }
    let _counted = PeerSlot(&shared, peer);
    shared.emit(Event::Hello { peer, addr, cluster_id }, None);
    let inflight = Arc::new(AtomicUsize::new(0));
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, frames.next()).await {
            Err(_) | Ok(None) => return,
            // A frame over the limit (or malformed framing) is refused; a dropped connection is not news.
            Ok(Some(Err(e))) if e.kind() == std::io::ErrorKind::InvalidData => {
                return shared.refuse(remote, || format!("node {peer}: {e}"))
            }
            Ok(Some(Err(_))) => return,
            Ok(Some(Ok(f))) => f,
        };
        let event = match frame.first() {
            Some(&KIND_KEEPALIVE) if frame.len() == 1 => continue,
            Some(&KIND_RAFT) => match Message::parse_from_bytes(&frame[1..]) {
                // A forwarded leadership transfer names the transferee in `from` (raft-rs).
                Ok(m) if m.from == peer || m.get_msg_type() == MessageType::MsgTransferLeader => Event::Message(m),
                Ok(m) => return shared.refuse(remote, || format!("node {peer} sent a message from node {}", m.from)),
                Err(e) => return shared.refuse(remote, || format!("node {peer}: undecodable message: {e}")),
            },
            Some(&KIND_SNAP) => match SnapFrame::decode(&frame[1..]) {
                Some(frame) => Event::Snap { from: peer, frame },
                None => return shared.refuse(remote, || format!("node {peer}: undecodable snapshot frame")),
            },
            _ => return shared.refuse(remote, || format!("node {peer}: unknown frame kind")),
        };
        // Over its share, or with the queue full, the message is dropped; raft and the
        // snapshot transfer recover.
        if inflight.fetch_add(1, Ordering::Relaxed) >= PER_CONN_INFLIGHT {
            inflight.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        shared.emit(event, Some(Permit(inflight.clone())));
    }
}

/// A peer that sends whatever frames a test wants (a fuzzer, an attacker) on a connection
/// that passed the same handshake as a real peer's.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    use super::*;
    use futures::SinkExt;
    use tokio_util::codec::FramedWrite;

    pub struct RawPeer {
        rt: Runtime,
        sink: FramedWrite<Box<dyn Io>, LengthDelimitedCodec>,
    }

    impl RawPeer {
        /// Connects to node `to` at `addr` as node `me` (of `cluster_id`) and says hello.
        pub fn connect(
            addr: SocketAddr,
            to: u64,
            me: u64,
            cluster_id: u128,
            security: &Security,
        ) -> Result<Self, String> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            let io = rt.block_on(connect(to, addr, security))?;
            let codec = LengthDelimitedCodec::builder().max_frame_length(usize::MAX).new_codec();
            let mut p = RawPeer { rt, sink: FramedWrite::new(io, codec) };
            p.frame(&hello_frame(me, cluster_id, "127.0.0.1:9".parse().unwrap())).map_err(|e| e.to_string())?;
            Ok(p)
        }

        /// Sends one length-delimited frame as it is.
        pub fn frame(&mut self, body: &[u8]) -> std::io::Result<()> {
            self.rt.block_on(self.sink.send(Bytes::copy_from_slice(body)))
        }

        pub fn message(&mut self, m: &Message) -> std::io::Result<()> {
            let b = encode(&Outbound::Raft(m.clone())).map_err(std::io::Error::other)?;
            self.frame(&b)
        }

        pub fn snap(&mut self, to: u64, frame: SnapFrame) -> std::io::Result<()> {
            let b = encode(&Outbound::Snap { to, frame }).map_err(std::io::Error::other)?;
            self.frame(&b)
        }

        /// Writes a frame header announcing `len` bytes, and nothing more.
        pub fn announce(&mut self, len: u32) -> std::io::Result<()> {
            use tokio::io::AsyncWriteExt;
            self.rt.block_on(async {
                let io = self.sink.get_mut();
                io.write_all(&len.to_be_bytes()).await?;
                io.flush().await
            })
        }
    }
}

mod dial;
#[cfg(any(test, feature = "test-support"))]
use dial::connect;
use dial::peer_writer;
#[cfg(test)]
mod tests;
