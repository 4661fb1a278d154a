//! Issue 13: leases on a real 3-node cluster. Keys attached to a lease go when it expires
//! (decided by the leader, carried out through the log, in the history) or is revoked; a
//! kept-alive lease survives leader kills and partitions; a leader change never expires a lease
//! early; bad input changes nothing. Also leader election built on leases.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raft_kv_tests::{wait_for, Client, Cluster, StopOnDrop};

/// The default election timeout's upper end (tick 100 ms, 10 ticks, randomized up to twice).
const ELECTION_TIMEOUT: Duration = Duration::from_millis(2000);

fn grant(cl: &mut Client, ttl: &str) -> i64 {
    cl.query_one("SELECT raft_lease_grant($1::text::interval)", &[&ttl]).unwrap().get(0)
}

fn local(c: &Cluster, node: usize, key: &str) -> Option<String> {
    c.client(node).query_one("SELECT raft_get($1, 'local')", &[&key]).unwrap().get(0)
}

/// The kinds of `key`'s changes in the history of `node`, in revision order.
fn history(c: &Cluster, node: usize, key: &str) -> Vec<(i64, String)> {
    c.client(node)
        .query("SELECT revision, kind FROM raft_changes(1, $1) WHERE key = $1 ORDER BY revision", &[&key])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn sqlstate(e: &postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| e.to_string())
}

#[test]
fn a_key_on_a_lease_without_keepalives_is_deleted_on_every_node_after_its_ttl() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let follower = leader % 3 + 1;
    let mut cl = c.client(follower);
    let invoked = Instant::now();
    let id = grant(&mut cl, "3s");
    let granted = Instant::now();
    cl.execute("SELECT raft_set('svc/a', 'up', lease => $1)", &[&id]).unwrap();
    cl.execute("SELECT raft_set('plain', 'stays')", &[]).unwrap();
    let gone = wait_for(Duration::from_secs(10), "the leased key to be deleted on every node", || {
        (1..=3).all(|n| local(&c, n, "svc/a").is_none()).then(Instant::now)
    });
    println!("the key went {:?} after the grant was invoked, {:?} after it returned", gone - invoked, gone - granted);
    assert!(gone - invoked >= Duration::from_secs(3), "expired early: {:?}", gone - invoked);
    assert!(
        gone - granted <= Duration::from_secs(3) + ELECTION_TIMEOUT,
        "expired late: {:?} after the last keepalive",
        gone - granted
    );
    for n in 1..=3 {
        let h = history(&c, n, "svc/a");
        assert_eq!(h.iter().map(|(_, k)| k.as_str()).collect::<Vec<_>>(), ["put", "delete"], "node {n}: {h:?}");
        assert_eq!(h, history(&c, 1, "svc/a"), "the same revisions on every node");
        assert_eq!(local(&c, n, "plain").as_deref(), Some("stays"));
    }
    let e = cl.query_one("SELECT raft_lease_keepalive($1)", &[&id]).unwrap_err();
    assert_eq!(sqlstate(&e), "42704", "{e}");
}

#[test]
fn revoking_a_lease_deletes_its_keys_at_one_revision() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let mut cl = c.client(2);
    let id = grant(&mut cl, "60s");
    for k in ["r/1", "r/2", "r/3"] {
        cl.execute("SELECT raft_set($1, 'v', lease => $2)", &[&k, &id]).unwrap();
    }
    // A transaction attaches a key too; a plain put detaches one.
    cl.execute(
        "SELECT * FROM raft_txn('[]', jsonb_build_array(jsonb_build_object('op', 'put', 'key', 'r/4', 'value', 'v', 'lease', $1::bigint)))",
        &[&id],
    )
    .unwrap();
    cl.execute("SELECT raft_set('r/3', 'mine now')", &[]).unwrap();
    let row = cl.query_one("SELECT granted_ttl::text, keys FROM raft_lease_ttl($1)", &[&id]).unwrap();
    assert_eq!(row.get::<_, String>(0), "00:01:00");
    assert_eq!(row.get::<_, Vec<String>>(1), ["r/1", "r/2", "r/4"]);
    let revision: i64 = cl.query_one("SELECT raft_lease_revoke($1)", &[&id]).unwrap().get(0);
    for n in 1..=3 {
        let rows = c
            .client(n)
            .query(
                "SELECT key FROM raft_changes($1, 'r/') WHERE revision = $1 AND kind = 'delete' ORDER BY key",
                &[&revision],
            )
            .unwrap();
        let keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(keys, ["r/1", "r/2", "r/4"], "node {n}: every attached key, at revision {revision}");
        let _ = c.client(n).query_one("SELECT raft_get('r/1')", &[]).unwrap();
        assert_eq!(local(&c, n, "r/3").as_deref(), Some("mine now"));
    }
    assert!(cl.query("SELECT * FROM raft_leases()", &[]).unwrap().is_empty());
    let e = cl.query_one("SELECT raft_lease_revoke($1)", &[&id]).unwrap_err();
    assert_eq!(sqlstate(&e), "42704", "{e}");
}

