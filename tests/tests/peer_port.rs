//! Issue 9: the Raft port, attacked on real servers. Peers without the right identity get
//! nothing in; an authenticated peer's malformed or random frames take no worker down; a
//! flood of idle connections does not stop the cluster from electing and writing.

// raft's protobuf messages are built by setting fields on a default value, as raft-rs does.
#![allow(clippy::field_reassign_with_default)]

use std::time::{Duration, Instant};

use protobuf::ProtobufEnum;
use raft_kv_core::command::{Command, Proposal, RequestId};
use raft_kv_core::eraftpb::{Entry, EntryType, Message, MessageType};
use raft_kv_core::snapshot::{Row, SnapFrame};
use raft_kv_core::transport::testing::RawPeer;
use raft_kv_core::transport::Security;
use raft_kv_core::types::KvRow;
use raft_kv_tests::{wait_for, Ca, Cluster, Stop, CLUSTER_NAME};
use rand::{Rng, SeedableRng};

/// What must not change while a node is attacked: its leader, term, worker and data.
struct Watch {
    leader: usize,
    term: i64,
    pids: Vec<Option<i32>>,
    kv: (i64, String),
}

fn watch(c: &Cluster) -> Watch {
    let (leader, term) = c.wait_leader(&[1, 2, 3], Duration::from_secs(20));
    c.assert_converged(&[1, 2, 3]);
    Watch { leader, term, pids: (1..=3).map(|i| c.worker_pid(i)).collect(), kv: c.kv_hash(1) }
}

fn unchanged(c: &Cluster, w: &Watch) {
    assert_eq!(c.wait_leader(&[1, 2, 3], Duration::from_secs(20)), (w.leader, w.term), "leader or term changed");
    for i in 1..=3 {
        assert_eq!(c.worker_pid(i), w.pids[i - 1], "node {i}'s worker restarted:\n{}", c.node(i).log());
        let v: Option<String> = c.client(i).query_one("SELECT raft_get('pwned')", &[]).unwrap().get(0);
        assert_eq!(v, None, "node {i}: a forged write applied");
    }
    c.assert_converged(&[1, 2, 3]);
    assert_eq!(c.kv_hash(1), w.kv, "the data changed");
}

/// Repeats `attack` until node `i`'s log says `want` (refusals are logged at most once a second).
fn until_logged(c: &Cluster, i: usize, want: &str, mut attack: impl FnMut()) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let start = c.node(i).log().len();
    loop {
        attack();
        if c.node(i).log()[start..].contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "node {i} never logged {want:?}:\n{}", &c.node(i).log()[start..]);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn raft_addr(c: &Cluster, i: usize) -> std::net::SocketAddr {
    c.node(i).raft_addr().parse().unwrap()
}

