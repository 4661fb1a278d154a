//! Issue 4: membership changes from SQL, snapshots and log compaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_kv_tests::{joiner_conf, wait_for, Client, Cluster, Stop, StopOnDrop};

/// (id, voter) of every member, as node `i` sees them.
fn members(c: &Cluster, i: usize) -> Vec<(i64, bool)> {
    c.client(i)
        .query("SELECT id, voter FROM raft_members() ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn leader_among(c: &Cluster, nodes: &[usize]) -> usize {
    wait_for(Duration::from_secs(15), "a leader", || {
        nodes.iter().copied().find(|&i| c.raft_view(i).is_some_and(|(r, _, _)| r == "leader"))
    })
}

/// A writer on node `i` until `stop`; returns every acknowledged key → value.
fn writer(c: &Cluster, nodes: Vec<usize>, stop: &AtomicBool, acked: &Mutex<HashMap<String, String>>) {
    let mut n = 0;
    let mut conns: Vec<Client> = nodes.iter().map(|&i| c.client(i)).collect();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (k, v) = (format!("w/{n}"), format!("{n}"));
        let cl = &mut conns[n % nodes.len()];
        if cl.query_one("SELECT raft_set($1, $2)", &[&k, &v]).is_ok() {
            acked.lock().unwrap().insert(k, v);
        }
    }
}