/// Keeps lease `id` alive every second through any node that answers, until `stop`.
fn keep_alive(c: &Cluster, id: i64, stop: &AtomicBool, failures: &std::sync::atomic::AtomicUsize) {
    let mut node = 1;
    let mut conn: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let ok = conn
            .get_or_insert_with(|| {
                let mut cl = loop {
                    if let Some(cl) = c.try_client(node) {
                        break cl;
                    }
                    node = node % 3 + 1;
                };
                cl.batch_execute("SET raft_kv.apply_timeout = '1s'").unwrap();
                cl
            })
            .query_one("SELECT raft_lease_keepalive($1)", &[&id]);
        if let Err(e) = ok {
            assert_ne!(sqlstate(&e), "42704", "the lease expired: {e}");
            failures.fetch_add(1, Ordering::Relaxed);
            conn = None;
            node = node % 3 + 1;
            continue;
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    }
}

#[test]
fn a_kept_alive_lease_survives_a_leader_kill_and_a_partitioned_leader() {
    let c = Cluster::builder(3).proxied().start();
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let mut cl = c.client(leader % 3 + 1);
    let id = grant(&mut cl, "3s");
    cl.execute("SELECT raft_set('svc/kept', 'up', lease => $1)", &[&id]).unwrap();
    drop(cl);
    let stop = AtomicBool::new(false);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| keep_alive(&c, id, &stop, &failures));
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(4));
        let (old, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
        c.kill9(old);
        let others: Vec<usize> = (1..=3).filter(|&n| n != old).collect();
        c.wait_leader(&others, Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(4));
        c.start_node(old);
        std::thread::sleep(Duration::from_secs(4));
        let (old, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
        let others: Vec<u64> = (1..=3).filter(|&n| n != old as u64).collect();
        c.net.as_ref().unwrap().partition(&[vec![old as u64], others]);
        std::thread::sleep(Duration::from_secs(6));
        c.net.as_ref().unwrap().heal();
        std::thread::sleep(Duration::from_secs(30).saturating_sub(start.elapsed()));
        stop.store(true, Ordering::Relaxed);
    });
    println!(
        "kept alive for {:?}; {} keepalive calls failed during the faults",
        start.elapsed(),
        failures.load(Ordering::Relaxed)
    );
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let value: Option<String> = c.client(leader).query_one("SELECT raft_get('svc/kept')", &[]).unwrap().get(0);
    assert_eq!(value.as_deref(), Some("up"));
    for n in 1..=3 {
        wait_for(Duration::from_secs(10), "every node to catch up", || {
            c.client(n).query_one("SELECT raft_get('svc/kept')", &[]).ok().map(|_| ())
        });
        assert_eq!(history(&c, n, "svc/kept").len(), 1, "node {n}: never deleted");
    }
}

#[test]
fn a_leader_change_never_expires_a_lease_before_its_ttl_from_the_last_keepalive() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let follower = leader % 3 + 1;
    let mut cl = c.client(follower);
    let id = grant(&mut cl, "4s");
    cl.execute("SELECT raft_set('svc/b', 'up', lease => $1)", &[&id]).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let invoked = Instant::now();
    cl.query_one("SELECT raft_lease_keepalive($1)", &[&id]).unwrap();
    let accepted = Instant::now();
    // The leader that accepted it dies at once; the next one starts the TTL again.
    c.kill9(leader);
    let others: Vec<usize> = (1..=3).filter(|&n| n != leader).collect();
    let gone = wait_for(Duration::from_secs(15), "the lease to expire under the new leader", || {
        others.iter().all(|&n| local(&c, n, "svc/b").is_none()).then(Instant::now)
    });
    println!("expired {:?} after the keepalive was invoked", gone - invoked);
    assert!(gone - invoked >= Duration::from_secs(4), "expired {:?} after the last keepalive", gone - invoked);
    assert!(
        gone - accepted <= Duration::from_secs(4) + 2 * ELECTION_TIMEOUT + Duration::from_secs(4),
        "a new leader's full TTL at most, after its election: {:?}",
        gone - accepted
    );
    c.start_node(leader);
}

