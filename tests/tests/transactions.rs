//! Issue 12: `raft_txn` on real servers. Every compare target and op kind against etcd's
//! documented semantics, bad input that changes nothing, and a bank: clients move money
//! between accounts with transactions guarded by mod_revision while the network partitions,
//! servers pause and die; the total never changes and no acknowledged transfer is lost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft_kv_tests::{Client, Cluster, StopOnDrop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn txn(cl: &mut Client, compare: Value, success: Value, failure: Value) -> Result<(bool, i64, Value), postgres::Error> {
    let r = cl.query_one(
        "SELECT succeeded, revision, responses::text FROM raft_txn($1::text::jsonb, $2::text::jsonb, $3::text::jsonb)",
        &[&compare.to_string(), &success.to_string(), &failure.to_string()],
    )?;
    Ok((r.get(0), r.get(1), serde_json::from_str(&r.get::<_, String>(2)).unwrap()))
}

fn holds(cl: &mut Client, compare: Value) -> bool {
    txn(cl, compare, json!([]), json!([])).unwrap().0
}

fn cmp(scope: (&str, &str), target: &str, op: &str, value: Value) -> Value {
    json!([{ scope.0: scope.1, "target": target, "op": op, "value": value }])
}

fn revision(cl: &mut Client) -> i64 {
    cl.query_one("SELECT revision FROM raft_status()", &[]).unwrap().get(0)
}