#[test]
fn grow_to_five_and_shrink_to_three_under_writes() {
    let mut c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let n4 = c.add_node(joiner_conf);
    let n5 = c.add_node(joiner_conf);
    wait_for(Duration::from_secs(10), "the new node to wait as 'joining'", || {
        let r: Option<String> = c.client(n4).query_one("SELECT role FROM raft_status()", &[]).ok()?.get(0);
        (r.as_deref() == Some("joining")).then_some(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(HashMap::new()));
    std::thread::scope(|s| {
        {
            let (c, stop, acked) = (&c, stop.clone(), acked.clone());
            s.spawn(move || writer(c, vec![1, 2], &stop, &acked));
        }
        let _stop = StopOnDrop(&stop);
        for (i, n) in [(n4, 4i64), (n5, 5)] {
            let addr = c.node(i).raft_addr();
            let rev: i64 = c.client(2).query_one("SELECT raft_join($1, $2)", &[&n, &addr]).unwrap().get(0);
            assert!(rev > 0);
            wait_for(Duration::from_secs(30), "the new node to be promoted to voter", || {
                members(&c, 1).contains(&(n, true)).then_some(())
            });
            let role: String = c.client(i).query_one("SELECT role FROM raft_status()", &[]).unwrap().get(0);
            assert_eq!(role, "follower");
        }
        assert_eq!(members(&c, 3).iter().filter(|m| m.1).count(), 5);
        // Shrink back to three, removing the leader among them.
        let leader = leader_among(&c, &[1, 2, 3, n4, n5]);
        let via = [1, 2].into_iter().find(|&i| i != leader).unwrap();
        c.client(via).query_one("SELECT raft_remove($1)", &[&(leader as i64)]).unwrap();
        let rest: Vec<usize> = [1, 2, 3, n4, n5].into_iter().filter(|&i| i != leader).collect();
        let other = rest.iter().copied().find(|&i| i != via && i != 1 && i != 2).unwrap();
        wait_for(Duration::from_secs(15), "the removal to apply", || {
            let ok = c.client(via).query_one("SELECT raft_remove($1)", &[&(other as i64)]).is_ok();
            ok.then_some(())
        });
        wait_for(Duration::from_secs(10), "the removed nodes to report it", || {
            let r: String = c.client(leader).query_one("SELECT role FROM raft_status()", &[]).ok()?.get(0);
            (r == "removed").then_some(())
        });
        // The writer keeps succeeding after the changes (through the node still a member; one
        // of its two nodes may have been removed, where writes time out).
        let before = acked.lock().unwrap().len();
        wait_for(Duration::from_secs(20), "writes after the membership changes", || {
            (acked.lock().unwrap().len() > before).then_some(())
        });
        stop.store(true, Ordering::Relaxed);
    });
    let remaining: Vec<usize> = [1, 2, 3, n4, n5]
        .into_iter()
        .filter(|&i| {
            c.client(i).query_one("SELECT role FROM raft_status()", &[]).unwrap().get::<_, String>(0) != "removed"
        })
        .collect();
    assert_eq!(remaining.len(), 3, "{remaining:?}");
    let mut cl = c.client(remaining[0]);
    cl.query_one("SELECT raft_set('barrier', 'x')", &[]).unwrap();
    c.assert_converged(&remaining);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the writer made progress: {}", acked.len());
    for (k, v) in &acked {
        let got: Option<String> = cl.query_one("SELECT raft_get($1, 'local')", &[k]).unwrap().get(0);
        assert_eq!(got.as_deref(), Some(v.as_str()), "acknowledged {k} lost");
    }
}

#[test]
fn a_lagging_node_catches_up_by_snapshot_after_compaction() {
    let c = Cluster::builder(3).conf("raft_kv.snapshot_threshold = 1000").start();
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    c.stop_node(3, Stop::Fast);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4 {
            let c = &c;
            s.spawn(move || {
                let mut cl = c.client(t % 2 + 1);
                let n: i64 = cl
                    .query_one(
                        "SELECT count(raft_set('c/' || ($1 * 10000 + g), 'v')) FROM generate_series(1, 7500) g",
                        &[&(t as i32)],
                    )
                    .unwrap()
                    .get(0);
                assert_eq!(n, 7500);
            });
        }
    });
    println!("30,000 writes in {:?}", t0.elapsed());
    for i in 1..=2 {
        let (rows, first, snap): (i64, i64, i64) = {
            let mut cl = c.client(i);
            let rows: i64 = cl.query_one("SELECT count(*) FROM raft_kv.log", &[]).unwrap().get(0);
            let r = cl.query_one("SELECT first_index, snapshot_index FROM raft_status()", &[]).unwrap();
            (rows, r.get(0), r.get(1))
        };
        println!("node {i}: {rows} log rows, first index {first}, snapshot index {snap}");
        assert!(rows <= 1000 + 100, "node {i} keeps {rows} log rows");
        assert!(snap > 20_000);
    }
    c.start_node(3);
    wait_for(Duration::from_secs(60), "node 3 to catch up", || {
        let a = c.applied_index(3)?;
        (a >= c.applied_index(1)?).then_some(())
    });
    let snap: i64 = c.client(3).query_one("SELECT snapshot_index FROM raft_status()", &[]).unwrap().get(0);
    assert!(snap > 20_000, "node 3 installed a snapshot (snapshot index {snap})");
    c.assert_converged(&[1, 2, 3]);
    assert_eq!(c.kv_hash(3).0, 30_000);
    let copied = c.node(3).log().contains("installing the snapshot by copying");
    println!("node 3 installed the snapshot by {}", if copied { "copying its rows" } else { "swapping tables" });
    assert_same_schema(&c, 1, 3);
    // The leader's frozen copy is dropped once compaction moves past it.
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let frozen = |c: &Cluster| -> i64 {
        c.client(leader).query_one("SELECT count(*) FROM raft_kv.snapshot_kv", &[]).unwrap().get(0)
    };
    assert_eq!(frozen(&c), 30_000, "the leader froze its state for node 3");
    c.client(leader)
        .query_one("SELECT count(raft_set('more/' || g, 'v')) FROM generate_series(1, 1200) g", &[])
        .unwrap();
    wait_for(Duration::from_secs(10), "the frozen copy to be dropped", || (frozen(&c) == 0).then_some(()));
}