fn msg(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// A proposal entry for `cmd`.
fn proposal(cmd: Command) -> Entry {
    let mut e = Entry::default();
    e.data = Proposal { id: RequestId { node: 2, nonce: 77, seq: 1 }, cmd }.encode().into();
    e
}

/// Sends a forged write and a deposing heartbeat "from" `from`, ignoring errors (the
/// connection is expected to be refused).
fn forge(p: Result<RawPeer, String>, from: u64, to: u64, term: i64) {
    let term = term as u64;
    let Ok(mut p) = p else { return };
    let mut prop = msg(MessageType::MsgPropose, from, to, 0);
    prop.entries = vec![proposal(Command::Put { key: "pwned".into(), value: "x".into() })].into();
    let _ = p.message(&prop);
    let mut hb = msg(MessageType::MsgHeartbeat, from, to, term + 100);
    hb.commit = 1;
    let _ = p.message(&hb);
}

#[test]
fn peers_without_the_right_identity_get_nothing_in() {
    let c = Cluster::start(3);
    let w = watch(&c);
    let cid = c.cluster_id(w.leader);
    let l = w.leader as u64;
    let other = if l == 1 { 2 } else { 1 };
    let addr = raft_addr(&c, w.leader);
    let good = Cluster::peer_security(&c.ca, CLUSTER_NAME, other);

    // No certificate at all.
    until_logged(&c, w.leader, "TLS handshake failed", || {
        forge(RawPeer::connect(addr, l, other, cid, &Security::Plain), other, l, w.term)
    });
    // A certificate for a member's id, signed by another CA.
    let stray = Cluster::peer_security(&Ca::new(), CLUSTER_NAME, other);
    until_logged(&c, w.leader, "TLS handshake failed", || {
        forge(RawPeer::connect(addr, l, other, cid, &stray), other, l, w.term)
    });
    // The right CA and certificate, but another cluster's id.
    until_logged(&c, w.leader, "belongs to another cluster", || {
        forge(RawPeer::connect(addr, l, other, cid ^ 0xff, &good), other, l, w.term)
    });
    // A valid certificate of node `other` whose hello claims to be a third node.
    let third = (1..=3).find(|&i| i != l && i != other).unwrap();
    until_logged(&c, w.leader, &format!("claims node {third} but the certificate names node {other}"), || {
        forge(RawPeer::connect(addr, l, third, cid, &good), third, l, w.term)
    });
    // ... and one that says hello truthfully, then sends messages from the third node.
    until_logged(&c, w.leader, &format!("node {other} sent a message from node {third}"), || {
        forge(RawPeer::connect(addr, l, other, cid, &good), third, l, w.term)
    });
    unchanged(&c, &w);
    // The same against a follower.
    let f = other as usize;
    let faddr = raft_addr(&c, f);
    until_logged(&c, f, "TLS handshake failed", || {
        forge(RawPeer::connect(faddr, other, l, cid, &Security::Plain), l, other, w.term)
    });
    unchanged(&c, &w);
}

#[test]
fn malformed_messages_from_an_authenticated_peer_take_nothing_down() {
    let c = Cluster::start(3);
    let w = watch(&c);
    let cid = c.cluster_id(w.leader);
    let l = w.leader as u64;
    let f = if l == 1 { 2 } else { 1 }; // the peer we play (a real member, with its certificate)
    let g = (1..=3).find(|&i| i != l && i != f).unwrap(); // the other follower
    let sec = Cluster::peer_security(&c.ca, CLUSTER_NAME, f);
    let t = w.term as u64;
    let malformed = |to: u64| -> Vec<Message> {
        use MessageType::*;
        let mut v = Vec::new();
        v.push(msg(MsgPropose, f, to, 0)); // empty proposal: fatal in raft-rs
        let mut hb = msg(MsgHeartbeat, f, to, 0); // term 0 with a commit far ahead: fatal
        hb.commit = 1 << 40;
        v.push(hb);
        let mut hb = msg(MsgHeartbeat, f, to, t);
        hb.commit = 1 << 40;
        v.push(hb);
        for local in [MsgHup, MsgBeat, MsgCheckQuorum, MsgUnreachable, MsgSnapStatus] {
            v.push(msg(local, f, to, t));
        }
        v.push(msg(MsgReadIndex, f, to, 0)); // no context: raft-rs indexes entries[0]
        v.push(msg(MsgReadIndexResp, f, to, t));
        v.push(msg(MsgTimeoutNow, f, to, t)); // only the leader may order a campaign
        let mut ack = msg(MsgAppendResponse, f, to, t);
        ack.index = 1 << 40;
        v.push(ack);
        let mut app = msg(MsgAppend, f, to, t);
        app.index = 1;
        app.log_term = 1;
        let mut e = Entry::default();
        e.index = 2;
        e.term = t; // rewrites a committed entry: fatal in raft-rs
        app.entries = vec![e].into();
        v.push(app);
        for cmd in [
            Command::Put { key: "pwned\0".into(), value: "x".into() },
            Command::Put { key: "k".repeat(5000), value: "x".into() },
            Command::Put { key: String::new(), value: "x".into() },
            Command::Cas { key: "pwned".into(), expected: Some("\0".into()), value: "x".into() },
            Command::ClusterId { id: 0 },
        ] {
            let mut p = msg(MsgPropose, f, to, 0);
            p.entries = vec![proposal(cmd)].into();
            v.push(p);
        }
        let mut p = msg(MsgPropose, f, to, 0);
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.data = vec![0xff, 0xff, 0xff].into();
        p.entries = vec![e].into();
        v.push(p);
        let mut snap = msg(MsgSnapshot, f, to, t);
        snap.mut_snapshot().mut_metadata().index = 1 << 40;
        snap.mut_snapshot().mut_metadata().term = t;
        v.push(snap);
        v
    };
    let start = c.node(w.leader).log().len();
    for (to, to_addr) in [(l, raft_addr(&c, w.leader)), (g, raft_addr(&c, g as usize))] {
        let mut p = RawPeer::connect(to_addr, to, f, cid, &sec).expect("an authenticated peer connects");
        for m in malformed(to) {
            p.message(&m).unwrap();
        }
        // Snapshot frames no transfer asked for, one with rows no node can store.
        let row = KvRow { value: "x".into(), mod_revision: 1, create_revision: 1, version: 1, lease: 0 };
        let rows = vec![Row::Kv { key: "pwned\0".into(), row }];
        p.snap(to, SnapFrame::Chunk { stream: 9, index: 1 << 40, term: t, seq: 0, rows, last: true, rows_total: 1 })
            .unwrap();
        p.snap(to, SnapFrame::Ack { stream: 9, index: 1, term: t, seq: 3 }).unwrap();
    }
    wait_for(Duration::from_secs(20), "the leader to log the dropped messages", || {
        c.node(w.leader).log()[start..].contains("malformed message(s) from peers").then_some(())
    });
    unchanged(&c, &w);
    // And the cluster still works.
    c.client(g as usize).batch_execute("SELECT raft_set('after', 'ok')").unwrap();
}

#[test]
fn random_and_mutated_frames_take_no_worker_down_and_grow_no_memory() {
    let c = Cluster::start(3);
    let w = watch(&c);
    let cid = c.cluster_id(w.leader);
    let l = w.leader as u64;
    let f = if l == 1 { 2 } else { 1 };
    let sec = Cluster::peer_security(&c.ca, CLUSTER_NAME, f);
    let addr = raft_addr(&c, w.leader);
    let pid = w.pids[w.leader - 1].unwrap();
    let t = w.term as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let random_message = |rng: &mut rand::rngs::StdRng| -> Message {
        let mut m = Message::default();
        m.msg_type = MessageType::from_i32(rng.gen_range(0..20)).unwrap_or(MessageType::MsgAppend);
        m.from = f;
        m.to = if rng.gen_bool(0.95) { l } else { rng.gen() };
        m.term = [0, t, t.saturating_sub(1), rng.gen_range(0..t + 2)][rng.gen_range(0..4)];
        m.index = rng.gen_range(0..1000);
        m.log_term = rng.gen_range(0..t + 2);
        m.commit = if rng.gen_bool(0.5) { rng.gen_range(0..1000) } else { rng.gen() };
        m.reject = rng.gen();
        m.reject_hint = rng.gen_range(0..1000);
        for _ in 0..rng.gen_range(0..4) {
            let mut e = Entry::default();
            e.index = rng.gen_range(0..1000);
            e.term = rng.gen_range(0..t + 2);
            e.entry_type = EntryType::from_i32(rng.gen_range(0..3)).unwrap();
            let n = rng.gen_range(0..64);
            e.data = (0..n).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>().into();
            m.entries.push(e);
        }
        m
    };
    let connect = || RawPeer::connect(addr, l, f, cid, &sec).expect("an authenticated peer connects");
    let mut p = connect();
    let send = |p: &mut RawPeer, rng: &mut rand::rngs::StdRng| {
        let m = random_message(rng);
        let r = if rng.gen_bool(0.01) {
            // Mutated: a valid message with bytes flipped, or garbage of a random kind.
            let mut b = protobuf::Message::write_to_bytes(&m).unwrap();
            b.insert(0, b"MSKZ\0"[rng.gen_range(0..5)]);
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            p.frame(&b)
        } else {
            p.message(&m)
        };
        if r.is_err() {
            *p = connect(); // the node closed a connection that spoke garbage
        }
    };
    for _ in 0..5_000 {
        send(&mut p, &mut rng);
    }
    let before = Cluster::rss_anon_kib(pid).unwrap();
    for _ in 0..95_000 {
        send(&mut p, &mut rng);
    }
    // A frame announced over the limit is refused on its length alone.
    until_logged(&c, w.leader, "frame size too big", || {
        let _ = connect().announce(u32::MAX);
    });
    for i in 1..=3 {
        assert_eq!(c.worker_pid(i), w.pids[i - 1], "node {i}'s worker restarted:\n{}", c.node(i).log());
    }
    let after = Cluster::rss_anon_kib(pid).unwrap();
    eprintln!("leader worker RssAnon: {before} KiB after 5,000 frames, {after} KiB after 100,000");
    assert!(after < before + 16 * 1024, "the worker grew from {before} KiB to {after} KiB");
    // The cluster still elects (terms may have moved) and writes.
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(30));
    wait_for(Duration::from_secs(30), "a write", || {
        c.client(leader).batch_execute("SELECT raft_set('after', 'ok')").ok()
    });
    c.assert_converged(&[1, 2, 3]);
}

#[test]
fn thousands_of_idle_connections_do_not_stop_elections_or_writes() {
    let c = Cluster::start(3);
    let w = watch(&c);
    let mut held = Vec::new();
    for i in 1..=3 {
        let addr = raft_addr(&c, i);
        for _ in 0..2000 {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                held.push(s);
            }
        }
    }
    eprintln!("holding {} idle connections", held.len());
    // The leader dies: the others must elect over their existing connections and take writes,
    // and the restarted node must connect again through the flood.
    c.stop_node(w.leader, Stop::Immediate);
    let rest: Vec<usize> = (1..=3).filter(|&i| i != w.leader).collect();
    let (leader, _) = c.wait_leader(&rest, Duration::from_secs(30));
    wait_for(Duration::from_secs(30), "a write", || c.client(leader).batch_execute("SELECT raft_set('k', 'v')").ok());
    c.start_node(w.leader);
    c.assert_converged(&[1, 2, 3]);
    drop(held);
}
