//! Failover times at default settings (bench/failover.sh runs it): a 3-node cluster under a
//! light write load; the leader is crashed (SIGQUIT to its postmaster, as `pg_ctl stop -m
//! immediate` does; `kill -9` of all its processes), silenced (SIGSTOP) or stopped as planned
//! (SIGINT, as `pg_ctl stop -m fast`: it hands leadership over), ROUNDS times each.
//! Each round reports the time from the fault until a new leader accepts a write, and the
//! longest gap between two successful writes of a client writing through a surviving node.
//!
//!   failover_bench [ROUNDS]          (default 20)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft_kv_tests::{wait_for, Cluster};

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// SIGQUIT to the postmaster: what `pg_ctl stop -m immediate` sends, without waiting for
    /// pg_ctl's polling (100 ms steps) before the clock starts to count.
    Immediate,
    /// SIGKILL to every process of the server.
    Kill9,
    Sigstop,
    /// SIGINT to the postmaster: `pg_ctl stop -m fast`, a planned stop (the leader hands
    /// leadership over first).
    Fast,
}

struct Round {
    accept: Duration,
    stall: Duration,
}

/// Writes through node `via` every 10 ms until `stop`; returns the completion times of the
/// writes that succeeded.
fn writer(c: &Cluster, via: usize, stop: &AtomicBool, done: &Mutex<Vec<Instant>>) {
    let mut client = c.client(via);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let ok = client.query_one("SELECT raft_set('bench/failover/load', $1)", &[&n.to_string()]).is_ok();
        if ok {
            done.lock().unwrap().push(Instant::now());
        } else if client.is_closed() {
            client = c.client(via);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn round(c: &Cluster, fault: Fault) -> Round {
    let (leader, term) = c.wait_leader(&[1, 2, 3], Duration::from_secs(30));
    let rest: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let stop = AtomicBool::new(false);
    let done = Mutex::new(Vec::new());
    let mut probes: Vec<_> = rest.iter().map(|&i| (i, c.client(i))).collect();
    let (t0, accepted) = std::thread::scope(|s| {
        s.spawn(|| writer(c, rest[0], &stop, &done));
        // Some load before the fault.
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        match fault {
            Fault::Immediate => {
                let pm = c.node(leader).postmaster_pid().expect("the leader's postmaster");
                // SAFETY: a signal to a process of our own cluster.
                unsafe { libc::kill(pm, libc::SIGQUIT) };
            }
            Fault::Kill9 => {
                for pid in c.pids(leader) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Fault::Sigstop => c.pause(leader, true),
            Fault::Fast => {
                let pm = c.node(leader).postmaster_pid().expect("the leader's postmaster");
                // SAFETY: as above.
                unsafe { libc::kill(pm, libc::SIGINT) };
            }
        }
        let accepted = wait_for(Duration::from_secs(30), "a new leader accepting writes", || {
            for (i, p) in probes.iter_mut() {
                let Ok(r) = p.query_one("SELECT role, term FROM raft_status()", &[]) else { continue };
                let (role, t): (String, i64) = (r.get(0), r.get(1));
                if role == "leader" && t > term {
                    p.query_one("SELECT raft_set('bench/failover/probe', 'x')", &[]).ok()?;
                    return Some((*i, Instant::now()));
                }
            }
            std::thread::sleep(Duration::from_millis(2));
            None
        });
        // Load after the new leader, so the stall is closed by a write.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        (t0, accepted.1)
    });
    let done = done.into_inner().unwrap();
    let stall = done.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    match fault {
        Fault::Immediate | Fault::Fast => {
            wait_for(Duration::from_secs(30), "the stopped server to exit", || {
                c.node(leader).postmaster_pid().is_none().then_some(())
            });
            c.start_node(leader)
        }
        Fault::Kill9 => {
            // Waits for the processes to go, and clears what a killed postmaster leaves.
            c.kill9(leader);
            c.start_node(leader)
        }
        Fault::Sigstop => c.pause(leader, false),
    }
    c.assert_converged(&[1, 2, 3]);
    Round { accept: accepted - t0, stall }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let c = Cluster::start(3);
    println!("| fault | rounds | new leader accepts writes: p50 / p90 / max (ms) | longest write stall: p50 / p90 / max (ms) |");
    println!("|---|---|---|---|");
    let faults = [
        (Fault::Immediate, "crash: immediate shutdown (SIGQUIT)"),
        (Fault::Kill9, "crash: `kill -9` of every process"),
        (Fault::Sigstop, "silent: SIGSTOP"),
        (Fault::Fast, "planned: fast shutdown (SIGINT), leadership handed over"),
    ];
    for (fault, name) in faults {
        let mut accept = Vec::new();
        let mut stall = Vec::new();
        for n in 1..=rounds {
            let r = round(&c, fault);
            eprintln!("{name} round {n}: accepted after {} ms, stall {} ms", ms(r.accept), ms(r.stall));
            accept.push(r.accept);
            stall.push(r.stall);
        }
        accept.sort();
        stall.sort();
        println!(
            "| {name} | {rounds} | {} / {} / {} | {} / {} / {} |",
            ms(pct(&accept, 0.5)),
            ms(pct(&accept, 0.9)),
            ms(*accept.last().unwrap()),
            ms(pct(&stall, 0.5)),
            ms(pct(&stall, 0.9)),
            ms(*stall.last().unwrap()),
        );
    }
}
