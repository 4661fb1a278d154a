//! Rolling restarts (issue 14): every node restarted in turn with `pg_ctl restart -m fast`
//! while a writer on every node keeps writing with request ids and retries, as the README
//! recommends. A stopping leader hands leadership over first, so no write fails for good; the
//! longest stall is reported (measured in bench/failover.sh, not asserted here).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use raft_kv_tests::{wait_for, Client, Cluster, Stop, StopOnDrop};

/// Writes until `stop`, through node `home` (another node while it is down); returns the
/// number of acknowledged writes. Each write is retried with its request id until it is
/// acknowledged or 20 s pass (then it counts as failed).
fn writer(c: &Cluster, home: usize, stop: &AtomicBool, failed: &AtomicUsize, longest_ms: &AtomicU64) -> u64 {
    let mut conn: Option<(usize, Client)> = None;
    let mut n = 0u64;
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (key, value, rid) = (format!("w{home}/{}", n % 10), format!("v{n}"), format!("rolling-{home}-{n}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Some((_, cl)) = conn.as_mut() else {
                let order = [home, home % 3 + 1, (home + 1) % 3 + 1];
                conn = order.iter().find_map(|&i| c.try_client(i).map(|cl| (i, cl)));
                if conn.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            };
            match cl.query_one("SELECT raft_set($1, $2, $3)", &[&key, &value, &rid]) {
                Ok(_) => {
                    let gap = last_ok.elapsed().as_millis() as u64;
                    longest_ms.fetch_max(gap, Ordering::Relaxed);
                    last_ok = Instant::now();
                    break;
                }
                Err(e) => {
                    // 40001 / 40003: retry with the same id; a lost connection: reconnect.
                    if cl.is_closed() || e.as_db_error().is_none() {
                        conn = None;
                    }
                    if Instant::now() > deadline {
                        eprintln!("writer {home}: write {n} failed after 20 s of retries: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        // Back home once it is up again.
        if conn.as_ref().is_some_and(|(i, _)| *i != home) {
            if let Some(cl) = c.try_client(home) {
                conn = Some((home, cl));
            }
        }
    }
    n
}

#[test]
fn a_rolling_restart_fails_no_write() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let stop = AtomicBool::new(false);
    let failed = AtomicUsize::new(0);
    let longest = AtomicU64::new(0);
    let mut handed_over = 0;
    let mut writes = 0;
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let writers: Vec<_> = (1..=3)
            .map(|home| {
                let (c, stop, failed, longest) = (&c, &stop, &failed, &longest);
                s.spawn(move || writer(c, home, stop, failed, longest))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        // The current leader first, then the others, so at least one restart is a leader's.
        let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
        let order = [l, l % 3 + 1, (l + 1) % 3 + 1];
        for i in order {
            let was_leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(20)).0 == i;
            let before = c.node(i).log().len();
            c.stop_node(i, Stop::Fast);
            if was_leader {
                let log = c.node(i).log();
                assert!(
                    log[before..].contains("handing leadership to node"),
                    "node {i} did not hand over:\n{}",
                    &log[before..]
                );
                if log[before..].contains(&format!("; node {i} stops")) && !log[before..].contains("did not take over")
                {
                    handed_over += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
            c.start_node(i);
            wait_for(Duration::from_secs(30), "the restarted node to catch up", || {
                let a = c.applied_index(i)?;
                let b = c.applied_index(order.iter().copied().find(|&j| j != i).unwrap())?;
                (a + 5 >= b).then_some(())
            });
            std::thread::sleep(Duration::from_secs(1));
        }
        stop.store(true, Ordering::Relaxed);
        writes = writers.into_iter().map(|w| w.join().unwrap()).sum::<u64>();
    });
    println!(
        "rolling restart: {writes} writes, {} failed after retries, longest stall {} ms, {handed_over} leader hand-overs",
        failed.load(Ordering::Relaxed),
        longest.load(Ordering::Relaxed)
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0, "writes failed after retries");
    assert!(handed_over >= 1, "the leader's restart must hand leadership over");
    c.wait_leader(&[1, 2, 3], Duration::from_secs(20));
    c.assert_converged(&[1, 2, 3]);
}
