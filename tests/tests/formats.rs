//! Versioned log formats (issue 14): a node whose log holds a committed entry written in a
//! newer format than its build reads stops before it, says so in raft_status() and its log,
//! and never skips it; the rest of the cluster carries on.

use std::time::Duration;

use raft_kv_tests::{wait_for, Cluster, Stop};

#[test]
fn a_committed_entry_of_a_newer_format_stops_the_node_instead_of_being_skipped() {
    let c = Cluster::start(3);
    let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let f = if l == 1 { 2 } else { 1 };
    for n in 0..5 {
        c.client(l).query_one("SELECT raft_set($1, 'v')", &[&format!("k{n}")]).unwrap();
    }
    c.assert_converged(&[1, 2, 3]);
    // As if a newer build had written the follower's last applied entry: take the worker out
    // (an invalid node id keeps it idle), mark the entry unapplied and give it format 99 (newer than any build).
    let mut cl = c.client(f);
    cl.batch_execute("ALTER SYSTEM SET raft_kv.node_id = 0").unwrap();
    c.stop_node(f, Stop::Fast);
    c.start_node(f);
    let mut cl2 = c.client(f);
    let idx: i64 = wait_for(Duration::from_secs(10), "the idle worker", || {
        let r = cl2.query_one("SELECT state FROM raft_status()", &[]).ok()?;
        r.get::<_, String>(0).starts_with("configuration error").then_some(())?;
        Some(cl2.query_one("SELECT max(idx) FROM raft_kv.log WHERE kind = 0 AND data <> ''", &[]).unwrap().get(0))
    });
    cl2.batch_execute(&format!(
        "SET session_replication_role = replica; \
         UPDATE raft_kv.log SET data = set_byte(data, 0, 99) WHERE idx = {idx}; \
         UPDATE raft_kv.state SET applied_index = {idx} - 1"
    ))
    .unwrap();
    cl2.batch_execute("ALTER SYSTEM RESET raft_kv.node_id").unwrap();
    drop((cl, cl2));
    c.stop_node(f, Stop::Fast);
    c.start_node(f);
    let state: String = wait_for(Duration::from_secs(20), "the node to stop at the entry", || {
        let s: String = c.client(f).query_one("SELECT state FROM raft_status()", &[]).ok()?.get(0);
        s.starts_with("stopped").then_some(s)
    });
    assert!(state.contains(&format!("index {idx} is in format version 99")), "{state}");
    assert!(state.contains("upgrade raft_kv"), "{state}");
    assert!(c.node(f).log().contains("upgrade raft_kv on this node"));
    // It applied nothing from that entry on, and requests fail clearly instead of hanging.
    let applied: i64 = c.client(f).query_one("SELECT applied_index FROM raft_kv.state", &[]).unwrap().get(0);
    assert_eq!(applied, idx - 1);
    let e = c.client(f).query_one("SELECT raft_set('x', 'y')", &[]).unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(msg.contains("not running on this node: stopped"), "{msg}");
    // The others carry on.
    let others: Vec<usize> = (1..=3).filter(|&i| i != f).collect();
    c.wait_leader(&others, Duration::from_secs(20));
    c.client(others[0]).query_one("SELECT raft_set('after', 'v')", &[]).unwrap();
}

/// After a package upgrade the new library may run on the old SQL: the worker says exactly
/// what to run, serves nothing meanwhile, and starts once the versions match.
#[test]
fn a_library_that_does_not_match_the_installed_sql_says_what_to_run() {
    let c = Cluster::start(3);
    let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let f = if l == 1 { 2 } else { 1 };
    let version: String =
        c.client(f).query_one("SELECT extversion FROM pg_extension WHERE extname = 'raft_kv'", &[]).unwrap().get(0);
    c.client(f).batch_execute("UPDATE pg_extension SET extversion = '0.0.1' WHERE extname = 'raft_kv'").unwrap();
    c.stop_node(f, Stop::Fast);
    c.start_node(f);
    let state: String = wait_for(Duration::from_secs(20), "the worker to report the mismatch", || {
        let s: String = c.client(f).query_one("SELECT state FROM raft_status()", &[]).ok()?.get(0);
        s.starts_with("version mismatch").then_some(s)
    });
    assert!(state.contains(&format!("library is version {version}")), "{state}");
    assert!(state.contains("is version 0.0.1; run ALTER EXTENSION raft_kv UPDATE"), "{state}");
    let e = c.client(f).query_one("SELECT raft_set('x', 'y')", &[]).unwrap_err();
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(msg.contains("version mismatch"), "{msg}");
    // Once the SQL matches (what ALTER EXTENSION ... UPDATE would do), the node rejoins.
    c.client(f)
        .batch_execute(&format!("UPDATE pg_extension SET extversion = '{version}' WHERE extname = 'raft_kv'"))
        .unwrap();
    wait_for(Duration::from_secs(20), "the node to run again", || {
        let s: String = c.client(f).query_one("SELECT state FROM raft_status()", &[]).ok()?.get(0);
        (s == "running").then_some(())
    });
    c.client(f).query_one("SELECT raft_set('after', 'v')", &[]).unwrap();
    c.assert_converged(&[1, 2, 3]);
}