#[test]
fn leadership_moves_on_request() {
    let c = Cluster::start(3);
    let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let target = (1..=3).find(|&i| i != l).unwrap() as i64;
    let via = (1..=3).find(|&i| i != l && i as i64 != target).unwrap();
    let t0 = Instant::now();
    let ok: bool = c.client(via).query_one("SELECT raft_transfer_leader($1)", &[&target]).unwrap().get(0);
    let took = t0.elapsed();
    println!("leadership moved to {target} in {took:?}");
    assert!(ok && took < Duration::from_secs(2));
    let (now, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    assert_eq!(now as i64, target);
    c.client(l).query_one("SELECT raft_set('after-transfer', 'x')", &[]).unwrap();
}

#[test]
fn a_node_added_after_bootstrap_restarts_from_persisted_addresses() {
    let mut c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let n4 = c.add_node(joiner_conf);
    let addr = c.node(n4).raft_addr();
    c.client(1).query_one("SELECT raft_join(4, $1)", &[&addr]).unwrap();
    wait_for(Duration::from_secs(30), "node 4 to become a voter", || members(&c, 1).contains(&(4, true)).then_some(()));
    // Its postgresql.conf names no peers: after a restart it reaches them through raft_kv.members.
    c.stop_node(n4, Stop::Immediate);
    c.client(2).query_one("SELECT raft_set('while-down', 'x')", &[]).unwrap();
    c.start_node(n4);
    wait_for(Duration::from_secs(20), "node 4 to catch up", || {
        let v: Option<String> = c.client(n4).query_one("SELECT raft_get('while-down', 'local')", &[]).ok()?.get(0);
        (v.as_deref() == Some("x")).then_some(())
    });
    let n: i64 = c.client(n4).query_one("SELECT count(*) FROM raft_kv.members", &[]).unwrap().get(0);
    assert_eq!(n, 4);
    // And all four members serve linearizable reads.
    let v: Option<String> = c.client(n4).query_one("SELECT raft_get('while-down')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("x"));
}

#[test]
fn bad_membership_requests_change_nothing() {
    let mut c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let n4 = c.add_node(joiner_conf);
    let a4 = c.node(n4).raft_addr();
    c.client(1).query_one("SELECT raft_join(4, $1, as_learner => true)", &[&a4]).unwrap();
    wait_for(Duration::from_secs(10), "node 4 as a learner", || members(&c, 2).contains(&(4, false)).then_some(()));
    let before = members(&c, 1);
    let a1 = c.node(1).raft_addr();
    let cases: Vec<(String, &str)> = vec![
        ("SELECT raft_join(2, '127.0.0.1:1')".to_string(), "raft_kv node 2 is already a member"),
        (format!("SELECT raft_join(9, '{a1}')"), "is already used by raft_kv node 1"),
        ("SELECT raft_join(9, 'not-an-address')".into(), "invalid address \"not-an-address\""),
        ("SELECT raft_join(0, '127.0.0.1:1')".into(), "invalid raft_kv node id 0"),
        ("SELECT raft_join(NULL, '127.0.0.1:1')".into(), "raft_kv node id must not be NULL"),
        ("SELECT raft_remove(9)".into(), "raft_kv node 9 is not a member"),
        ("SELECT raft_transfer_leader(4)".into(), "raft_kv node 4 is a learner"),
        ("SELECT raft_transfer_leader(9)".into(), "raft_kv node 9 is not a member"),
    ];
    let mut cl = c.client(2);
    for (q, msg) in &cases {
        let err = cl.query(q.as_str(), &[]).unwrap_err();
        let m = err.as_db_error().unwrap_or_else(|| panic!("{q}: {err}")).message().to_string();
        assert!(m.contains(msg), "{q}: got {m:?}, want {msg:?}");
        assert_eq!(members(&c, 1), before, "{q} changed the membership");
    }
    // Stays a learner once caught up (when a joiner would be promoted): as_learner keeps it so.
    c.client(1).query_one("SELECT raft_set('caught-up', 'x')", &[]).unwrap();
    wait_for(Duration::from_secs(10), "node 4 to catch up", || {
        let v: Option<String> = c.client(n4).query_one("SELECT raft_get('caught-up', 'local')", &[]).ok()?.get(0);
        v.map(|_| ())
    });
    let leader = leader_among(&c, &[1, 2, 3]);
    let matched: Option<i64> =
        c.client(leader).query_one("SELECT match_index FROM raft_members() WHERE id = 4", &[]).unwrap().get(0);
    assert!(matched.is_some_and(|m| m > 0), "the leader sees node 4 caught up");
    assert!(members(&c, 1).contains(&(4, false)));
    // Removing the last voter is refused, on a single-node cluster.
    let single = Cluster::start(1);
    single.wait_leader(&[1], Duration::from_secs(10));
    let err = single.client(1).query("SELECT raft_remove(1)", &[]).unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("last voter"));
    // Admin functions are not for PUBLIC.
    let mut cl = c.client(1);
    cl.batch_execute("CREATE ROLE app LOGIN; SET ROLE app").unwrap();
    let err = cl.query("SELECT raft_remove(4)", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
}

/// Resident memory of a process from /proc: (anonymous, total) in KiB.
fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field =
        |name: &str| status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok();
    Some((field("RssAnon:")?, field("VmRSS:")?))
}

/// The joiner's worker may use at most this much private (anonymous) memory while it receives
/// a snapshot. It is a constant: the table below is several times larger, and the bound does
/// not depend on the table's size (chunks of 256 KiB, 32 in flight: 8 MiB on the wire, more
/// once decoded; 28.6 MiB measured at the peak here, against 12 MiB with 4 in flight).
const SNAPSHOT_RSS_BOUND_KIB: u64 = 48 << 10;

#[test]
fn a_new_node_joins_a_cluster_of_100k_keys_by_streamed_snapshot() {
    const KEYS: i64 = 100_000;
    let mut c = Cluster::builder(1).conf("raft_kv.snapshot_threshold = 5000").start();
    c.wait_leader(&[1], Duration::from_secs(10));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..4i64 {
            let c = &c;
            s.spawn(move || {
                let n: i64 = c
                    .client(1)
                    .query_one(
                        "SELECT count(raft_set('big/' || g, repeat(md5(g::text), 16))) \
                         FROM generate_series($1::bigint, $2::bigint) g",
                        &[&(t * KEYS / 4 + 1), &((t + 1) * KEYS / 4)],
                    )
                    .unwrap()
                    .get(0);
                assert_eq!(n, KEYS / 4);
            });
        }
    });
    let table: i64 = c.client(1).query_one("SELECT pg_table_size('raft_kv.kv')", &[]).unwrap().get(0);
    println!("{KEYS} keys written in {:?}; raft_kv.kv is {} KiB", t0.elapsed(), table / 1024);
    assert!(table / 1024 > SNAPSHOT_RSS_BOUND_KIB as i64, "the table must be larger than the bound");

    let n2 = c.add_node(joiner_conf);
    let t1 = Instant::now();
    let addr = c.node(n2).raft_addr();
    c.client(1).query_one("SELECT raft_join(2, $1)", &[&addr]).unwrap();
    // A transfer cut short: kill the joiner while it is half-way through staging the rows.
    wait_for(Duration::from_secs(60), "the joiner to stage part of the snapshot", || {
        let r = c
            .client(n2)
            .query_one("SELECT (SELECT count(*) FROM raft_kv.incoming_kv), (SELECT count(*) FROM raft_kv.kv)", &[])
            .ok()?;
        let (staged, installed): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!(installed, 0, "the snapshot was installed before the test could interrupt it");
        (staged > 0 && staged < KEYS / 2).then_some(())
    });
    c.kill9(n2);
    wait_for(Duration::from_secs(30), "the leader to report the failed transfer", || {
        c.node(1).log().contains("raft_kv: the snapshot transfer at index").then_some(())
    });
    c.start_node(n2);
    // A reader's open transaction on raft_kv.kv from before the install (the table is still
    // empty, so the install has not happened).
    let mut holder = c.client(n2);
    holder.batch_execute("BEGIN").unwrap();
    let seen: i64 = holder.query_one("SELECT count(*) FROM raft_kv.kv", &[]).unwrap().get(0);
    assert_eq!(seen, 0, "the snapshot was installed before the reader began");
    let pid: i32 = wait_for(Duration::from_secs(10), "the joiner's worker", || {
        c.client(n2).query_one("SELECT worker_pid FROM raft_status()", &[]).ok()?.get(0)
    });
    let (idle_anon, _) = rss_kib(pid).unwrap();
    let done = AtomicBool::new(false);
    let (peak_anon, peak_total) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = (0, 0);
            while !done.load(Ordering::Relaxed) {
                if let Some((a, t)) = rss_kib(pid) {
                    peak = (peak.0.max(a), peak.1.max(t));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let _stop = StopOnDrop(&done);
        wait_for(Duration::from_secs(120), "the new node to be promoted to voter", || {
            members(&c, 1).contains(&(2, true)).then_some(())
        });
        println!("joined, caught up (after one interrupted transfer) and promoted in {:?}", t1.elapsed());
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap()
    });
    println!(
        "joiner worker memory: idle {idle_anon} KiB anonymous; peak during the transfer {peak_anon} KiB \
         anonymous, {peak_total} KiB resident with shared buffers (bound: {SNAPSHOT_RSS_BOUND_KIB} KiB anonymous)"
    );
    assert!(peak_anon < SNAPSHOT_RSS_BOUND_KIB, "peak anonymous memory {peak_anon} KiB");
    // It caught up by a snapshot, streamed: no log replay from the start.
    let snap: i64 = c.client(n2).query_one("SELECT snapshot_index FROM raft_status()", &[]).unwrap().get(0);
    assert!(snap > KEYS / 2, "snapshot index {snap}");
    let log = c.node(1).log();
    for line in log.lines().filter(|l| l.contains("froze the state machine")) {
        println!("leader: {}", line.split("LOG:").nth(1).unwrap_or(line).trim());
    }
    let sent = log.matches("raft_kv: sending the snapshot at index").count();
    assert!(sent >= 2, "the snapshot was sent again after the failed transfer ({sent} transfers)");
    assert!(c.node(n2).log().contains(&format!("raft_kv: node 2 installed the snapshot at index {snap}")));
    c.client(1).query_one("SELECT raft_set('after-join', 'x')", &[]).unwrap();
    c.assert_converged(&[1, n2]);
    assert_eq!(c.kv_hash(n2).0, KEYS + 1);
    // A reader's transaction held raft_kv.kv: the install copied the rows instead of swapping
    // the tables, without waiting for it.
    assert!(c.node(n2).log().contains("installing the snapshot by copying"), "the install did not copy");
    holder.batch_execute("COMMIT").unwrap();
    let staged: i64 = c.client(n2).query_one("SELECT count(*) FROM raft_kv.incoming_kv", &[]).unwrap().get(0);
    assert_eq!(staged, 0);
    assert_same_schema(&c, 1, n2);
}

