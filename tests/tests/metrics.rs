//! Issue 14: monitoring. `raft_kv.stat` and `raft_kv.stat_peers` count what the worker does, a
//! pg_monitor role may read them, and every metric the postgres_exporter file in contrib/
//! defines is a column its query returns.

use std::time::Duration;

use raft_kv_tests::{wait_for, Client, Cluster};

const EXPORTER: &str = include_str!("../../contrib/postgres_exporter.yaml");

/// (query, metric names) of each entry of the exporter file.
fn exporter_queries() -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_query = false;
    for line in EXPORTER.lines() {
        let t = line.trim();
        if t == "query: |" {
            out.push((String::new(), Vec::new()));
            in_query = true;
        } else if t == "metrics:" {
            in_query = false;
        } else if in_query {
            out.last_mut().unwrap().0.push_str(&format!("{t}\n"));
        } else if let Some(name) = line.strip_prefix("    - ").and_then(|n| n.strip_suffix(':')) {
            out.last_mut().unwrap().1.push(name.to_string());
        }
    }
    out
}

fn monitor(c: &Cluster, node: usize) -> Client {
    let mut cl = c.client(node);
    cl.batch_execute("SET ROLE monitor").unwrap();
    cl
}

fn stat(c: &Cluster, node: usize, column: &str) -> i64 {
    monitor(c, node).query_one(&format!("SELECT {column} FROM raft_kv.stat"), &[]).unwrap().get(0)
}

#[test]
fn the_stat_views_count_what_happens_and_serve_every_exported_metric() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    for n in 1..=3 {
        c.client(n).batch_execute("CREATE ROLE monitor IN ROLE pg_monitor").unwrap();
    }
    let follower = leader % 3 + 1;
    for i in 0..10 {
        c.client(follower).query_one("SELECT raft_set($1, 'v')", &[&format!("m/{i}")]).unwrap();
    }
    c.client(follower).query_one("SELECT raft_get('m/1')", &[]).unwrap();
    assert!(stat(&c, follower, "proposals") >= 10);
    assert!(stat(&c, follower, "forwarded") >= 10, "a follower forwards its writes");
    assert!(stat(&c, follower, "read_index_requests") >= 1);
    assert!(stat(&c, leader, "elections_won") >= 1);
    assert!(stat(&c, leader, "applied_entries") >= 10);
    assert_eq!(stat(&c, leader, "apply_lag"), 0);
    assert!(stat(&c, leader, "log_bytes") > 0);
    // The third node, on which no request waited, held some of those writes back and applied
    // them together.
    let other = 6 - leader - follower;
    wait_for(Duration::from_secs(5), "a held-back apply to be counted", || {
        (stat(&c, other, "deferred_applies") >= 1).then_some(())
    });

    // Every exported metric is a column of its query, readable by a pg_monitor role.
    let queries = exporter_queries();
    assert_eq!(queries.len(), 2, "{queries:?}");
    for (query, metrics) in &queries {
        assert!(!metrics.is_empty());
        for n in 1..=3 {
            let rows = monitor(&c, n).query(query.as_str(), &[]).unwrap_or_else(|e| panic!("{query}: {e}"));
            assert!(!rows.is_empty(), "node {n}: {query}");
            let columns: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
            for m in metrics {
                assert!(columns.contains(&m.as_str()), "node {n}: metric {m} missing from {columns:?}");
            }
        }
    }
    // The leader sees both peers connected, recently heard from, with their match index.
    let peers = wait_for(Duration::from_secs(5), "the leader's peer view", || {
        let rows = monitor(&c, leader)
            .query(
                "SELECT connected, extract(epoch FROM last_contact_age)::float8, match_index FROM raft_kv.stat_peers",
                &[],
            )
            .unwrap();
        let all = rows.len() == 2
            && rows.iter().all(|r| r.get::<_, bool>(0) && r.get::<_, Option<f64>>(1).is_some_and(|a| a < 3.0));
        all.then_some(rows)
    });
    assert!(peers.iter().all(|r| r.get::<_, Option<i64>>(2).is_some()));
    // Nobody else reads them.
    let mut nobody = c.client(1);
    nobody.batch_execute("CREATE ROLE nobody; SET ROLE nobody").unwrap();
    let e = nobody.query("SELECT * FROM raft_kv.stat", &[]).unwrap_err();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("42501"), "{e}");

    // A leader crash: the survivors count an election and a leader change.
    let before: Vec<i64> = (1..=3).map(|n| stat(&c, n, "leader_changes")).collect();
    c.kill9(leader);
    let others: Vec<usize> = (1..=3).filter(|&n| n != leader).collect();
    let (new_leader, _) = c.wait_leader(&others, Duration::from_secs(10));
    assert!(stat(&c, new_leader, "elections_started") >= 1);
    assert!(stat(&c, new_leader, "elections_won") >= 1);
    for &n in &others {
        wait_for(Duration::from_secs(5), "the leader change to be counted", || {
            (stat(&c, n, "leader_changes") > before[n - 1]).then_some(())
        });
    }
    let down = wait_for(Duration::from_secs(10), "the dead peer to show as disconnected", || {
        monitor(&c, new_leader)
            .query_one("SELECT connected FROM raft_kv.stat_peers WHERE peer_id = $1", &[&(leader as i64)])
            .ok()
            .filter(|r| !r.get::<_, bool>(0))
    });
    assert!(!down.get::<_, bool>(0));
    c.start_node(leader);
}
