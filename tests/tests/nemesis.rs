//! Issue 5: linearizability under faults, checked on real servers.
//!
//! Concurrent clients run raft_set / raft_cas / raft_get (both consistencies) over a few keys
//! while a nemesis partitions the network, pauses servers or kills them; every operation's
//! invocation, completion and outcome is recorded, and the linearizability checker judges
//! the history. Each fault type runs for `RAFT_KV_NEMESIS_SECS` (default 30) with a seed
//! from `RAFT_KV_NEMESIS_SEED` (default: random), printed so a failure can be rerun.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft_kv_tests::linearizability::{self, Kind, Op, Outcome};
use raft_kv_tests::{wait_for, Client, Cluster, StopOnDrop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEYS: [&str; 3] = ["x", "y", "z"];
const CLIENTS: usize = 4;

fn seed() -> u64 {
    std::env::var("RAFT_KV_NEMESIS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen())
}

fn duration() -> Duration {
    let secs = std::env::var("RAFT_KV_NEMESIS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    Duration::from_secs(secs)
}

struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    local_reads: AtomicUsize,
    /// Compare-and-sets made as `raft_txn` (checked as compare-and-sets).
    txns: AtomicUsize,
}

impl History {
    fn new() -> Self {
        History {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            local_reads: AtomicUsize::new(0),
            txns: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

fn connect(c: &Cluster, node: usize) -> Option<Client> {
    let mut cl = c.try_client(node)?;
    cl.batch_execute("SET raft_kv.apply_timeout = '2s'").ok()?;
    Some(cl)
}

/// What an error means for the operation that got it.
enum Failure {
    /// Certainly had no effect (and for reads: nothing was read).
    Certain,
    /// A write that may have happened.
    Unknown,
}

fn classify(e: &postgres::Error) -> Failure {
    match e.as_db_error().map(|d| d.code().code()) {
        // Not committed / read failed, not running: certainly nothing happened.
        Some("40001") | Some("55000") | Some("53400") => Failure::Certain,
        // Outcome unknown, or the server went away mid-call.
        _ => Failure::Unknown,
    }
}

/// The workload: CLIENTS threads of `client_loop`, until `stop`.
fn spawn_clients<'s, 'e>(
    s: &'s std::thread::Scope<'s, 'e>,
    c: &'e Cluster,
    seed: u64,
    stop: &'e AtomicBool,
    h: &'e History,
) {
    for id in 0..CLIENTS {
        s.spawn(move || client_loop(c, id, seed, stop, h));
    }
}

fn client_loop(c: &Cluster, id: usize, seed: u64, stop: &AtomicBool, h: &History) {
    let mut rng = StdRng::seed_from_u64(seed ^ ((id as u64 + 1) * 0x9e37_79b9));
    let nodes = c.nodes.len();
    let mut node = id % nodes + 1;
    let mut conn: Option<Client> = None;
    let mut n = 0u64;
    let mut last_seen: std::collections::HashMap<&str, Option<String>> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        let Some(cl) = conn.as_mut() else {
            node = node % nodes + 1;
            conn = connect(c, node);
            if conn.is_none() {
                std::thread::sleep(Duration::from_millis(50)); // back-off while the node is down
            }
            continue;
        };
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        n += 1;
        let value = format!("c{id}-{n}");
        let choice = rng.gen_range(0..100);
        let invoke = h.now();
        let (kind, res): (Kind, Result<Outcome, postgres::Error>) = match choice {
            0..=34 => (Kind::Read, cl.query_one("SELECT raft_get($1)", &[&key]).map(|r| Outcome::Read(r.get(0)))),
            35..=44 => {
                // Local reads may be stale by design: exercised, not checked.
                if cl.query_one("SELECT raft_get($1, 'local')", &[&key]).is_ok() {
                    h.local_reads.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            45..=74 => (
                Kind::Write(value.clone()),
                cl.query_one("SELECT raft_set($1, $2)", &[&key, &value]).map(|_| Outcome::Written),
            ),
            75..=87 => {
                let expected = last_seen.get(key).cloned().flatten();
                (
                    Kind::Cas { expected: expected.clone(), new: value.clone() },
                    cl.query_one("SELECT raft_cas($1, $2, $3)", &[&key, &expected, &value])
                        .map(|r| Outcome::Cas(r.get(0))),
                )
            }
            _ => {
                // The same compare-and-set as a transaction: the value compared (an absent
                // key: version 0), the put in the success branch, one log entry.
                let expected = last_seen.get(key).cloned().flatten();
                let compare = match &expected {
                    Some(v) => format!(r#"[{{"key": "{key}", "target": "value", "op": "=", "value": "{v}"}}]"#),
                    None => format!(r#"[{{"key": "{key}", "target": "version", "op": "=", "value": 0}}]"#),
                };
                let success = format!(r#"[{{"op": "put", "key": "{key}", "value": "{value}"}}]"#);
                h.txns.fetch_add(1, Ordering::Relaxed);
                (
                    Kind::Cas { expected: expected.clone(), new: value.clone() },
                    cl.query_one(
                        "SELECT succeeded FROM raft_txn($1::text::jsonb, $2::text::jsonb)",
                        &[&compare, &success],
                    )
                    .map(|r| Outcome::Cas(r.get(0))),
                )
            }
        };
        let complete = h.now();
        let op =
            |outcome, complete| Op { client: id, key: key.to_string(), kind: kind.clone(), outcome, invoke, complete };
        match res {
            Ok(outcome) => {
                match &outcome {
                    Outcome::Read(v) => {
                        last_seen.insert(key, v.clone());
                    }
                    Outcome::Written => {
                        last_seen.insert(key, Some(value.clone()));
                    }
                    _ => {}
                }
                h.ops.lock().unwrap().push(op(outcome, Some(complete)));
            }
            Err(e) => {
                let lost_connection = cl.is_closed() || e.as_db_error().is_none();
                match (classify(&e), &kind) {
                    (_, Kind::Read) | (Failure::Certain, _) => {}
                    (Failure::Unknown, _) => h.ops.lock().unwrap().push(op(Outcome::Unknown, None)),
                }
                if lost_connection {
                    conn = None;
                }
            }
        }
    }
}

fn leader_of(c: &Cluster) -> Option<usize> {
    (1..=c.nodes.len()).find(|&i| c.raft_view(i).is_some_and(|(role, _, _)| role == "leader"))
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    PartitionHalves,
    IsolateLeader,
    Bridge,
    Pause,
    Kill,
}

/// Runs one fault type against a fresh cluster and checks the history.
fn run(fault: Fault) {
    let seed = seed();
    let dur = duration();
    println!("nemesis {fault:?}: seed {seed} (rerun with RAFT_KV_NEMESIS_SEED={seed}), {dur:?}");
    let c = Cluster::builder(3).proxied().start();
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let net = c.net.as_ref().unwrap();
    let h = History::new();
    let stop = AtomicBool::new(false);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = 0;
    std::thread::scope(|s| {
        spawn_clients(s, &c, seed, &stop, &h);
        let _stop = StopOnDrop(&stop);
        let end = Instant::now() + dur;
        while Instant::now() < end {
            // Quiet period, then a fault for a while.
            std::thread::sleep(Duration::from_millis(rng.gen_range(500..2000)));
            let hold = Duration::from_millis(rng.gen_range(1500..4000));
            faults += 1;
            match fault {
                Fault::PartitionHalves => {
                    let mut ids = [1u64, 2, 3];
                    let k = rng.gen_range(1..3);
                    for i in (1..ids.len()).rev() {
                        ids.swap(i, rng.gen_range(0..=i));
                    }
                    net.partition(&[ids[..k].to_vec(), ids[k..].to_vec()]);
                    std::thread::sleep(hold);
                    net.heal();
                }
                Fault::IsolateLeader => {
                    if let Some(l) = leader_of(&c) {
                        let others: Vec<u64> = (1..=3).filter(|&i| i != l as u64).collect();
                        net.partition(&[vec![l as u64], others]);
                        std::thread::sleep(hold);
                        net.heal();
                    }
                }
                Fault::Bridge => {
                    // The bridge node sees both others; they cannot see each other.
                    let bridge = rng.gen_range(1..=3u64);
                    let ends: Vec<u64> = (1..=3).filter(|&i| i != bridge).collect();
                    net.cut_pairs(&[(ends[0], ends[1])]);
                    std::thread::sleep(hold);
                    net.heal();
                }
                Fault::Pause => {
                    let target = if rng.gen_bool(0.5) { leader_of(&c).unwrap_or(1) } else { rng.gen_range(1..=3) };
                    c.pause(target, true);
                    std::thread::sleep(hold);
                    c.pause(target, false);
                }
                Fault::Kill => {
                    let target = if rng.gen_bool(0.5) { leader_of(&c).unwrap_or(1) } else { rng.gen_range(1..=3) };
                    c.kill9(target);
                    std::thread::sleep(hold);
                    c.start_node(target);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Heal everything; every node must agree, and final reads join the history.
    net.heal();
    check_history(&c, &[1, 2, 3], h, &format!("{fault:?}"), seed, faults);
}

/// Final linearizable reads on `members` join the history; the members must hold identical
/// tables; the checker must accept the history.
fn check_history(c: &Cluster, members: &[usize], h: History, label: &str, seed: u64, faults: usize) {
    c.wait_leader(members, Duration::from_secs(20));
    for &i in members {
        let mut cl = c.client(i);
        for key in KEYS {
            let invoke = h.now();
            let v: Option<String> = wait_for(Duration::from_secs(20), "a final linearizable read", || {
                cl.query_one("SELECT raft_get($1)", &[&key]).ok().map(|r| r.get(0))
            });
            let complete = h.now();
            h.ops.lock().unwrap().push(Op {
                client: 100 + i,
                key: key.into(),
                kind: Kind::Read,
                outcome: Outcome::Read(v),
                invoke,
                complete: Some(complete),
            });
        }
    }
    c.assert_converged(members);

    let ops = h.ops.into_inner().unwrap();
    let count = |f: &dyn Fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
    println!(
        "nemesis {label}: {faults} faults, {} operations ({} reads, {} writes, {} cas of which {} by raft_txn, {} unknown), {} local reads",
        ops.len(),
        count(&|o| o.kind == Kind::Read),
        count(&|o| matches!(o.kind, Kind::Write(_))),
        count(&|o| matches!(o.kind, Kind::Cas { .. })),
        h.txns.load(Ordering::Relaxed),
        count(&|o| o.outcome == Outcome::Unknown),
        h.local_reads.load(Ordering::Relaxed)
    );
    assert!(count(&|o| o.outcome == Outcome::Written) > 10, "the workload must make progress");
    assert!(h.txns.load(Ordering::Relaxed) > 0, "the workload must include transactions");
    let t0 = Instant::now();
    if let Err(v) = linearizability::check(&ops) {
        if let Ok(path) = std::env::var("RAFT_KV_HISTORY_DUMP") {
            let mut all: Vec<&Op> = ops.iter().filter(|o| o.key == v.key).collect();
            all.sort_by_key(|o| o.invoke);
            let text: Vec<String> = all.iter().map(|o| o.to_string()).collect();
            std::fs::write(&path, text.join("\n")).unwrap();
        }
        panic!("seed {seed}: {v}");
    }
    println!("nemesis {label}: history linearizable (checked in {:?})", t0.elapsed());
}

/// Membership changes as the fault: a member (often the leader) is removed and stopped, and a
/// fresh node joins in its place, while the clients run; twice.
fn run_membership() {
    let seed = seed();
    let dur = duration();
    println!("nemesis Membership: seed {seed} (rerun with RAFT_KV_NEMESIS_SEED={seed}), {dur:?}");
    let mut c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let spares = [c.add_node(raft_kv_tests::joiner_conf), c.add_node(raft_kv_tests::joiner_conf)];
    let h = History::new();
    let stop = AtomicBool::new(false);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut members: Vec<usize> = vec![1, 2, 3];
    let mut faults = 0;
    std::thread::scope(|s| {
        spawn_clients(s, &c, seed, &stop, &h);
        let _stop = StopOnDrop(&stop);
        let end = Instant::now() + dur;
        for &spare in &spares {
            std::thread::sleep(Duration::from_millis(rng.gen_range(1000..3000)));
            let victim = if rng.gen_bool(0.5) {
                leader_of(&c).filter(|l| members.contains(l)).unwrap_or(members[0])
            } else {
                members[rng.gen_range(0..members.len())]
            };
            members.retain(|&m| m != victim);
            let via = members[0];
            wait_for(Duration::from_secs(20), "the removal to be accepted", || {
                c.client(via).query_one("SELECT raft_remove($1)", &[&(victim as i64)]).ok()
            });
            c.stop_node(victim, raft_kv_tests::Stop::Fast);
            let addr = c.node(spare).raft_addr();
            wait_for(Duration::from_secs(20), "the join to be accepted", || {
                c.client(via).query_one("SELECT raft_join($1, $2)", &[&(spare as i64), &addr]).ok()
            });
            wait_for(Duration::from_secs(30), "the new node to become a voter", || {
                let voter: Option<bool> = c
                    .client(via)
                    .query_one("SELECT voter FROM raft_members() WHERE id = $1", &[&(spare as i64)])
                    .ok()?
                    .get(0);
                voter.filter(|v| *v)
            });
            members.push(spare);
            faults += 1;
        }
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    check_history(&c, &members, h, "Membership", seed, faults);
}

#[test]
fn partitions_into_random_halves() {
    run(Fault::PartitionHalves);
}

#[test]
fn isolated_leader() {
    run(Fault::IsolateLeader);
}

#[test]
fn bridge_partition() {
    run(Fault::Bridge);
}

#[test]
fn process_pauses() {
    run(Fault::Pause);
}

#[test]
fn kill_and_restart() {
    run(Fault::Kill);
}

#[test]
fn membership_changes() {
    run_membership();
}
