//! Issue 3: election, replication, forwarding, failover and durability on three servers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_kv_tests::{wait_for, Client, Cluster, Stop};

fn set(c: &mut Client, k: &str, v: &str) -> Result<i64, raft_kv_tests::PgError> {
    c.query_one("SELECT raft_set($1, $2)", &[&k, &v]).map(|r| r.get(0))
}

fn get(c: &mut Client, k: &str) -> Option<String> {
    c.query_one("SELECT raft_get($1)", &[&k]).unwrap().get(0)
}

fn get_local(c: &mut Client, k: &str) -> Option<String> {
    c.query_one("SELECT raft_get($1, 'local')", &[&k]).unwrap().get(0)
}

fn followers(leader: usize) -> Vec<usize> {
    (1..=3).filter(|&i| i != leader).collect()
}

#[test]
fn one_leader_within_five_seconds() {
    let c = Cluster::start(3);
    let t0 = Instant::now();
    let (leader, term) = c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    println!("leader {leader} in term {term} after {:?}", t0.elapsed());
    let roles: Vec<String> = (1..=3).map(|i| c.raft_view(i).unwrap().0).collect();
    assert_eq!(roles.iter().filter(|r| *r == "leader").count(), 1, "{roles:?}");
    let r = c.client(leader).query_one("SELECT voters, commit_index, last_index FROM raft_status()", &[]).unwrap();
    assert_eq!(r.get::<_, Vec<i64>>(0), vec![1, 2, 3]);
    let members =
        c.client(leader).query("SELECT id, address, voter, match_index, active FROM raft_members()", &[]).unwrap();
    assert_eq!(members.len(), 3);
    for m in &members {
        let id: i64 = m.get(0);
        assert_eq!(m.get::<_, Option<String>>(1), Some(c.node(id as usize).raft_addr()));
        assert!(m.get::<_, bool>(2));
        assert!(m.get::<_, Option<i64>>(3).is_some(), "leader knows match indexes");
    }
}

#[test]
fn write_on_follower_is_visible_everywhere() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let f = followers(leader)[0];
    let mut fc = c.client(f);
    let rev = set(&mut fc, "config/mode", "active").unwrap();
    assert_eq!(rev, 1, "the first write to a fresh store is revision 1 (revisions count changes)");
    // Read-your-write on the node that wrote.
    assert_eq!(get(&mut fc, "config/mode").as_deref(), Some("active"));
    let t0 = Instant::now();
    for i in (1..=3).filter(|&i| i != f) {
        let mut cl = c.client(i);
        wait_for(Duration::from_secs(1), "replica to see the write", || {
            (get_local(&mut cl, "config/mode").as_deref() == Some("active")).then_some(())
        });
    }
    println!("visible on all nodes {:?} after the write returned", t0.elapsed());
    let r = c.client(leader).query_one("SELECT mod_revision FROM raft_kv.kv WHERE key = 'config/mode'", &[]).unwrap();
    assert_eq!(r.get::<_, i64>(0), rev);
    // Delete reports whether the key existed, everywhere.
    assert!(fc.query_one("SELECT raft_delete('config/mode')", &[]).unwrap().get::<_, bool>(0));
    assert!(!fc.query_one("SELECT raft_delete('config/mode')", &[]).unwrap().get::<_, bool>(0));
    assert_eq!(get(&mut fc, "config/mode"), None);
}

#[test]
fn concurrent_writers_converge() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let revisions = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for t in 0..4usize {
            let revisions = revisions.clone();
            let c = &c;
            s.spawn(move || {
                let mut clients: Vec<Client> = (1..=3).map(|i| c.client(i)).collect();
                for j in 0..500usize {
                    let cl = &mut clients[(t + j) % 3];
                    let rev = set(cl, &format!("w{t}/k{}", j % 50), &format!("{t}-{j}")).unwrap();
                    revisions.lock().unwrap().push(rev);
                }
            });
        }
    });
    let revs = revisions.lock().unwrap();
    assert_eq!(revs.len(), 2000);
    let unique: HashSet<_> = revs.iter().collect();
    assert_eq!(unique.len(), 2000, "revisions repeat");
    c.assert_converged(&[1, 2, 3]);
    let (count, _) = c.kv_hash(1);
    assert_eq!(count, 200);
    // Each key holds the last value its writer wrote.
    let mut cl = c.client(2);
    for t in 0..4 {
        assert_eq!(get(&mut cl, &format!("w{t}/k49")).unwrap(), format!("{t}-499"));
    }
}

