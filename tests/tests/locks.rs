//! Issue 13: the lock recipe under faults. Six clients on all three nodes loop: acquire the
//! lock with their lease, write the fencing token to a key with raft_cas (only over a smaller
//! token), hold a few hundred ms, release. A nemesis partitions, pauses and kills servers
//! meanwhile; some clients pause themselves past their TTL while holding the lock.
//!
//! Checked: no two clients' validity overlaps (a client's hold is valid from the moment
//! raft_lock returned until it released or until its lease could have expired: the last
//! keepalive it sent plus the TTL); the fenced key only ever grows; the lock is acquired again
//! after every fault heals.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft_kv_tests::{Client, Cluster, StopOnDrop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TTL: Duration = Duration::from_secs(3);
const CLIENTS: usize = 6;
const LOCK: &str = "jobs/lock";

#[derive(Debug, Clone, Copy)]
struct Hold {
    client: usize,
    token: i64,
    from: Instant,
    /// Until the client released (or failed to), or its lease could have expired.
    until: Instant,
}

struct Record {
    holds: Mutex<Vec<Hold>>,
    /// Fenced writes refused because a later holder had written a larger token.
    fenced_out: AtomicUsize,
    /// Holds during which the client paused itself past its TTL.
    paused: AtomicUsize,
}

