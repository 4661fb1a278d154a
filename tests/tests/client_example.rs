//! Issue 14 (client examples): the README's Python client (examples/client.py) keeps writing
//! and reading through a fast restart of the node it is connected to and a crash of the leader,
//! with one request id per logical write and retries on the next node; every write it
//! acknowledged is there once, at the revision it reported. Bad input is not retried.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use raft_kv_tests::{Cluster, Stop};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/client.py");

fn multi_host_dsn(c: &Cluster) -> String {
    let ports: Vec<String> = c.nodes.iter().map(|n| n.spec.pg_port.to_string()).collect();
    format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=2",
        vec!["127.0.0.1"; ports.len()].join(","),
        ports.join(",")
    )
}

#[test]
fn the_python_client_rides_through_a_restart_and_a_leader_crash() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let dsn = multi_host_dsn(&c);
    const COUNT: usize = 120;
    let mut child = Command::new("/usr/bin/python3")
        .args([SCRIPT, &dsn, "load", "ex/", &COUNT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running examples/client.py (needs python3-psycopg)");
    let stderr = child.stderr.take().unwrap();
    let err_lines = std::thread::spawn(move || BufReader::new(stderr).lines().map(|l| l.unwrap()).collect::<Vec<_>>());
    let mut acked: Vec<(String, i64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let mut f = line.split_whitespace();
        assert_eq!(f.next(), Some("ok"), "{line}");
        acked.push((f.next().unwrap().to_string(), f.next().unwrap().parse().unwrap()));
        assert!(Instant::now() < deadline, "the client is too slow");
        // The client starts on node 1 (first in its host list): restart it under it.
        if acked.len() == 20 {
            c.stop_node(1, Stop::Fast);
            c.start_node(1);
        }
        // Then crash the leader of the moment and bring it back.
        if acked.len() == 60 {
            let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
            c.kill9(l);
            c.start_node(l);
        }
    }
    let status = child.wait().unwrap();
    let err = err_lines.join().unwrap();
    assert!(status.success(), "client failed: {err:?}");
    assert_eq!(acked.len(), COUNT);
    assert!(err.iter().any(|l| l.starts_with("retry ")), "the restart must have cost the client a retry: {err:?}");
    assert!(err.iter().all(|l| l.starts_with("retry ")), "{err:?}");
    println!("leader at start {leader}; retries: {}", err.len());
    // Every acknowledged write is there on every node, applied once, at the reported revision.
    c.assert_converged(&[1, 2, 3]);
    for i in 1..=3 {
        let rows = c
            .client(i)
            .query("SELECT key, value, mod_revision, version FROM raft_kv.kv WHERE key LIKE 'ex/%'", &[])
            .unwrap();
        assert_eq!(rows.len(), COUNT, "node {i}");
        for r in rows {
            let key: String = r.get(0);
            let n: usize = key["ex/".len()..].parse().unwrap();
            assert_eq!(r.get::<_, String>(1), format!("v{n}"));
            assert_eq!(r.get::<_, i64>(2), acked[n].1, "{key}: the revision the client was given");
            assert_eq!(r.get::<_, i64>(3), 1, "{key} written once");
        }
    }
    // Bad input (an oversize key: 54000) fails at once, with its SQLSTATE, and is not retried.
    let out = Command::new("/usr/bin/python3").args([SCRIPT, &dsn, "put", &"k".repeat(2000), "v"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error: 54000") && !err.contains("retry"), "{err}");
    // And a plain put and get through the multi-host string.
    let out = Command::new("/usr/bin/python3").args([SCRIPT, &dsn, "put", "ex/single", "one"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("/usr/bin/python3").args([SCRIPT, &dsn, "get", "ex/single"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "one");
}
