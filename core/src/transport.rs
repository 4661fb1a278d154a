//! TCP transport for raft messages, run on tokio threads that never touch Postgres.
//!
//! Outbound: one connection and one bounded queue per peer. `send` never blocks: when a
//! peer's queue is full (the peer is dead, paused or slow) the message is dropped and the
//! caller reports the peer unreachable to raft, which retries on its own schedule.
//! Inbound: every accepted connection is read frame by frame; decoded messages go to one
//! bounded channel and the `wake` callback tells the owning loop to look.
//! Frames are tokio-util length-delimited: a hello first, then each frame a kind byte and a
//! body — `M` and a protobuf `eraftpb::Message`, or `S` and a bincode snapshot frame.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel as cb;
use futures::{SinkExt, StreamExt};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use crate::node::Outbound;
use crate::snapshot::SnapFrame;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 1024;
/// Inbound messages buffered for the main loop before new ones are dropped.
pub const INBOUND_QUEUE: usize = 16384;
/// Largest frame accepted or sent.
pub const MAX_FRAME: usize = 256 << 20;

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// What the transport reports to the loop that owns the raft node.
#[derive(Debug)]
pub enum Event {
    Message(Message),
    /// A frame of a snapshot transfer, from the peer that said hello on its connection.
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
    /// A peer opened a connection and said who it is and where it listens: how a node that
    /// was never told its peers' addresses (one waiting to be added) learns where to answer.
    Hello {
        peer: u64,
        addr: SocketAddr,
    },
    Disconnected {
        peer: u64,
        addr: SocketAddr,
        error: String,
    },
}

pub type Waker = Arc<dyn Fn() + Send + Sync>;

struct Peer {
    addr: SocketAddr,
    tx: mpsc::Sender<Outbound>,
}

const KIND_RAFT: u8 = b'M';
const KIND_SNAP: u8 = b'S';

fn encode(o: &Outbound) -> Bytes {
    let mut v = Vec::new();
    match o {
        Outbound::Raft(m) => {
            v.push(KIND_RAFT);
            v.extend_from_slice(&m.write_to_bytes().unwrap_or_default());
        }
        Outbound::Snap { frame, .. } => {
            v.push(KIND_SNAP);
            v.extend_from_slice(&frame.encode());
        }
    }
    v.into()
}

/// Whether losing this frame fails a snapshot transfer.
fn is_snapshot(o: &Outbound) -> bool {
    match o {
        Outbound::Raft(m) => m.get_msg_type() == MessageType::MsgSnapshot,
        Outbound::Snap { .. } => true,
    }
}

/// First frame on every connection: magic, the sender's id, its listen address.
const HELLO_MAGIC: &[u8; 4] = b"RKVH";

fn hello_frame(id: u64, addr: SocketAddr) -> Bytes {
    let mut v = HELLO_MAGIC.to_vec();
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(addr.to_string().as_bytes());
    v.into()
}

fn parse_hello(frame: &[u8]) -> Option<(u64, SocketAddr)> {
    let rest = frame.strip_prefix(HELLO_MAGIC.as_slice())?;
    let id = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let addr = std::str::from_utf8(&rest[8..]).ok()?.parse().ok()?;
    Some((id, addr))
}

pub struct Transport {
    rt: Option<Runtime>,
    me: u64,
    peers: HashMap<u64, Peer>,
    events_tx: cb::Sender<Event>,
    events_rx: cb::Receiver<Event>,
    wake: Waker,
    local_addr: SocketAddr,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec()
}