#[test]
fn bad_lease_input_gets_a_clear_error_and_changes_nothing() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let mut cl = c.client(1);
    let revision = |cl: &mut Client| -> i64 { cl.query_one("SELECT revision FROM raft_status()", &[]).unwrap().get(0) };
    let before = revision(&mut cl);
    let unknown = 4242i64;
    for sql in [
        "SELECT raft_lease_keepalive($1)",
        "SELECT raft_lease_revoke($1)",
        "SELECT * FROM raft_lease_ttl($1)",
        "SELECT raft_set('bad/k', 'v', lease => $1)",
        "SELECT raft_lock('bad/lock', $1, '1s')",
        "SELECT raft_campaign('bad/el', $1, 'me', '1s')",
        "SELECT * FROM raft_txn('[]', jsonb_build_array(jsonb_build_object('op', 'put', 'key', 'bad/t', 'value', 'v', 'lease', $1::bigint)))",
    ] {
        let e = cl.query(sql, &[&unknown]).unwrap_err();
        assert_eq!(sqlstate(&e), "42704", "{sql}: {e}");
        let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        assert!(message.contains("lease 4242 not found"), "{sql}: {message}");
    }
    for (sql, state) in [
        ("SELECT raft_lease_keepalive(0)", "22023"),
        ("SELECT raft_lease_revoke(-1)", "22023"),
        ("SELECT raft_lease_keepalive(NULL)", "22004"),
        ("SELECT raft_lease_grant(NULL)", "22004"),
        ("SELECT raft_lease_grant('-1s')", "22023"),
        ("SELECT raft_lease_grant('0s')", "22023"),
        ("SELECT raft_lease_grant('31 days')", "22023"),
        ("SELECT raft_lock(NULL, 1)", "22004"),
        ("SELECT raft_lock('', 1)", "22023"),
        (
            "SELECT * FROM raft_txn('[]', '[{\"op\": \"put\", \"key\": \"k\", \"value\": \"v\", \"lease\": -3}]')",
            "22023",
        ),
        ("SELECT * FROM raft_txn('[]', '[{\"op\": \"delete\", \"key\": \"k\", \"lease\": 3}]')", "22023"),
    ] {
        let e = cl.query(sql, &[]).unwrap_err();
        assert_eq!(sqlstate(&e), state, "{sql}: {e}");
    }
    assert_eq!(revision(&mut cl), before, "nothing was written");
    assert!(local(&c, 1, "bad/k").is_none() && local(&c, 1, "bad/t").is_none());
    assert!(cl.query("SELECT * FROM raft_scan('bad/')", &[]).unwrap().is_empty());

    // A TTL under two election timeouts is raised to it, and the caller is told.
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = notices.clone();
    let mut config: postgres::Config = c.node(1).conn_str().parse().unwrap();
    config.notice_callback(move |n| seen.lock().unwrap().push(n.message().to_string()));
    let mut noticed = config.connect(postgres::NoTls).unwrap();
    let id: i64 = noticed.query_one("SELECT raft_lease_grant('500 ms')", &[]).unwrap().get(0);
    assert!(
        notices.lock().unwrap().iter().any(|m| m.contains("raised from 500 ms to the minimum of 2000 ms")),
        "{:?}",
        notices.lock().unwrap()
    );
    let ttl: String = cl.query_one("SELECT granted_ttl::text FROM raft_lease_ttl($1)", &[&id]).unwrap().get(0);
    assert_eq!(ttl, "00:00:02");

    // Attaching to a lease that expired: refused, nothing written.
    wait_for(Duration::from_secs(10), "the short lease to expire", || {
        cl.query("SELECT * FROM raft_lease_ttl($1)", &[&id]).err().map(|e| assert_eq!(sqlstate(&e), "42704"))
    });
    let before = revision(&mut cl);
    let e = cl.query_one("SELECT raft_set('bad/late', 'v', lease => $1)", &[&id]).unwrap_err();
    assert_eq!(sqlstate(&e), "42704", "{e}");
    assert_eq!(revision(&mut cl), before);
    assert!(local(&c, 1, "bad/late").is_none());
}