#[test]
fn a_second_change_while_one_is_pending_is_refused() {
    // A long election timeout: the leader must not lose its leadership while the others are
    // stopped (else the pending change could be overwritten by a new leader, which is fine
    // for raft but not what this test is about).
    let mut c = Cluster::builder(3).conf("raft_kv.apply_timeout = 20000").conf("raft_kv.election_ticks = 60").start();
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(30));
    let n4 = c.add_node(joiner_conf);
    let addr = c.node(n4).raft_addr();
    let others: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    // Without a quorum the first change stays pending on the leader.
    for &i in &others {
        c.pause(i, true);
    }
    std::thread::scope(|s| {
        let first =
            s.spawn(|| c.client(leader).query_one("SELECT raft_join(4, $1)", &[&addr]).map(|r| r.get::<_, i64>(0)));
        let mut cl = c.client(leader);
        wait_for(Duration::from_secs(10), "the first change to be pending", || {
            cl.query_one("SELECT change_pending FROM raft_status()", &[]).unwrap().get::<_, bool>(0).then_some(())
        });
        // The second request fails at once, clearly, and changes nothing.
        let err = cl.query("SELECT raft_remove($1)", &[&(others[0] as i64)]).unwrap_err();
        let db = err.as_db_error().expect("a database error");
        assert!(db.message().contains("a raft_kv membership change is already in progress"), "{}", db.message());
        assert_eq!(db.code().code(), "55000");
        for &i in &others {
            c.pause(i, false);
        }
        let rev = first.join().unwrap().expect("the first change completes once the quorum is back");
        assert!(rev > 0);
    });
    wait_for(Duration::from_secs(20), "node 4 to be a member everywhere", || {
        (1..=3).all(|i| members(&c, i).iter().any(|m| m.0 == 4)).then_some(())
    });
    for i in 1..=3 {
        assert_eq!(members(&c, i).iter().filter(|m| m.1).count(), 3, "no voter was removed (node {i})");
    }
}