impl Transport {
    /// Binds `listen` (synchronously, so a bad address is reported at once) and starts
    /// accepting on `rt`. The caller builds the runtime so it controls its threads (the
    /// Postgres worker blocks signals in them).
    pub fn start(rt: Runtime, me: u64, listen: SocketAddr, wake: Waker) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let local_addr = std_listener.local_addr()?;
        let (events_tx, events_rx) = cb::bounded(INBOUND_QUEUE);
        let listener = {
            let _g = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        rt.spawn(accept_loop(listener, events_tx.clone(), wake.clone()));
        Ok(Transport { rt: Some(rt), me, peers: HashMap::new(), events_tx, events_rx, wake, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn events(&self) -> &cb::Receiver<Event> {
        &self.events_rx
    }

    /// Adds or re-addresses a peer. Unchanged peers keep their connection.
    pub fn set_peer(&mut self, id: u64, addr: SocketAddr) {
        if self.peers.get(&id).map(|p| p.addr) == Some(addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let rt = self.rt.as_ref().expect("transport is running");
        let hello = hello_frame(self.me, self.local_addr);
        rt.spawn(peer_writer(id, addr, hello, rx, self.events_tx.clone(), self.wake.clone()));
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

async fn accept_loop(listener: TcpListener, events: cb::Sender<Event>, wake: Waker) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(read_conn(stream, events.clone(), wake.clone()));
            }
            Err(_) => tokio::time::sleep(BACKOFF_MIN).await,
        }
    }
}

async fn read_conn(stream: TcpStream, events: cb::Sender<Event>, wake: Waker) {
    let mut frames = FramedRead::new(stream, codec());
    let mut first = true;
    let mut sender = None;
    while let Some(Ok(frame)) = frames.next().await {
        if std::mem::take(&mut first) {
            if let Some((peer, addr)) = parse_hello(&frame) {
                sender = Some(peer);
                emit(&events, &wake, Event::Hello { peer, addr });
                continue;
            }
        }
        let event = match (frame.first(), sender) {
            (Some(&KIND_RAFT), _) => Message::parse_from_bytes(&frame[1..]).ok().map(Event::Message),
            (Some(&KIND_SNAP), Some(from)) => SnapFrame::decode(&frame[1..]).map(|frame| Event::Snap { from, frame }),
            _ => None,
        };
        let Some(event) = event else {
            // A peer speaking something else: drop the connection.
            return;
        };
        // A full inbound queue drops the message; raft and the snapshot transfer recover.
        if events.try_send(event).is_ok() {
            wake();
        }
    }
}

fn emit(events: &cb::Sender<Event>, wake: &Waker, e: Event) {
    if events.try_send(e).is_ok() {
        wake();
    }
}

async fn peer_writer(
    id: u64,
    addr: SocketAddr,
    hello: Bytes,
    mut rx: mpsc::Receiver<Outbound>,
    events: cb::Sender<Event>,
    wake: Waker,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            _ => {
                // Messages queued for an unreachable peer are stale by the time it is back.
                let mut snapshot_failed = false;
                loop {
                    match rx.try_recv() {
                        Ok(m) => snapshot_failed |= is_snapshot(&m),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                emit(&events, &wake, Event::Unreachable { peer: id, snapshot_failed });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connected_at = tokio::time::Instant::now();
        emit(&events, &wake, Event::Connected { peer: id, addr });
        let mut sink = FramedWrite::new(stream, codec());
        // The hello goes out with the first batch of messages.
        let mut greeting = sink.feed(hello.clone()).await.err();
        let error = loop {
            if let Some(e) = greeting.take() {
                break e.to_string();
            }
            let Some(first) = rx.recv().await else { return };
            let mut snapshot = is_snapshot(&first);
            let mut res = sink.feed(encode(&first)).await;
            // Batch whatever else is queued into the same flush.
            while res.is_ok() {
                match rx.try_recv() {
                    Ok(m) => {
                        snapshot |= is_snapshot(&m);
                        res = sink.feed(encode(&m)).await;
                    }
                    Err(_) => break,
                }
            }
            if res.is_ok() {
                res = SinkExt::<Bytes>::flush(&mut sink).await;
            }
            if let Err(e) = res {
                emit(&events, &wake, Event::Unreachable { peer: id, snapshot_failed: snapshot });
                break e.to_string();
            }
        };
        emit(&events, &wake, Event::Disconnected { peer: id, addr, error });
        // A connection that dies at once (say, a proxy that accepts and then resets) must not
        // turn into a reconnect loop: back off unless it had lived a while.
        if connected_at.elapsed() >= Duration::from_secs(1) {
            backoff = BACKOFF_MIN;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn rt() -> Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    fn msg(from: u64, to: u64, term: u64) -> Outbound {
        let mut m = Message::default();
        m.from = from;
        m.to = to;
        m.term = term;
        m.set_msg_type(MessageType::MsgHeartbeat);
        Outbound::Raft(m)
    }

    fn next_message(t: &Transport) -> Message {
        next_message_and_hellos(t).0
    }

    /// The next message, and the hellos received before it.
    fn next_message_and_hellos(t: &Transport) -> (Message, Vec<(u64, SocketAddr)>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut hellos = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match t.events().recv_timeout(left).expect("no message within 10 s") {
                Event::Message(m) => return (m, hellos),
                Event::Hello { peer, addr } => hellos.push((peer, addr)),
                _ => continue,
            }
        }
    }

    #[test]
    fn messages_flow_both_ways_and_in_order() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let wake: Waker = Arc::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        });
        let mut a = Transport::start(rt(), 1, "127.0.0.1:0".parse().unwrap(), wake.clone()).unwrap();
        let mut b = Transport::start(rt(), 2, "127.0.0.1:0".parse().unwrap(), wake).unwrap();
        a.set_peer(2, b.local_addr());
        b.set_peer(1, a.local_addr());
        for term in 1..=100 {
            assert!(a.send(msg(1, 2, term)));
        }
        for term in 1..=100 {
            assert_eq!(next_message(&b).term, term);
        }
        // Snapshot frames share the connection and its order, and name their sender.
        let frame = SnapFrame::Ack { stream: 3, index: 9, term: 2, seq: 4 };
        assert!(a.send(Outbound::Snap { to: 2, frame: frame.clone() }));
        assert!(a.send(msg(1, 2, 101)));
        let got = loop {
            match b.events().recv_timeout(Duration::from_secs(10)).expect("snapshot frame") {
                Event::Snap { from, frame } => break (from, frame),
                Event::Message(m) => panic!("message {} overtook the frame", m.term),
                _ => continue,
            }
        };
        assert_eq!(got, (1, frame));
        assert_eq!(next_message(&b).term, 101);
        assert!(b.send(msg(2, 1, 7)));
        // The connection opens with a hello: who connected and where it listens.
        let (m, hellos) = next_message_and_hellos(&a);
        assert_eq!(m.term, 7);
        assert_eq!(hellos, vec![(2, b.local_addr())]);
        assert!(wakes.load(Ordering::Relaxed) >= 101);
        assert!(!a.send(msg(1, 9, 1)), "unknown peer must be refused");
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn dead_peer_is_reported_and_never_blocks() {
        let wake: Waker = Arc::new(|| {});
        // A port that was bound and released: nothing listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut a = Transport::start(rt(), 1, "127.0.0.1:0".parse().unwrap(), wake).unwrap();
        a.set_peer(2, dead);
        for t in 0..10 {
            a.send(msg(1, 2, t));
        }
        loop {
            match a.events().recv_timeout(Duration::from_secs(10)).expect("unreachable reported") {
                Event::Unreachable { peer: 2, .. } => break,
                _ => continue,
            }
        }
        a.shutdown();
    }

    #[test]
    fn stalled_peer_fills_its_queue_without_blocking() {
        let wake: Waker = Arc::new(|| {});
        // Listens (the kernel accepts) but never reads: like a SIGSTOPped node.
        let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = Transport::start(rt(), 1, "127.0.0.1:0".parse().unwrap(), wake).unwrap();
        a.set_peer(2, stalled.local_addr().unwrap());
        let Outbound::Raft(mut big) = msg(1, 2, 1) else { unreachable!() };
        big.set_context(vec![7u8; 64 << 10].into());
        let big = Outbound::Raft(big);
        let start = std::time::Instant::now();
        let refused = (0..20_000).filter(|_| !a.send(big.clone())).count();
        assert!(start.elapsed() < Duration::from_secs(5), "send must not block");
        // 20,000 x 64 KiB cannot fit in socket buffers plus a queue of PEER_QUEUE.
        assert!(refused >= 20_000 - PEER_QUEUE - 2048, "only {refused} refused");
        a.shutdown();
    }

    #[test]
    fn bind_conflict_is_an_error() {
        let wake: Waker = Arc::new(|| {});
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(Transport::start(rt(), 1, held.local_addr().unwrap(), wake).is_err());
    }
}