#[test]
fn leader_failover_and_rejoin() {
    let c = Cluster::start(3);
    let (old, term) = c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let f = followers(old);
    set(&mut c.client(f[0]), "before", "1").unwrap();
    c.stop_node(old, Stop::Immediate);
    let t0 = Instant::now();
    let (new, new_term) = c.wait_leader(&f, Duration::from_secs(3));
    println!("new leader {new} (term {new_term}) {:?} after killing {old}", t0.elapsed());
    assert_ne!(new, old);
    assert!(new_term > term);
    let mut cl = c.client(f[1]);
    let written =
        wait_for(Duration::from_secs(5), "a write to succeed after failover", || set(&mut cl, "after", "2").ok());
    assert!(written > 0);
    c.start_node(old);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    assert_ne!(leader, 0);
    assert_eq!(c.raft_view(old).unwrap().0, "follower");
    c.assert_converged(&[1, 2, 3]);
    assert_eq!(get(&mut c.client(old), "after").as_deref(), Some("2"));
}

#[test]
fn crash_all_mid_load_loses_no_acknowledged_write() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    // key -> (revision, value) of the last acknowledged write.
    let acked: Arc<Mutex<HashMap<String, (i64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..3usize {
            let (acked, stop, c, ops) = (acked.clone(), stop.clone(), &c, &ops);
            s.spawn(move || {
                let mut cl = c.client(t + 1);
                let mut j = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("t{t}/k{}", j % 20);
                    let val = format!("{t}-{j}");
                    match set(&mut cl, &key, &val) {
                        Ok(rev) => {
                            acked.lock().unwrap().insert(key, (rev, val));
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break, // the server went away
                    }
                    j += 1;
                }
            });
        }
        wait_for(Duration::from_secs(30), "some writes", || (ops.load(Ordering::Relaxed) >= 150).then_some(()));
        for i in 1..=3 {
            c.stop_node(i, Stop::Immediate);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let acked = acked.lock().unwrap().clone();
    println!("{} keys acknowledged before the crash", acked.len());
    for i in 1..=3 {
        c.start_node(i);
    }
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    // Apply everything committed (a no-op write through the log forces it).
    set(&mut c.client(1), "barrier", "x").unwrap();
    c.assert_converged(&[1, 2, 3]);
    for i in 1..=3 {
        let mut cl = c.client(i);
        for (k, (rev, val)) in &acked {
            let r = cl.query_one("SELECT value, mod_revision FROM raft_kv.kv WHERE key = $1", &[k]).unwrap();
            let (v, r): (String, i64) = (r.get(0), r.get(1));
            // A later, unacknowledged write may have committed, but never an older one.
            assert!(r >= *rev, "node {i}: {k} at revision {r}, acknowledged {rev}");
            if r == *rev {
                assert_eq!(&v, val, "node {i}: {k}");
            }
        }
        let st = cl.query_one("SELECT applied_index, commit_index FROM raft_status()", &[]).unwrap();
        assert!(st.get::<_, i64>(0) <= st.get::<_, i64>(1));
    }
}

#[test]
fn minority_fails_within_timeout_and_reads_still_answer() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let survivor = followers(leader)[0];
    set(&mut c.client(survivor), "k", "v").unwrap();
    wait_for(Duration::from_secs(5), "write applied on the survivor", || {
        (get_local(&mut c.client(survivor), "k").as_deref() == Some("v")).then_some(())
    });
    for i in (1..=3).filter(|&i| i != survivor) {
        c.stop_node(i, Stop::Immediate);
    }
    let mut cl = c.client(survivor);
    cl.batch_execute("SET raft_kv.apply_timeout = '2s'").unwrap();
    let t0 = Instant::now();
    let err = set(&mut cl, "k", "w").unwrap_err();
    let took = t0.elapsed();
    let db = err.as_db_error().unwrap();
    println!("failed after {took:?}: {} ({})", db.message(), db.code().code());
    assert!(took < Duration::from_secs(3), "took {took:?}, over apply_timeout + 1 s");
    let certain = db.message().starts_with("raft_kv write not committed") && db.code().code() == "40001";
    let unknown = db.message().starts_with("raft_kv write outcome unknown") && db.code().code() == "40003";
    assert!(certain || unknown, "{}", db.message());
    // Local reads still answer; a linearizable read refuses rather than risk staleness.
    assert_eq!(get_local(&mut cl, "k").as_deref(), Some("v"));
    let t0 = Instant::now();
    let err = cl.query_one("SELECT raft_get('k')", &[]).unwrap_err();
    let db = err.as_db_error().unwrap();
    assert!(db.message().starts_with("raft_kv linearizable read failed"), "{}", db.message());
    assert_eq!(db.code().code(), "40001");
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Once no leader is known, the failure is certain and immediate-to-timeout.
    wait_for(Duration::from_secs(5), "leader loss noticed", || {
        let r = cl.query_one("SELECT leader_id FROM raft_status()", &[]).ok()?;
        r.get::<_, Option<i64>>(0).is_none().then_some(())
    });
    let err = set(&mut cl, "k", "x").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "40001", "{err}");
    assert_eq!(get_local(&mut cl, "k").as_deref(), Some("v"));
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let mut cl = c.client(1);
    set(&mut cl, "existing", "1").unwrap();
    cl.batch_execute("ALTER SYSTEM SET raft_kv.max_value_bytes = 100").unwrap();
    cl.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(Duration::from_secs(5), "reload", || {
        let v: String = c.client(1).query_one("SHOW raft_kv.max_value_bytes", &[]).unwrap().get(0);
        (v == "100B").then_some(())
    });
    let mut cl = c.client(1);
    let before = c.kv_hash(1);
    let long_key = "k".repeat(1025);
    let ok_key = "k".repeat(1024);
    let big = "v".repeat(101);
    let cases: Vec<(&str, Vec<&(dyn postgres::types::ToSql + Sync)>, &str, &str)> = vec![
        ("SELECT raft_set(NULL, 'v')", vec![], "raft_kv key must not be NULL", "22004"),
        ("SELECT raft_set('k', NULL)", vec![], "raft_kv value must not be NULL", "22004"),
        ("SELECT raft_get(NULL)", vec![], "raft_kv key must not be NULL", "22004"),
        ("SELECT raft_delete(NULL)", vec![], "raft_kv key must not be NULL", "22004"),
        ("SELECT raft_set('', 'v')", vec![], "raft_kv key must not be empty", "22023"),
        (
            "SELECT raft_set($1, 'v')",
            vec![&long_key],
            "raft_kv key is 1025 bytes, over the limit of 1024 bytes",
            "54000",
        ),
        ("SELECT raft_get($1)", vec![&long_key], "over the limit of 1024 bytes", "54000"),
        (
            "SELECT raft_set('k', $1)",
            vec![&big],
            "raft_kv value is 101 bytes, over raft_kv.max_value_bytes (100 bytes)",
            "54000",
        ),
        ("INSERT INTO raft_kv.kv VALUES ('x', 'y', 1)", vec![], "direct INSERT on raft_kv.kv is not allowed", "42501"),
        ("UPDATE raft_kv.kv SET value = 'z'", vec![], "direct UPDATE on raft_kv.kv is not allowed", "42501"),
        ("DELETE FROM raft_kv.kv", vec![], "direct DELETE on raft_kv.kv is not allowed", "42501"),
        ("TRUNCATE raft_kv.kv", vec![], "direct TRUNCATE on raft_kv.kv is not allowed", "42501"),
        ("DELETE FROM raft_kv.log", vec![], "direct DELETE on raft_kv.log is not allowed", "42501"),
        (
            "INSERT INTO raft_kv.log VALUES (999999, 1, 0, '', '')",
            vec![],
            "direct INSERT on raft_kv.log is not allowed",
            "42501",
        ),
        ("UPDATE raft_kv.state SET term = 99", vec![], "direct UPDATE on raft_kv.state is not allowed", "42501"),
        ("TRUNCATE raft_kv.state", vec![], "direct TRUNCATE on raft_kv.state is not allowed", "42501"),
    ];
    for (q, params, msg, code) in cases {
        let err = cl.query(q, &params).unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{q}: {err}"));
        assert!(db.message().contains(msg), "{q}: got {:?}, want {msg:?}", db.message());
        assert_eq!(db.code().code(), code, "{q}: {}", db.message());
        assert_eq!(c.kv_hash(1), before, "{q} changed raft_kv.kv");
    }
    // The limits are inclusive.
    set(&mut cl, &ok_key, &"v".repeat(100)).unwrap();
    // A role without grants can neither read the tables nor call raft_get (issue 9: nothing
    // is granted to PUBLIC); raft_kv_reader grants both.
    cl.batch_execute("CREATE ROLE app LOGIN; SET ROLE app").unwrap();
    let err = cl.query("SELECT * FROM raft_kv.kv", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
    let err = cl.query("SELECT raft_get('existing')", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
    cl.batch_execute("RESET ROLE; GRANT raft_kv_reader TO app; SET ROLE app").unwrap();
    assert_eq!(get(&mut cl, "existing").as_deref(), Some("1"));
    let n: i64 = cl.query_one("SELECT count(*) FROM raft_kv.kv", &[]).unwrap().get(0);
    assert_eq!(n, 2);
    let err = cl.query("DELETE FROM raft_kv.kv", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
}

#[test]
fn rollback_does_not_undo_a_write() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let mut cl = c.client(2);
    cl.batch_execute("BEGIN; SELECT raft_set('tx', 'kept'); ROLLBACK").unwrap();
    assert_eq!(get(&mut cl, "tx").as_deref(), Some("kept"));
}

#[test]
fn cancel_and_worker_restart_end_waits_cleanly() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(5));
    let survivor = followers(leader)[0];
    for i in (1..=3).filter(|&i| i != survivor) {
        c.stop_node(i, Stop::Immediate);
    }
    let mut cl = c.client(survivor);
    cl.batch_execute("SET raft_kv.apply_timeout = '60s'").unwrap();

    // statement_timeout interrupts the wait; the session and its slot stay usable.
    cl.batch_execute("SET statement_timeout = '300ms'").unwrap();
    let t0 = Instant::now();
    let err = set(&mut cl, "k", "v").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "57014", "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    cl.batch_execute("SET statement_timeout = 0").unwrap();
    for _ in 0..200 {
        // Far more cancelled requests than there are slots: none may leak.
        cl.batch_execute("SET statement_timeout = '5ms'").unwrap();
        let _ = set(&mut cl, "k", "v");
    }
    cl.batch_execute("SET statement_timeout = 0").unwrap();

    // A worker restart fails the in-flight request at once instead of leaving it hanging.
    let pid: i32 = cl.query_one("SELECT worker_pid FROM raft_status()", &[]).unwrap().get(0);
    let c2 = &c;
    let (err, took) = std::thread::scope(|s| {
        let h = s.spawn(move || {
            let mut w = c2.client(survivor);
            w.batch_execute("SET raft_kv.apply_timeout = '60s'").unwrap();
            let t0 = Instant::now();
            (set(&mut w, "k", "v").unwrap_err(), t0.elapsed())
        });
        // Terminate the worker once the client is waiting on it.
        let mut admin = c2.client(survivor);
        wait_for(Duration::from_secs(10), "the write to be waiting", || {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'Extension' AND query LIKE '%raft_set%'",
                    &[],
                )
                .ok()?
                .get(0);
            (n == 1).then_some(())
        });
        admin.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
        h.join().unwrap()
    });
    let db = err.as_db_error().unwrap();
    // Unknown if the worker had taken it (it might have reached a log), certain otherwise.
    assert!(["40003", "40001"].contains(&db.code().code()), "{}", db.message());
    assert!(db.message().contains("worker"), "{}", db.message());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The worker comes back by itself, with a new pid.
    wait_for(Duration::from_secs(15), "the worker to restart", || {
        let r = c.client(survivor).query_one("SELECT worker_pid, state FROM raft_status()", &[]).ok()?;
        let (p, st): (Option<i32>, String) = (r.get(0), r.get(1));
        (p.is_some_and(|p| p != pid) && st == "running").then_some(())
    });
    for i in (1..=3).filter(|&i| i != survivor) {
        c.start_node(i);
    }
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let mut cl = c.client(survivor);
    wait_for(Duration::from_secs(10), "writes to work again", || set(&mut cl, "k", "after").ok());
}

