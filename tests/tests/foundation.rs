//! Issue 2: a cluster comes up from postgresql.conf; bad settings and a missing preload are
//! reported clearly while the server stays up.

use std::time::Duration;

use raft_kv_tests::{wait_for, Cluster, NodeSpec};

fn state(c: &Cluster, i: usize) -> Option<String> {
    c.try_client(i)?.query_one("SELECT state FROM raft_status()", &[]).ok()?.get(0)
}

#[test]
fn three_nodes_come_up_running() {
    let c = Cluster::start(3);
    for i in 1..=3 {
        wait_for(Duration::from_secs(20), "node running", || (state(&c, i)? == "running").then_some(()));
        let r =
            c.client(i).query_one("SELECT node_id, listen_addr, peers, worker_pid FROM raft_status()", &[]).unwrap();
        assert_eq!(r.get::<_, Option<i64>>(0), Some(i as i64));
        assert_eq!(r.get::<_, Option<String>>(1), Some(c.node(i).raft_addr()));
        let peers: String = r.get(2);
        assert_eq!(peers.split(',').count(), 3);
        assert!(r.get::<_, Option<i32>>(3).unwrap() > 0);
        let log = c.node(i).log();
        assert!(log.contains(&format!("raft_kv: node {i} listening on {}", c.node(i).raft_addr())), "log:\n{log}");
    }
}

/// Starts one node with the given raft_kv lines and checks the reported configuration error.
fn assert_config_error(raft_lines: impl Fn(&NodeSpec) -> String + 'static, expected: &str) {
    let c = Cluster::builder(1)
        .raft_conf(move |spec, _| format!("shared_preload_libraries = 'raft_kv'\n{}", raft_lines(spec)))
        .start();
    let st = wait_for(Duration::from_secs(20), "a configuration error state", || {
        state(&c, 1).filter(|s| s.starts_with("configuration error"))
    });
    assert!(st.contains(expected), "state {st:?} should contain {expected:?}");
    // The server stays up and usable.
    let one: i32 = c.client(1).query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);
    let log = c.node(1).log();
    assert!(log.contains(expected), "server log should contain {expected:?}:\n{log}");
    // Writes are refused with the reason.
    let err = c.client(1).query_one("SELECT raft_set('k', 'v')", &[]).unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("raft_kv is not running on this node") && msg.contains(expected), "{msg}");
}

#[test]
fn missing_node_id() {
    assert_config_error(
        |s| format!("raft_kv.listen_addr = '127.0.0.1:{}'\nraft_kv.peers = '1=127.0.0.1:{}'", s.raft_port, s.raft_port),
        "raft_kv.node_id is not set",
    );
}

/// A node not listed in raft_kv.peers does not bootstrap: it waits to be added (issue 4).
#[test]
fn node_id_absent_from_peers_waits_to_join() {
    let c = Cluster::builder(1)
        .raft_conf(|s, _| {
            format!(
                "shared_preload_libraries = 'raft_kv'\nraft_kv.node_id = 7\nraft_kv.listen_addr = '127.0.0.1:{0}'\n\
                 raft_kv.peers = '1=127.0.0.1:{1}'",
                s.raft_port,
                s.raft_port + 1
            )
        })
        .start();
    let role = wait_for(Duration::from_secs(20), "the node to wait as 'joining'", || {
        let r = c.try_client(1)?.query_one("SELECT state, role FROM raft_status()", &[]).ok()?;
        let (state, role): (String, Option<String>) = (r.get(0), r.get(1));
        (state == "running").then_some(role).flatten()
    });
    assert_eq!(role, "joining");
    let log = c.node(1).log();
    assert!(log.contains("node 7 is not a member yet; it waits to be added with raft_join()"), "{log}");
}

#[test]
fn duplicate_ids() {
    assert_config_error(
        |s| {
            format!(
            "raft_kv.node_id = 1\nraft_kv.listen_addr = '127.0.0.1:{0}'\nraft_kv.peers = '1=127.0.0.1:{0},1=127.0.0.1:{1}'",
            s.raft_port,
            s.raft_port + 1
        )
        },
        "node id 1 appears more than once in raft_kv.peers",
    );
}

#[test]
fn malformed_peer_list() {
    assert_config_error(
        |s| {
            format!(
            "raft_kv.node_id = 1\nraft_kv.listen_addr = '127.0.0.1:{0}'\nraft_kv.peers = '1=127.0.0.1:{0},2:127.0.0.1:9'",
            s.raft_port
        )
        },
        "invalid raft_kv.peers entry \"2:127.0.0.1:9\": expected id=host:port",
    );
}

#[test]
fn malformed_address() {
    assert_config_error(
        |_| "raft_kv.node_id = 1\nraft_kv.listen_addr = 'localhost:99999'\nraft_kv.peers = ''".to_string(),
        "invalid address \"localhost:99999\"",
    );
}

#[test]
fn heartbeat_not_below_election() {
    assert_config_error(
        |s| {
            format!(
                "raft_kv.node_id = 1\nraft_kv.listen_addr = '127.0.0.1:{0}'\nraft_kv.peers = '1=127.0.0.1:{0}'\n\
             raft_kv.election_ticks = 5\nraft_kv.heartbeat_ticks = 5",
                s.raft_port
            )
        },
        "raft_kv.heartbeat_ticks (5) must be less than raft_kv.election_ticks (5)",
    );
}

#[test]
fn misspelt_setting_is_an_error() {
    let c = Cluster::start(1);
    let err = c.client(1).batch_execute("SET raft_kv.nodeid = 3").unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("raft_kv.nodeid"), "{msg}");
}

#[test]
fn without_preload_every_function_names_shared_preload_libraries() {
    let c = Cluster::builder(1).raft_conf(|_, _| String::new()).start();
    let mut cl = c.client(1);
    for q in [
        "SELECT * FROM raft_status()",
        "SELECT * FROM raft_members()",
        "SELECT raft_set('k', 'v')",
        "SELECT raft_get('k')",
        "SELECT raft_delete('k')",
    ] {
        let err = cl.query(q, &[]).unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{q}: {err}"));
        assert!(db.message().contains("shared_preload_libraries"), "{q}: {}", db.message());
        assert_eq!(db.code().code(), "55000", "{q}");
    }
    // The extension's tables exist and nothing was written.
    let n: i64 = cl.query_one("SELECT count(*) FROM raft_kv.kv", &[]).unwrap().get(0);
    assert_eq!(n, 0);
}
