//! Rolling restarts (issue 14): every node restarted in turn with `pg_ctl restart -m fast`
//! while a writer on every node keeps writing with request ids and retries, as the README
//! recommends. A stopping leader hands leadership over first, so no write fails for good; the
//! longest stall is reported (measured in bench/failover.sh, not asserted here).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use raft_kv_tests::{steady_writer, wait_for, Cluster, Stop, StopOnDrop};

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
                s.spawn(move || steady_writer(c, home, "rolling", stop, failed, longest).0)
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