/// Issue 14 (containers and NAT): a node binds a wildcard address and advertises another one;
/// the others dial the advertised address, and a node added later does the same through
/// `raft_join`. TLS stays on: a wildcard bind without it is refused.
#[test]
fn a_node_binding_a_wildcard_is_reached_at_its_advertised_address() {
    let mut c = Cluster::builder(3)
        .raft_conf(|spec, peers| {
            // Everyone knows node 3 as 127.0.0.3; node 3 binds 0.0.0.0.
            let peers = peers.replace("3=127.0.0.1:", "3=127.0.0.3:");
            let conf = raft_kv_tests::default_raft_conf(spec, &peers);
            if spec.id != 3 {
                return conf;
            }
            conf.replace("raft_kv.listen_addr = '127.0.0.1:", "raft_kv.listen_addr = '0.0.0.0:")
                + &format!("raft_kv.advertise_addr = '127.0.0.3:{}'\n", spec.raft_port)
        })
        .start();
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let status = c.client(3).query_one("SELECT listen_addr FROM raft_status()", &[]).unwrap();
    assert_eq!(status.get::<_, Option<String>>(0), Some(format!("0.0.0.0:{}", c.node(3).spec.raft_port)));
    let addr3: Option<String> =
        c.client(leader).query_one("SELECT address FROM raft_members() WHERE id = 3", &[]).unwrap().get(0);
    assert_eq!(addr3, Some(format!("127.0.0.3:{}", c.node(3).spec.raft_port)));
    // Writes through node 3 (forwarded to the leader unless it leads) reach every node, and
    // writes elsewhere reach node 3: the leader's appends only arrive on the dialled address.
    let mut c3 = c.client(3);
    set(&mut c3, "nat/from3", "x").unwrap();
    let other = followers(3)[0];
    set(&mut c.client(other), "nat/to3", "y").unwrap();
    for i in 1..=3 {
        let mut cl = c.client(i);
        wait_for(Duration::from_secs(5), "both writes everywhere", || {
            (get_local(&mut cl, "nat/from3").is_some() && get_local(&mut cl, "nat/to3").is_some()).then_some(())
        });
    }
    // Node 3 can lead: it gathers votes and commits through the addresses it dials.
    assert!(c.client(1).query_one("SELECT raft_transfer_leader(3)", &[]).unwrap().get::<_, bool>(0));
    assert_eq!(c.wait_leader(&[1, 2, 3], Duration::from_secs(10)).0, 3);
    set(&mut c3, "nat/led_by3", "w").unwrap();
    // A fourth node binds a wildcard too and joins at its advertised address.
    let i4 = c.add_node(|spec| {
        raft_kv_tests::joiner_conf(spec).replace("raft_kv.listen_addr = '127.0.0.1:", "raft_kv.listen_addr = '0.0.0.0:")
            + &format!("raft_kv.advertise_addr = '127.0.0.4:{}'\n", spec.raft_port)
    });
    let a4 = format!("127.0.0.4:{}", c.node(i4).spec.raft_port);
    let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    c.client(l).query_one("SELECT raft_join(4, $1)", &[&a4]).unwrap();
    let mut c4 = c.client(i4);
    wait_for(Duration::from_secs(30), "the joiner to catch up", || {
        (get_local(&mut c4, "nat/from3").as_deref() == Some("x")).then_some(())
    });
    set(&mut c4, "nat/from4", "z").unwrap();
    // The joiner learnt the leader's address from its hello: the advertised one, not 0.0.0.0.
    let log = c.node(i4).log();
    assert!(log.contains(&format!("connected to node 3 at 127.0.0.3:{}", c.node(3).spec.raft_port)), "{log}");
    assert!(!log.contains("at 0.0.0.0:"), "{log}");
    c.assert_converged(&[1, 2, 3, 4]);
}