fn sqlstate(e: &postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

struct Session {
    cl: Client,
    lease: i64,
    /// When the last grant or keepalive that succeeded was sent: the lease lives at least TTL
    /// from then.
    alive_since: Instant,
}

fn session(c: &Cluster, node: usize) -> Option<Session> {
    let mut cl = c.try_client(node)?;
    cl.batch_execute("SET raft_kv.apply_timeout = '2s'").ok()?;
    let sent = Instant::now();
    let lease: i64 = cl.query_one("SELECT raft_lease_grant('3s')", &[]).ok()?.get(0);
    Some(Session { cl, lease, alive_since: sent })
}

fn client_loop(c: &Cluster, id: usize, seed: u64, stop: &AtomicBool, rec: &Record) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut node = id % 3 + 1;
    let mut s: Option<Session> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(sess) = s.as_mut() else {
            match session(c, node) {
                Some(new) => s = Some(new),
                None => {
                    node = node % 3 + 1;
                    std::thread::sleep(Duration::from_millis(100)); // back-off while a node is down
                }
            }
            continue;
        };
        let r = (|| -> Result<(), postgres::Error> {
            // Keep the lease alive; waiting for the lock stays well within one TTL.
            let sent = Instant::now();
            sess.cl.query_one("SELECT raft_lease_keepalive($1)", &[&sess.lease])?;
            sess.alive_since = sent;
            let token: Option<i64> =
                sess.cl.query_one("SELECT raft_lock($1, $2, '1.5s')", &[&LOCK, &sess.lease])?.get(0);
            let Some(token) = token else { return Ok(()) };
            let from = Instant::now();
            let mut hold = Hold { client: id, token, from, until: sess.alive_since + TTL };
            let result = (|| -> Result<(), postgres::Error> {
                if rng.gen_ratio(1, 12) {
                    // A client that stalls past its TTL while it believes it holds the lock.
                    rec.paused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(TTL + Duration::from_millis(1500));
                }
                // The fenced write: only over a smaller token.
                loop {
                    let current: Option<String> = sess.cl.query_one("SELECT raft_get('fence')", &[])?.get(0);
                    let current_token = current.as_deref().map(|v| v.parse::<i64>().unwrap());
                    if current_token.is_some_and(|t| t >= token) {
                        rec.fenced_out.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    let value = token.to_string();
                    let done: bool = sess.cl.query_one("SELECT raft_cas('fence', $1, $2)", &[&current, &value])?.get(0);
                    if done {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(rng.gen_range(100..400)));
                hold.until = hold.until.min(Instant::now());
                sess.cl.query_one("SELECT raft_unlock($1, $2)", &[&LOCK, &sess.lease])?;
                Ok(())
            })();
            hold.until = hold.until.min(Instant::now());
            rec.holds.lock().unwrap().push(hold);
            result
        })();
        if let Err(e) = r {
            if sqlstate(&e).as_deref() == Some("42704") || sqlstate(&e).as_deref() == Some("40001") {
                // The lease expired (or the place in line was lost with it): start over.
                s = None;
            } else {
                // The node went away or timed out: another node, a new session.
                s = None;
                node = node % 3 + 1;
            }
        }
    }
}

#[test]
fn the_lock_holds_under_partitions_pauses_and_kills() {
    let seed: u64 = std::env::var("RAFT_KV_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("lock nemesis: seed {seed} (rerun with RAFT_KV_NEMESIS_SEED={seed})");
    let c = Cluster::builder(3).proxied().start();
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let net = c.net.as_ref().unwrap();
    let rec = Record { holds: Mutex::new(Vec::new()), fenced_out: AtomicUsize::new(0), paused: AtomicUsize::new(0) };
    let stop = AtomicBool::new(false);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut heals = Vec::new();
    std::thread::scope(|s| {
        for id in 0..CLIENTS {
            let (c, stop, rec) = (&c, &stop, &rec);
            s.spawn(move || client_loop(c, id, seed, stop, rec));
        }
        let _stop = StopOnDrop(&stop);
        for round in 0..6 {
            std::thread::sleep(Duration::from_secs(3));
            let hold = Duration::from_millis(rng.gen_range(2000..4500));
            let target = rng.gen_range(1..=3usize);
            match round % 3 {
                0 => {
                    let others: Vec<u64> = (1..=3).filter(|&n| n != target as u64).collect();
                    net.partition(&[vec![target as u64], others]);
                    std::thread::sleep(hold);
                    net.heal();
                }
                1 => {
                    c.pause(target, true);
                    std::thread::sleep(hold);
                    c.pause(target, false);
                }
                _ => {
                    c.kill9(target);
                    std::thread::sleep(hold);
                    c.start_node(target);
                }
            }
            heals.push(Instant::now());
        }
        // A quiet end: progress after the last heal.
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
    });

    let mut holds = rec.holds.into_inner().unwrap();
    // A hold whose reply arrived after its lease could have expired was never valid.
    holds.retain(|h| h.until > h.from);
    holds.sort_by_key(|h| h.from);
    println!(
        "{} holds, {} fenced-out writes, {} clients paused past their TTL while holding",
        holds.len(),
        rec.fenced_out.load(Ordering::Relaxed),
        rec.paused.load(Ordering::Relaxed)
    );
    // Mutual exclusion of what clients were entitled to believe.
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            assert!(
                a.until <= b.from || b.until <= a.from,
                "overlapping holds: client {} (token {}) and client {} (token {})",
                a.client,
                a.token,
                b.client,
                b.token
            );
        }
    }
    // Tokens grow with every acquisition.
    for w in holds.windows(2) {
        assert!(w[1].token > w[0].token, "tokens not increasing: {:?} then {:?}", w[0], w[1]);
    }
    // Every write under the lock carried a strictly larger token than the one before.
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let fence: Vec<i64> = c
        .client(leader)
        .query("SELECT value FROM raft_changes(1, 'fence') WHERE key = 'fence' ORDER BY revision", &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0).parse().unwrap())
        .collect();
    assert!(fence.len() > 5, "too few fenced writes: {fence:?}");
    assert!(fence.windows(2).all(|w| w[1] > w[0]), "fenced writes out of order: {fence:?}");
    // Progress after every fault heals.
    for h in &heals {
        assert!(
            holds.iter().any(|x| x.from > *h && x.from <= *h + Duration::from_secs(8)),
            "no acquisition within 8 s of a heal"
        );
    }
    assert!(rec.paused.load(Ordering::Relaxed) > 0, "no client paused past its TTL (change the seed)");
}