/// A campaigner: its lease kept alive on its own connection, campaigning on another.
struct Campaigner {
    lease: i64,
    stop: AtomicBool,
}

#[test]
fn when_the_leaders_client_dies_another_campaigner_is_elected_within_its_ttl() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let campaigners: Vec<Campaigner> =
        (1..=3).map(|n| Campaigner { lease: grant(&mut c.client(n), "3s"), stop: AtomicBool::new(false) }).collect();
    let elected = std::sync::Mutex::new(Vec::<(usize, Instant, i64)>::new());
    std::thread::scope(|s| {
        for (i, me) in campaigners.iter().enumerate() {
            let (c, elected) = (&c, &elected);
            // Keepalives, until this client "dies".
            s.spawn(move || {
                let mut cl = c.client(i + 1);
                while !me.stop.load(Ordering::Relaxed) {
                    cl.query_one("SELECT raft_lease_keepalive($1)", &[&me.lease]).unwrap();
                    std::thread::sleep(Duration::from_millis(1000));
                }
            });
            s.spawn(move || {
                let mut cl = c.client(i + 1);
                let value = format!("candidate-{}", i + 1);
                let r = cl.query_one("SELECT raft_campaign('jobs/leader', $1, $2, '30s')", &[&me.lease, &value]);
                if let Ok(Some(revision)) = r.map(|r| r.get::<_, Option<i64>>(0)) {
                    elected.lock().unwrap().push((i, Instant::now(), revision));
                }
            });
        }
        let (first, _, rev1) =
            wait_for(Duration::from_secs(10), "a leader", || elected.lock().unwrap().first().copied());
        let expect = format!("candidate-{}", first + 1);
        for n in 1..=3 {
            let row = c.client(n).query_one("SELECT value, revision FROM raft_leader('jobs/leader')", &[]).unwrap();
            assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), (expect.clone(), rev1), "node {n}");
        }
        // The leader's client dies: no more keepalives (its campaign call already returned).
        let killed = Instant::now();
        campaigners[first].stop.store(true, Ordering::Relaxed);
        let (second, at, rev2) =
            wait_for(Duration::from_secs(10), "another leader", || elected.lock().unwrap().get(1).copied());
        println!("campaigner {} elected {:?} after campaigner {} died", second + 1, at - killed, first + 1);
        assert_ne!(second, first);
        assert!(rev2 > rev1, "a later leadership has a larger revision");
        assert!(at - killed <= Duration::from_secs(3) + Duration::from_secs(2), "{:?}", at - killed);
        let expect = format!("candidate-{}", second + 1);
        for n in 1..=3 {
            let row = c.client(n).query_one("SELECT value, revision FROM raft_leader('jobs/leader')", &[]).unwrap();
            assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), (expect.clone(), rev2), "node {n}");
        }
        // An observer follows the election through the watch: it wakes on the next change.
        let from: i64 = c.client(3).query_one("SELECT revision + 1 FROM raft_status()", &[]).unwrap().get(0);
        let cluster = &c;
        let observer = s.spawn(move || {
            cluster
                .client(3)
                .query("SELECT key, kind FROM raft_watch('jobs/leader/', $1, '20 seconds')", &[&from])
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        });
        // The new leader resigns: the last campaigner follows.
        let resigned: bool = c
            .client(second + 1)
            .query_one("SELECT raft_resign('jobs/leader', $1)", &[&campaigners[second].lease])
            .unwrap()
            .get(0);
        assert!(resigned);
        let (third, _, _) =
            wait_for(Duration::from_secs(10), "the third leader", || elected.lock().unwrap().get(2).copied());
        assert!(third != first && third != second);
        let seen = observer.join().unwrap();
        let resigned_key: String = c
            .client(1)
            .query_one(
                "SELECT key FROM raft_changes(1, 'jobs/leader/') WHERE kind = 'delete' ORDER BY revision DESC LIMIT 1",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(seen, [(resigned_key, "delete".to_string())], "the observer saw the resignation");
        let value: String = c.client(2).query_one("SELECT value FROM raft_leader('jobs/leader')", &[]).unwrap().get(0);
        assert_eq!(value, format!("candidate-{}", third + 1), "and then reads the new leader");
        for m in &campaigners {
            m.stop.store(true, Ordering::Relaxed);
        }
    });
}