#[test]
fn every_compare_and_op_follows_etcd() {
    let c = Cluster::start(1);
    c.wait_leader(&[1], Duration::from_secs(10));
    let mut cl = c.client(1);
    let r1: i64 = cl.query_one("SELECT raft_set('a', 'apple')", &[]).unwrap().get(0);
    let r2: i64 = cl.query_one("SELECT raft_set('a', 'avocado')", &[]).unwrap().get(0);
    let r3: i64 = cl.query_one("SELECT raft_set('p/1', 'x')", &[]).unwrap().get(0);
    let r4: i64 = cl.query_one("SELECT raft_set('p/2', 'y')", &[]).unwrap().get(0);
    let key = ("key", "a");
    // value: bytewise =, !=, <, >.
    assert!(holds(&mut cl, cmp(key, "value", "=", json!("avocado"))));
    assert!(!holds(&mut cl, cmp(key, "value", "=", json!("apple"))));
    assert!(holds(&mut cl, cmp(key, "value", "!=", json!("apple"))));
    assert!(holds(&mut cl, cmp(key, "value", ">", json!("apple"))));
    assert!(holds(&mut cl, cmp(key, "value", "<", json!("b"))));
    // version (writes since creation), create_revision, mod_revision.
    assert!(holds(&mut cl, cmp(key, "version", "=", json!(2))));
    assert!(holds(&mut cl, cmp(key, "version", ">", json!(1))));
    assert!(holds(&mut cl, cmp(key, "create_revision", "=", json!(r1))));
    assert!(holds(&mut cl, cmp(key, "mod_revision", "=", json!(r2))));
    assert!(holds(&mut cl, cmp(key, "mod_revision", "<", json!(r2 + 1))));
    assert!(!holds(&mut cl, cmp(key, "mod_revision", "!=", json!(r2))));
    // An absent key: a value compare fails whatever the op; the others compare with 0.
    let absent = ("key", "nope");
    assert!(!holds(&mut cl, cmp(absent, "value", "!=", json!("x"))));
    assert!(holds(&mut cl, cmp(absent, "version", "=", json!(0))));
    assert!(holds(&mut cl, cmp(absent, "create_revision", "=", json!(0))));
    assert!(!holds(&mut cl, cmp(absent, "mod_revision", ">", json!(0))));
    // A prefix: every key under it must satisfy the compare.
    assert!(holds(&mut cl, cmp(("prefix", "p/"), "mod_revision", ">", json!(r2))));
    assert!(!holds(&mut cl, cmp(("prefix", "p/"), "mod_revision", ">", json!(r3))));
    assert!(holds(&mut cl, cmp(("prefix", "p/"), "value", "<", json!("z"))));
    // Several compares: all must hold.
    let both = json!([{"key": "a", "target": "version", "op": "=", "value": 2},
                      {"key": "p/2", "target": "mod_revision", "op": "=", "value": r4}]);
    assert!(holds(&mut cl, both));
    // Read-only transactions change no revision.
    assert_eq!(revision(&mut cl), r4);

    // The success branch: a put, a get of a key it writes (the state the compares saw), a
    // prefix get, a prefix delete: all at one revision.
    let (ok, rev, resp) = txn(
        &mut cl,
        cmp(key, "value", "=", json!("avocado")),
        json!([{"op": "put", "key": "a", "value": "apricot"}, {"op": "get", "key": "a"},
               {"op": "get", "prefix": "p/"}, {"op": "delete", "prefix": "p/"}]),
        json!([{"op": "put", "key": "failed", "value": "1"}]),
    )
    .unwrap();
    assert!(ok);
    assert_eq!(rev, r4 + 1);
    assert_eq!(resp[0], json!({"op": "put", "key": "a", "revision": rev}));
    assert_eq!(resp[1]["kvs"][0]["value"], "avocado", "gets see the state the compares saw: {resp}");
    assert_eq!(resp[1]["kvs"][0]["version"], 2);
    let kvs: Vec<&str> = resp[2]["kvs"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap()).collect();
    assert_eq!(kvs, ["p/1", "p/2"]);
    assert_eq!(resp[3], json!({"op": "delete", "prefix": "p/", "deleted": 2}));
    let changes: Vec<(String, String)> = cl
        .query("SELECT key, kind FROM raft_changes($1)", &[&rev])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(String, String)> = [("a", "put"), ("p/1", "delete"), ("p/2", "delete")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(changes, want, "one revision for the whole transaction");
    assert!(cl.query("SELECT * FROM raft_scan('p/')", &[]).unwrap().is_empty());
    // The failure branch.
    let (ok, rev2, resp) = txn(
        &mut cl,
        cmp(key, "version", "=", json!(1)),
        json!([{"op": "put", "key": "never", "value": "1"}]),
        json!([{"op": "put", "key": "b", "value": "banana"}, {"op": "delete", "key": "nope"}, {"op": "get", "key": "b"}]),
    )
    .unwrap();
    assert!(!ok);
    assert_eq!(rev2, rev + 1);
    assert_eq!(resp[1]["deleted"], 0);
    assert_eq!(resp[2]["kvs"], json!([]), "b did not exist when the compares ran");
    let v: Option<String> = cl.query_one("SELECT raft_get('never')", &[]).unwrap().get(0);
    assert_eq!(v, None);
    // A failure branch that writes nothing: the revision stays.
    let (ok, rev3, resp) =
        txn(&mut cl, cmp(absent, "value", "=", json!("x")), json!([]), json!([{"op": "delete", "prefix": "zzz"}]))
            .unwrap();
    assert!(!ok);
    assert_eq!(rev3, rev2);
    assert_eq!(resp[0]["deleted"], 0);
    // A retry with the same request id answers as the first call and writes nothing.
    let once = |cl: &mut Client| -> (bool, i64, String) {
        let r = cl
            .query_one(
                "SELECT succeeded, revision, responses::text FROM raft_txn('[]', \
                 '[{\"op\": \"put\", \"key\": \"r\", \"value\": \"1\"}, {\"op\": \"get\", \"key\": \"r\"}]', \
                 request_id => 'txn-1')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let first = once(&mut cl);
    cl.query_one("SELECT raft_set('r', '2')", &[]).unwrap();
    assert_eq!(once(&mut cl), first);
    let v: Option<String> = cl.query_one("SELECT raft_get('r')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("2"), "the retry did not write again");
}

#[test]
fn bad_transactions_are_clear_errors_and_change_nothing() {
    let c = Cluster::start(1);
    c.wait_leader(&[1], Duration::from_secs(10));
    let mut cl = c.client(1);
    cl.query_one("SELECT raft_set('a', '1')", &[]).unwrap();
    let before = revision(&mut cl);
    let many = Value::Array((0..129).map(|i| json!({"op": "get", "key": format!("k{i}")})).collect());
    let big = "x".repeat(2 << 20);
    let put = |v: &str| json!([{"op": "put", "key": "a", "value": v}]).to_string();
    for (compare, success, want_code, want_text) in [
        ("{}".to_string(), "[]".to_string(), "22023", "compare must be a JSON array"),
        ("[]".into(), r#"[{"op": "putt", "key": "a"}]"#.into(), "22023", "success[0]: unknown op \"putt\""),
        ("[]".into(), r#"[{"op": "put", "key": "a"}]"#.into(), "22023", "success[0]: a put needs \"value\""),
        ("[]".into(), r#"[{"op": "get", "key": "a", "prefix": "b"}]"#.into(), "22023", "exactly one of"),
        (
            r#"[{"key": "a", "target": "version", "op": "~", "value": 1}]"#.into(),
            "[]".into(),
            "22023",
            "compare[0]: unknown op",
        ),
        (
            r#"[{"key": "a", "target": "mod_revision", "op": "=", "value": "x"}]"#.into(),
            "[]".into(),
            "22023",
            "compare[0]:",
        ),
        ("[]".into(), r#"[{"op": "put", "key": "", "value": "v"}]"#.into(), "22023", "an empty key"),
        (
            "[]".into(),
            r#"[{"op": "put", "key": "a", "value": "1"}, {"op": "delete", "prefix": ""}]"#.into(),
            "22023",
            "also written",
        ),
        ("[]".into(), many.to_string(), "22023", "the limit is 128"),
        ("[]".into(), put(&big), "54000", "success[0]: the value is"),
    ] {
        let e = cl
            .query_one("SELECT * FROM raft_txn($1::text::jsonb, $2::text::jsonb)", &[&compare, &success])
            .unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(db.code().code(), want_code, "{success}: {e}");
        assert!(db.message().contains(want_text), "{}: {}", want_text, db.message());
    }
    let e = cl.query_one("SELECT * FROM raft_txn(NULL, '[]')", &[]).unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "22004");
    let e = cl.query_one("SELECT * FROM raft_txn('[]', '[]', '[]', '')", &[]).unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "22023", "an empty request id");
    assert_eq!(revision(&mut cl), before, "nothing was written");
}

const ACCOUNTS: usize = 10;
const CLIENTS: usize = 8;
const START: i64 = 100;

struct Transfer {
    revision: i64,
    from: String,
    to: String,
    from_value: i64,
    to_value: i64,
}

/// The open connection, or an attempt at the next node's (None, after a pause, if it is down).
fn connected<'a>(c: &Cluster, conn: &'a mut Option<Client>, node: &mut usize) -> Option<&'a mut Client> {
    if conn.is_none() {
        *node = *node % 3 + 1;
        *conn = c.try_client(*node);
        if conn.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        return None;
    }
    conn.as_mut()
}

/// One client: read two accounts, then move an amount with a transaction that holds only if
/// neither changed since (mod_revision), retrying the same request id until answered.
fn bank_client(
    c: &Cluster,
    id: usize,
    seed: u64,
    stop: &AtomicBool,
    acked: &Mutex<Vec<Transfer>>,
    failed: &AtomicUsize,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id as u64 * 31));
    let mut node = id % 3 + 1;
    let mut conn: Option<Client> = None;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(cl) = connected(c, &mut conn, &mut node) else { continue };
        let a = rng.gen_range(0..ACCOUNTS);
        let b = (a + rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
        let (from, to) = (format!("acct/{a}"), format!("acct/{b}"));
        let read = cl.query(
            "SELECT key, value::bigint, mod_revision FROM raft_scan('acct/') WHERE key IN ($1, $2) ORDER BY key = $1 DESC",
            &[&from, &to],
        );
        let rows = match read {
            Ok(r) => r,
            Err(e) => {
                if cl.is_closed() || e.as_db_error().is_none() {
                    conn = None;
                }
                continue;
            }
        };
        let (fv, fr, tv, tr): (i64, i64, i64, i64) = (rows[0].get(1), rows[0].get(2), rows[1].get(1), rows[1].get(2));
        let amount = rng.gen_range(1..=10).min(fv);
        if amount == 0 {
            continue;
        }
        n += 1;
        let rid = format!("bank{id}-{n}");
        let compare = json!([{"key": from, "target": "mod_revision", "op": "=", "value": fr},
                             {"key": to, "target": "mod_revision", "op": "=", "value": tr}]);
        let success = json!([{"op": "put", "key": from, "value": (fv - amount).to_string()},
                             {"op": "put", "key": to, "value": (tv + amount).to_string()}]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Some(cl) = connected(c, &mut conn, &mut node) else { continue };
            let r = cl.query_one(
                "SELECT succeeded, revision FROM raft_txn($1::text::jsonb, $2::text::jsonb, '[]', $3)",
                &[&compare.to_string(), &success.to_string(), &rid],
            );
            match r {
                Ok(r) => {
                    if r.get::<_, bool>(0) {
                        acked.lock().unwrap().push(Transfer {
                            revision: r.get(1),
                            from: from.clone(),
                            to: to.clone(),
                            from_value: fv - amount,
                            to_value: tv + amount,
                        });
                    }
                    break;
                }
                Err(e) => {
                    if cl.is_closed() || e.as_db_error().is_none() {
                        conn = None;
                    }
                    if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
                        // Unknown outcome: the final checks still hold whichever it was.
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

#[test]
fn bank_transfers_keep_the_total_under_faults() {
    let seed: u64 = std::env::var("RAFT_KV_BANK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    let secs: u64 = std::env::var("RAFT_KV_BANK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    let c = Cluster::builder(3).proxied().start();
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let open: Vec<Value> =
        (0..ACCOUNTS).map(|i| json!({"op": "put", "key": format!("acct/{i}"), "value": START.to_string()})).collect();
    txn(&mut c.client(1), json!([]), Value::Array(open), json!([])).unwrap();
    let total = START * ACCOUNTS as i64;
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    let failed = AtomicUsize::new(0);
    let audits = AtomicUsize::new(0);
    let net = c.net.as_ref().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = 0;
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for id in 0..CLIENTS {
            let (c, stop, acked, failed) = (&c, &stop, &acked, &failed);
            s.spawn(move || bank_client(c, id, seed, stop, acked, failed));
        }
        // An auditor: every linearizable scan, on any node, sums to the total.
        let (c2, stop2, audits2) = (&c, &stop, &audits);
        s.spawn(move || {
            let mut i = 0;
            while !stop2.load(Ordering::Relaxed) {
                i = i % 3 + 1;
                if let Some(mut cl) = c2.try_client(i) {
                    if let Ok(r) =
                        cl.query_one("SELECT sum(value::bigint)::bigint, count(*) FROM raft_scan('acct/')", &[])
                    {
                        assert_eq!(r.get::<_, i64>(0), total, "node {i}: a scan saw a total of {}", r.get::<_, i64>(0));
                        assert_eq!(r.get::<_, i64>(1), ACCOUNTS as i64);
                        audits2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let end = Instant::now() + Duration::from_secs(secs);
        let mut round = 0;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(rng.gen_range(500..1500)));
            let hold = Duration::from_millis(rng.gen_range(1500..3000));
            let leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(20)).0;
            match round % 3 {
                0 => {
                    let others: Vec<u64> = (1..=3).filter(|&i| i != leader as u64).collect();
                    net.partition(&[vec![leader as u64], others]);
                    std::thread::sleep(hold);
                    net.heal();
                }
                1 => {
                    c.pause(leader, true);
                    std::thread::sleep(hold);
                    c.pause(leader, false);
                }
                _ => {
                    let target = rng.gen_range(1..=3);
                    c.kill9(target);
                    std::thread::sleep(hold);
                    c.start_node(target);
                }
            }
            round += 1;
        }
        faults = round;
        stop.store(true, Ordering::Relaxed);
    });
    net.heal();
    c.wait_leader(&[1, 2, 3], Duration::from_secs(20));
    c.assert_converged(&[1, 2, 3]);
    let acked = acked.into_inner().unwrap();
    println!(
        "bank: {} acknowledged transfers, {} with unknown outcome, {} audits, {faults} faults",
        acked.len(),
        failed.load(Ordering::Relaxed),
        audits.load(Ordering::Relaxed),
    );
    assert!(acked.len() > 50, "too few transfers went through: {}", acked.len());
    assert!(audits.load(Ordering::Relaxed) > 20);
    let mut cl = c.client(1);
    let sum: i64 = cl.query_one("SELECT sum(value::bigint)::bigint FROM raft_scan('acct/')", &[]).unwrap().get(0);
    assert_eq!(sum, total);
    // No acknowledged transfer is lost: both of its writes are in the history at its revision.
    for t in &acked {
        let rows = cl
            .query("SELECT key, value FROM raft_changes($1, 'acct/', 10) WHERE revision = $1", &[&t.revision])
            .unwrap();
        let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut want = vec![(t.from.clone(), t.from_value.to_string()), (t.to.clone(), t.to_value.to_string())];
        want.sort();
        assert_eq!(got, want, "the transfer acknowledged at revision {}", t.revision);
    }
}
