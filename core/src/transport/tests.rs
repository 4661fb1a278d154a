use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

fn rt() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn start(id: u64, wake: Waker) -> Transport {
    Transport::start(rt(), id, "127.0.0.1:0".parse().unwrap(), Security::Plain, frame_limit(1 << 20), wake).unwrap()
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
        match t.events().recv_timeout(left).expect("no message within 10 s").event {
            Event::Message(m) => return (m, hellos),
            Event::Hello { peer, addr, .. } => hellos.push((peer, addr)),
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
    let mut a = start(1, wake.clone());
    let mut b = start(2, wake);
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
        match b.events().recv_timeout(Duration::from_secs(10)).expect("snapshot frame").event {
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
    let mut a = start(1, wake);
    a.set_peer(2, dead);
    for t in 0..10 {
        a.send(msg(1, 2, t));
    }
    let (mut unreachable, mut gone) = (false, false);
    while !(unreachable && gone) {
        match a.events().recv_timeout(Duration::from_secs(10)).expect("unreachable and gone reported").event {
            Event::Unreachable { peer: 2, .. } => unreachable = true,
            // Refused: the host says nothing listens there.
            Event::Gone { peer: 2 } => gone = true,
            _ => continue,
        }
    }
    a.shutdown();
}

#[test]
fn a_peer_whose_process_exits_is_reported_gone_at_once() {
    let wake: Waker = Arc::new(|| {});
    let mut a = start(1, wake.clone());
    let mut b = start(2, wake);
    a.set_peer(2, b.local_addr());
    b.set_peer(1, a.local_addr());
    assert!(a.send(msg(1, 2, 1)));
    assert_eq!(next_message(&b).term, 1);
    // Nothing more is sent: the writer learns of the close by reading, not by a failed write.
    let closed_at = std::time::Instant::now();
    b.shutdown();
    loop {
        match a.events().recv_timeout(Duration::from_secs(10)).expect("gone reported").event {
            Event::Gone { peer: 2 } => break,
            Event::Gone { peer } => panic!("node {peer} reported gone"),
            _ => continue,
        }
    }
    // Well under the keepalive (10 s) and any election timeout: the close itself was seen.
    assert!(closed_at.elapsed() < KEEPALIVE, "took {:?}", closed_at.elapsed());
    a.shutdown();
}

#[test]
fn stalled_peer_fills_its_queue_without_blocking() {
    let wake: Waker = Arc::new(|| {});
    // Listens (the kernel accepts) but never reads: like a SIGSTOPped node.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut a = start(1, wake);
    a.set_peer(2, stalled.local_addr().unwrap());
    let Outbound::Raft(mut big) = msg(1, 2, 1) else { unreachable!() };
    big.set_context(vec![7u8; 64 << 10].into());
    let big = Outbound::Raft(big);
    let start = std::time::Instant::now();
    let refused = (0..20_000).filter(|_| !a.send(big.clone())).count();
    assert!(start.elapsed() < Duration::from_secs(5), "send must not block");
    // 20,000 x 64 KiB cannot fit in socket buffers plus a queue of PEER_QUEUE.
    assert!(refused >= 20_000 - PEER_QUEUE - 2048, "only {refused} refused");
    // Slow is not gone.
    while let Ok(d) = a.events().try_recv() {
        assert!(!matches!(d.event, Event::Gone { .. }), "a stalled peer was reported gone");
    }
    a.shutdown();
}

fn tls(ca: &crate::tls::testing::Ca, cluster: &str, id: u64) -> Security {
    let n = ca.node(cluster, id);
    Security::Tls(Arc::new(TlsSetup::from_pem(n.cert.as_bytes(), n.key.as_bytes(), ca.pem.as_bytes(), id).unwrap()))
}

fn start_with(id: u64, security: Security) -> Transport {
    let wake: Waker = Arc::new(|| {});
    Transport::start(rt(), id, "127.0.0.1:0".parse().unwrap(), security, frame_limit(1 << 20), wake).unwrap()
}

/// Waits for `t` to report a refusal saying `want` (refusals are reported at most once a
/// second, and refused peers retry); no message may arrive meanwhile.
fn refused(t: &Transport, want: &str) -> bool {
    refused_while(t, want, &mut || {})
}

/// [`refused`], calling `poke` (another attempt) every 250 ms meanwhile.
fn refused_while(t: &Transport, want: &str, poke: &mut dyn FnMut()) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        let Ok(d) = t.events().recv_timeout(Duration::from_millis(250)) else {
            poke();
            continue;
        };
        match d.event {
            Event::Refused { reason, .. } if reason.contains(want) => return true,
            Event::Message(m) => panic!("a message from node {} got in", m.from),
            Event::Snap { from, .. } => panic!("a snapshot frame from node {from} got in"),
            _ => continue,
        }
    }
}

/// Sends one heartbeat "from" `from` through `t` to node 2 at `to`.
fn attack(t: &mut Transport, to: SocketAddr, from: u64) {
    t.set_peer(2, to);
    assert!(t.send(msg(from, 2, 5)));
}