#[test]
fn a_freeze_without_a_worker_slot_is_retried_and_writes_go_on() {
    // Two worker slots: the raft_kv worker and the logical replication launcher take both.
    let mut c = Cluster::builder(1).conf("max_worker_processes = 2").start();
    c.wait_leader(&[1], Duration::from_secs(10));
    c.client(1).query_one("SELECT count(raft_set('k/' || g, 'v')) FROM generate_series(1, 100) g", &[]).unwrap();
    let n2 = c.add_node(joiner_conf);
    let addr = c.node(n2).raft_addr();
    c.client(1).query_one("SELECT raft_join(2, $1)", &[&addr]).unwrap();
    wait_for(Duration::from_secs(20), "the leader to report it cannot start the freeze worker", || {
        c.node(1).log().contains("raft_kv: cannot start the snapshot freeze worker").then_some(())
    });
    // The Raft loop is not held up by it.
    c.client(1).query_one("SELECT raft_set('during', 'x')", &[]).unwrap();
    assert!(!members(&c, 1).contains(&(2, true)));
    // With a slot free again (after a restart with more), the freeze happens and node 2 joins.
    let conf = c.node(1).data().join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new().append(true).open(conf).unwrap();
    std::io::Write::write_all(&mut f, b"\nmax_worker_processes = 8\n").unwrap();
    c.stop_node(1, Stop::Fast);
    c.start_node(1);
    wait_for(Duration::from_secs(60), "node 2 to be promoted to voter", || {
        members(&c, 1).contains(&(2, true)).then_some(())
    });
    c.assert_converged(&[1, n2]);
    assert_eq!(c.kv_hash(n2).0, 101);
}

/// Every table, index, constraint and trigger of raft_kv on node `b` is as on node `a`: same
/// names, definitions, persistence and rights (a snapshot install swaps tables by renaming).
fn assert_same_schema(c: &Cluster, a: usize, b: usize) {
    let catalog = |i: usize| -> Vec<String> {
        c.client(i)
            .query(
                "SELECT format('%s %s %s %s %s', c.relname, c.relkind, c.relpersistence, c.relacl, \
                        coalesce(pg_get_indexdef(c.oid), '')) \
                 FROM pg_class c WHERE c.relnamespace = 'raft_kv'::regnamespace \
                 UNION ALL SELECT format('constraint %s on %s: %s', conname, conrelid::regclass, \
                        pg_get_constraintdef(oid)) FROM pg_constraint WHERE connamespace = 'raft_kv'::regnamespace \
                 UNION ALL SELECT format('trigger %s on %s', tgname, tgrelid::regclass) FROM pg_trigger \
                        WHERE tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'raft_kv'::regnamespace) \
                 ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let (before, after) = (catalog(a), catalog(b));
    assert!(before.iter().any(|l| l.starts_with("kv_pkey ")), "{before:?}");
    assert_eq!(before, after);
}
