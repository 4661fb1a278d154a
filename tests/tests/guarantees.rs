//! Issue 5: what `'local'` and `'linearizable'` reads promise on an isolated former leader,
//! compare-and-set races, and retried proposals across a forced leader change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raft_kv_tests::linearizability::{self, Kind, Op, Outcome};
use raft_kv_tests::{wait_for, Client, Cluster};

fn set(c: &mut Client, k: &str, v: &str) -> Result<i64, raft_kv_tests::PgError> {
    c.query_one("SELECT raft_set($1, $2)", &[&k, &v]).map(|r| r.get(0))
}

fn get_local(c: &mut Client, k: &str) -> Option<String> {
    c.query_one("SELECT raft_get($1, 'local')", &[&k]).unwrap().get(0)
}

#[test]
fn local_reads_on_an_isolated_former_leader_are_stale_linearizable_reads_fail() {
    let c = Cluster::builder(3).proxied().start();
    let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let others: Vec<usize> = (1..=3).filter(|&i| i != l).collect();
    let start = Instant::now();
    let ns = || start.elapsed().as_nanos() as u64;

    let t0 = ns();
    set(&mut c.client(l), "k", "old").unwrap();
    let t1 = ns();
    let mut lc = c.client(l);
    assert_eq!(get_local(&mut lc, "k").as_deref(), Some("old"));

    c.net.as_ref().unwrap().partition(&[vec![l as u64], others.iter().map(|&i| i as u64).collect()]);
    let (new_leader, _) = c.wait_leader(&others, Duration::from_secs(10));
    assert_ne!(new_leader, l);
    let t2 = ns();
    set(&mut c.client(others[0]), "k", "new").unwrap();
    let t3 = ns();

    // The isolated node still serves its old state locally...
    let t4 = ns();
    let stale = get_local(&mut lc, "k");
    let t5 = ns();
    assert_eq!(stale.as_deref(), Some("old"), "an isolated node cannot know the new value");
    // ...and the checker flags that read if it is passed off as linearizable.
    let history = vec![
        Op {
            client: 0,
            key: "k".into(),
            kind: Kind::Write("old".into()),
            outcome: Outcome::Written,
            invoke: t0,
            complete: Some(t1),
        },
        Op {
            client: 1,
            key: "k".into(),
            kind: Kind::Write("new".into()),
            outcome: Outcome::Written,
            invoke: t2,
            complete: Some(t3),
        },
        Op {
            client: 2,
            key: "k".into(),
            kind: Kind::Read,
            outcome: Outcome::Read(stale),
            invoke: t4,
            complete: Some(t5),
        },
    ];
    let v = linearizability::check(&history).expect_err("a stale read must be flagged");
    println!("{v}");

    // A linearizable read on the same node fails instead of answering.
    lc.batch_execute("SET raft_kv.apply_timeout = '1s'").unwrap();
    let err = lc.query_one("SELECT raft_get('k')", &[]).unwrap_err();
    let db = err.as_db_error().unwrap();
    assert!(db.message().starts_with("raft_kv linearizable read failed"), "{}", db.message());
    assert_eq!(db.code().code(), "40001");
    let err = lc.query("SELECT * FROM raft_scan('k')", &[]).unwrap_err();
    assert!(err.as_db_error().unwrap().message().starts_with("raft_kv linearizable read failed"));

    // Healed, it catches up and linearizable reads answer the new value.
    c.net.as_ref().unwrap().heal();
    lc.batch_execute("SET raft_kv.apply_timeout = '5s'").unwrap();
    let v: Option<String> = wait_for(Duration::from_secs(10), "a linearizable read after healing", || {
        lc.query_one("SELECT raft_get('k')", &[]).ok().map(|r| r.get(0))
    });
    assert_eq!(v.as_deref(), Some("new"));
}

#[test]
fn exactly_one_of_racing_cas_wins() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let racers = 8;
    for round in 0..10 {
        let key = format!("race/{round}");
        let go = AtomicBool::new(false);
        let wins: Vec<(usize, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..racers)
                .map(|i| {
                    let (c, key, go) = (&c, &key, &go);
                    s.spawn(move || {
                        let mut cl = c.client(i % 3 + 1);
                        let me = format!("client-{i}");
                        while !go.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                        let won: bool = cl.query_one("SELECT raft_cas($1, NULL, $2)", &[key, &me]).unwrap().get(0);
                        (i, won)
                    })
                })
                .collect();
            go.store(true, Ordering::Release);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = wins.iter().filter(|(_, w)| *w).map(|(i, _)| *i).collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let v: Option<String> = c.client(2).query_one("SELECT raft_get($1)", &[&key]).unwrap().get(0);
        assert_eq!(v, Some(format!("client-{}", winners[0])));
    }
    // A CAS from the current value wins; from a stale value it loses.
    let mut cl = c.client(1);
    let cur: String = cl.query_one("SELECT raft_get('race/0')", &[]).unwrap().get(0);
    assert!(cl.query_one("SELECT raft_cas('race/0', $1, 'next')", &[&cur]).unwrap().get::<_, bool>(0));
    assert!(!cl.query_one("SELECT raft_cas('race/0', $1, 'again')", &[&cur]).unwrap().get::<_, bool>(0));
    let err = cl.query("SELECT raft_cas('race/0', 'next', NULL)", &[]).unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("value must not be NULL"));
}