#[test]
fn tls_peers_talk_and_nobody_else_gets_in() {
    let ca = crate::tls::testing::Ca::new();
    let mut a = start_with(1, tls(&ca, "c1", 1));
    let b = start_with(2, tls(&ca, "c1", 2));
    a.set_peer(2, b.local_addr());
    assert!(a.send(msg(1, 2, 3)));
    let (m, hellos) = next_message_and_hellos(&b);
    assert_eq!((m.from, m.term), (1, 3));
    assert_eq!(hellos, vec![(1, a.local_addr())]);

    // No certificate at all.
    let mut plain = start_with(1, Security::Plain);
    attack(&mut plain, b.local_addr(), 1);
    assert!(refused(&b, "TLS handshake failed"));
    plain.shutdown();
    // A certificate for node 1 from another CA.
    let other_ca = crate::tls::testing::Ca::new();
    let mut forged = start_with(1, tls(&other_ca, "c1", 1));
    attack(&mut forged, b.local_addr(), 1);
    assert!(refused(&b, "TLS handshake failed"));
    forged.shutdown();
    // The right CA, another cluster.
    let mut stranger = start_with(1, tls(&ca, "c2", 1));
    attack(&mut stranger, b.local_addr(), 1);
    // (The stranger already refuses b's certificate, named for cluster c1.)
    assert!(refused(&stranger, "TLS handshake failed"));
    stranger.shutdown();
    // A valid node-3 certificate whose hello claims node 1.
    let mut liar = start_with(1, tls(&ca, "c1", 3));
    attack(&mut liar, b.local_addr(), 1);
    assert!(refused_while(&b, "claims node 1 but the certificate names node 3", &mut || {
        liar.send(msg(1, 2, 5));
    }));
    liar.shutdown();
    // ... and one that says hello as node 3 but sends a message from node 1.
    let mut spoofer = start_with(3, tls(&ca, "c1", 3));
    attack(&mut spoofer, b.local_addr(), 1);
    assert!(refused_while(&b, "node 3 sent a message from node 1", &mut || {
        spoofer.send(msg(1, 2, 5));
    }));
    spoofer.shutdown();
    // A dialled node must prove it is the node dialled: node 1 reaching "node 2" at node 3.
    let n3 = start_with(3, tls(&ca, "c1", 3));
    a.set_peer(2, n3.local_addr());
    assert!(a.send(msg(1, 2, 4)));
    assert!(refused(&a, "TLS handshake failed"), "node 1 must refuse node 3's certificate");
    for t in [a, b, n3] {
        t.shutdown();
    }
}

#[test]
fn a_quiet_peer_keeps_its_connection_past_the_handshake_deadline() {
    let ca = crate::tls::testing::Ca::new();
    let mut a = start_with(1, tls(&ca, "c1", 1));
    let b = start_with(2, tls(&ca, "c1", 2));
    a.set_peer(2, b.local_addr());
    // Nothing to send for longer than the deadline: the hello alone must satisfy it.
    let quiet_until = std::time::Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(1);
    while let Some(left) = quiet_until.checked_duration_since(std::time::Instant::now()) {
        if let Ok(d) = b.events().recv_timeout(left) {
            assert!(!matches!(d.event, Event::Refused { .. }), "{:?}", d.event);
        }
    }
    assert!(a.send(msg(1, 2, 9)));
    assert_eq!(next_message(&b).term, 9);
    while let Ok(d) = a.events().try_recv() {
        assert!(!matches!(d.event, Event::Disconnected { .. } | Event::Unreachable { .. }), "{:?}", d.event);
    }
    a.shutdown();
    b.shutdown();
}

#[test]
fn a_node_of_another_cluster_id_is_refused() {
    let mut a = start_with(1, Security::Plain);
    let b = start_with(2, Security::Plain);
    b.set_cluster_id(0xB);
    a.set_cluster_id(0xA);
    a.set_peer(2, b.local_addr());
    assert!(a.send(msg(1, 2, 3)));
    assert!(refused_while(&b, "belongs to another cluster", &mut || {
        a.send(msg(1, 2, 3));
    }));
    // A node that knows no id yet (a new one waiting to be added) is heard.
    a.set_cluster_id(0);
    a.set_peer(2, b.local_addr()); // unchanged address: the connection stays; reconnects on its own
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        a.send(msg(1, 2, 4));
        match b.events().recv_timeout(Duration::from_millis(250)).map(|d| d.event) {
            Ok(Event::Message(m)) => {
                assert!(m.term == 3 || m.term == 4);
                break;
            }
            _ => assert!(std::time::Instant::now() < deadline, "no message from a node with no id"),
        }
    }
    a.shutdown();
    b.shutdown();
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_read() {
    use std::io::Write;
    let t = start_with(2, Security::Plain);
    let mut c = std::net::TcpStream::connect(t.local_addr()).unwrap();
    let hello = hello_frame(1, 0, "127.0.0.1:9".parse().unwrap());
    c.write_all(&(hello.len() as u32).to_be_bytes()).unwrap();
    c.write_all(&hello).unwrap();
    // A 2 GiB frame announced: refused on its length alone (only 4 bytes were sent).
    c.write_all(&0x7fff_fff0u32.to_be_bytes()).unwrap();
    assert!(refused(&t, "node 1"), "refused, naming the peer");
    t.shutdown();
}

#[test]
fn a_silent_connection_is_closed_after_the_handshake_deadline() {
    use std::io::Read;
    let t = start_with(2, Security::Plain);
    let mut c = std::net::TcpStream::connect(t.local_addr()).unwrap();
    c.set_read_timeout(Some(HANDSHAKE_TIMEOUT * 3)).unwrap();
    let start = std::time::Instant::now();
    let n = c.read(&mut [0u8; 16]).expect("the server closes the connection");
    assert_eq!(n, 0);
    assert!(start.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(100));
    assert!(refused(&t, "deadline"));
    t.shutdown();
}

#[test]
fn bind_conflict_is_an_error() {
    let wake: Waker = Arc::new(|| {});
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(Transport::start(rt(), 1, held.local_addr().unwrap(), Security::Plain, frame_limit(1 << 20), wake).is_err());
}