/// Counts the log entries on node `i` whose payload contains `needle`.
fn log_copies(c: &Cluster, i: usize, needle: &str) -> Vec<i64> {
    c.client(i)
        .query(
            "SELECT idx FROM raft_kv.log WHERE position(convert_to($1, 'UTF8') IN data) > 0 ORDER BY idx",
            &[&needle],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn a_write_retried_across_a_forced_leader_change_applies_once() {
    let c = Cluster::builder(3).proxied().start();
    let (l, term) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let f: Vec<usize> = (1..=3).filter(|&i| i != l).collect();
    let net = c.net.as_ref().unwrap();
    let last_index =
        |i: usize| -> i64 { c.client(i).query_one("SELECT last_index FROM raft_status()", &[]).unwrap().get(0) };
    let before = last_index(l);
    // The followers stop hearing the leader, which still hears them: a follower's write
    // reaches the leader, which appends it but cannot commit it.
    for &o in &f {
        net.set_cut(l as u64, o as u64, true);
    }
    let value = "unique-retried-value";
    let (rev, took, old_copy) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut fc = c.client(f[0]);
            fc.batch_execute("SET raft_kv.apply_timeout = '20s'").unwrap();
            let t0 = Instant::now();
            (set(&mut fc, "retried", value).unwrap(), t0.elapsed())
        });
        // Once the leader has appended the first proposal, isolate it completely, so its
        // copy stays in its log; the followers elect a new leader and the write is
        // proposed again there.
        wait_for(Duration::from_secs(10), "the old leader to append the write", || {
            (last_index(l) > before).then_some(())
        });
        for &o in &f {
            net.set_cut(o as u64, l as u64, true);
        }
        let copies = log_copies(&c, l, value);
        let (rev, took) = writer.join().unwrap();
        (rev, took, copies)
    });
    println!("write applied at revision {rev} after {took:?}; the old leader holds a copy at {old_copy:?}");
    assert_eq!(old_copy.len(), 1, "the first proposal is in the old leader's log");
    let (new_leader, new_term) = c.wait_leader(&f, Duration::from_secs(10));
    assert!(new_term > term && new_leader != l);
    // The committed copy is the retry: one copy in each new majority's log, at one index
    // (revisions count changes, not log entries, so the index is looked up, not assumed).
    let committed = log_copies(&c, f[0], value);
    assert_eq!(committed.len(), 1, "node {}: one copy", f[0]);
    for &o in &f {
        assert_eq!(log_copies(&c, o, value), committed, "node {o}: the retry is the copy that committed");
    }

    net.heal();
    wait_for(Duration::from_secs(10), "all nodes to converge", || {
        let idx: Vec<_> = (1..=3).map(|i| c.applied_index(i)).collect::<Option<Vec<_>>>()?;
        (idx.windows(2).all(|w| w[0] == w[1]) && idx[0] >= committed[0]).then_some(())
    });
    for i in 1..=3 {
        let r = c.client(i).query_one("SELECT value, mod_revision FROM raft_kv.kv WHERE key = 'retried'", &[]).unwrap();
        assert_eq!(r.get::<_, String>(0), value);
        assert_eq!(r.get::<_, i64>(1), rev, "node {i}: the write applied at a different revision");
        // The old leader's uncommitted copy was replaced by the committed log.
        assert_eq!(log_copies(&c, i, value), committed, "node {i}");
        let n: i64 =
            c.client(i).query_one("SELECT count(*) FROM raft_kv.requests WHERE revision = $1", &[&rev]).unwrap().get(0);
        assert_eq!(n, 1, "node {i}");
    }
}

#[test]
fn a_client_request_id_makes_retries_idempotent_on_any_node() {
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let first: i64 = c.client(1).query_one("SELECT raft_set('acct', 'v1', request_id => 'op-1')", &[]).unwrap().get(0);
    let later: i64 = c.client(2).query_one("SELECT raft_set('acct', 'v2')", &[]).unwrap().get(0);
    assert!(later > first);
    // The client, unsure whether op-1 happened, retries it on another node: it is answered
    // with the first revision and does not overwrite the later write.
    let retry: i64 = c.client(3).query_one("SELECT raft_set('acct', 'v1', request_id => 'op-1')", &[]).unwrap().get(0);
    assert_eq!(retry, first);
    assert_eq!(
        c.client(3).query_one("SELECT raft_get('acct')", &[]).unwrap().get::<_, Option<String>>(0).as_deref(),
        Some("v2")
    );
    // The same holds for compare-and-set and delete: the first outcome is returned again.
    let mut cl = c.client(2);
    assert!(cl.query_one("SELECT raft_cas('lock', NULL, 'me', request_id => 'cas-1')", &[]).unwrap().get::<_, bool>(0));
    assert!(cl.query_one("SELECT raft_delete('lock')", &[]).unwrap().get::<_, bool>(0));
    assert!(c
        .client(1)
        .query_one("SELECT raft_cas('lock', NULL, 'me', request_id => 'cas-1')", &[])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(
        cl.query_one("SELECT raft_get('lock')", &[]).unwrap().get::<_, Option<String>>(0),
        None,
        "the retried CAS must not write"
    );
    let err = cl.query("SELECT raft_set('k', 'v', request_id => '')", &[]).unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("request_id must be 1 to 256 bytes"));
}
