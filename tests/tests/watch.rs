//! Issue 12: revisions, history and watch on real clusters. Watchers on every node follow a
//! prefix (by `raft_watch`, and by LISTEN plus `raft_changes`) while writers put, delete, run
//! transactions and compare-and-sets, a leader is killed and a watcher reconnects; every
//! watcher must see exactly the changes the writers' acknowledged results imply, in order.
//! Then compaction: the same on every node, explicit and by retention, and carried to a node
//! that joins by snapshot.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft_kv_tests::{joiner_conf, wait_for, wait_showing, Client, Cluster, StopOnDrop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One change as the history reports it: (revision, key, kind, value).
type Change = (i64, String, String, Option<String>);

const PREFIX: &str = "w/";
const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 500;

fn connect_any(c: &Cluster, prefer: usize) -> (usize, Client) {
    wait_for(Duration::from_secs(30), "a node to connect to", || {
        (0..3).map(|k| (prefer + k - 1) % 3 + 1).find_map(|i| c.try_client(i).map(|cl| (i, cl)))
    })
}

/// Runs `sql` (a write with a request id) until it is acknowledged, on any node: the request
/// id makes every retry the same request.
fn until_acked(
    c: &Cluster,
    conn: &mut (usize, Client),
    f: &mut dyn FnMut(&mut Client) -> Result<postgres::Row, postgres::Error>,
) -> postgres::Row {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f(&mut conn.1) {
            Ok(r) => return r,
            Err(e) => {
                assert!(Instant::now() < deadline, "a write was never acknowledged: {e}");
                if conn.1.is_closed() || e.as_db_error().is_none() {
                    *conn = connect_any(c, conn.0 % 3 + 1);
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// One writer: puts, deletes, transactions and compare-and-sets over keys in and out of the
/// watched prefix. Returns the changes its acknowledged results imply (each write reports its
/// revision). Compare-and-sets and deletes touch this writer's own keys, so they succeed and
/// delete predictably; puts and transactions share keys with the other writers.
fn writer(c: &Cluster, w: usize, seed: u64, done: &AtomicUsize) -> Vec<Change> {
    let mut rng = StdRng::seed_from_u64(seed ^ (w as u64 * 7919));
    let mut conn = connect_any(c, w % 3 + 1);
    let mut out = Vec::new();
    let shared = |rng: &mut StdRng| format!("{}{}", ["w/s/", "x/"][rng.gen_range(0..2)], rng.gen_range(0..6));
    let own = |rng: &mut StdRng| format!("w/p{w}/{}", rng.gen_range(0..4));
    let mut last: std::collections::HashMap<String, String> = Default::default();
    for n in 0..OPS_PER_WRITER {
        let rid = format!("writer{w}-{n}");
        let v = format!("v{w}-{n}");
        match rng.gen_range(0..10) {
            0..=3 => {
                let k = if rng.gen_bool(0.5) { shared(&mut rng) } else { own(&mut rng) };
                let r =
                    until_acked(c, &mut conn, &mut |cl| cl.query_one("SELECT raft_set($1, $2, $3)", &[&k, &v, &rid]));
                last.insert(k.clone(), v.clone());
                out.push((r.get(0), k, "put".into(), Some(v)));
            }
            4..=5 => {
                let k = own(&mut rng);
                let r = until_acked(c, &mut conn, &mut |cl| {
                    cl.query_one("SELECT deleted, revision FROM raft_delete_rev($1, $2)", &[&k, &rid])
                });
                last.remove(&k);
                if r.get::<_, bool>(0) {
                    out.push((r.get(1), k, "delete".into(), None));
                }
            }
            6..=7 => {
                // If `k` exists, put `k2` and delete `k3`; else put `k`.
                let (k, k2) = (shared(&mut rng), shared(&mut rng));
                let k3 = format!("{}z", shared(&mut rng));
                let cmp = format!(r#"[{{"key": "{k}", "target": "version", "op": ">", "value": 0}}]"#);
                let ok =
                    format!(r#"[{{"op": "put", "key": "{k2}", "value": "{v}"}}, {{"op": "delete", "key": "{k3}"}}]"#);
                let fail = format!(
                    r#"[{{"op": "put", "key": "{k}", "value": "{v}"}}, {{"op": "put", "key": "{k3}", "value": "{v}"}}]"#
                );
                let r = until_acked(c, &mut conn, &mut |cl| {
                    cl.query_one(
                        "SELECT succeeded, revision, responses::text FROM raft_txn($1::text::jsonb, $2::text::jsonb, $3::text::jsonb, $4)",
                        &[&cmp, &ok, &fail, &rid],
                    )
                });
                let (succeeded, rev, responses): (bool, i64, String) = (r.get(0), r.get(1), r.get(2));
                let responses: serde_json::Value = serde_json::from_str(&responses).unwrap();
                if succeeded {
                    out.push((rev, k2, "put".into(), Some(v)));
                    if responses[1]["deleted"] == 1 {
                        out.push((rev, k3, "delete".into(), None));
                    }
                } else {
                    out.push((rev, k, "put".into(), Some(v.clone())));
                    out.push((rev, k3, "put".into(), Some(v)));
                }
            }
            _ => {
                // Compare-and-set on an own key against the value last written there: it
                // succeeds (expecting absence when the key was deleted).
                let k = own(&mut rng);
                let expected = last.get(&k).cloned();
                let r = until_acked(c, &mut conn, &mut |cl| {
                    cl.query_one(
                        "SELECT succeeded, revision FROM raft_cas_rev($1, $2, $3, $4)",
                        &[&k, &expected, &v, &rid],
                    )
                });
                assert!(r.get::<_, bool>(0), "writer {w}: a CAS on its own key failed");
                last.insert(k.clone(), v.clone());
                out.push((r.get(1), k, "put".into(), Some(v)));
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    out
}

/// A watcher on node `i`: follows PREFIX from revision 1 with `raft_watch`, or with LISTEN
/// and `raft_changes` (`listen`), reconnecting to the same node when its connection drops,
/// until it has seen `target` (once set). Dropping its connection on `drop_now`.
fn watcher(
    c: &Cluster,
    i: usize,
    listen: bool,
    target: &AtomicU64,
    drop_now: &AtomicBool,
    stop: &AtomicBool,
) -> Vec<Change> {
    let mut seen: Vec<Change> = Vec::new();
    let mut since = 1i64;
    let mut reconnects = 0;
    let mut conn: Option<Client> = None;
    loop {
        let t = target.load(Ordering::Relaxed);
        if (t > 0 && since > t as i64) || stop.load(Ordering::Relaxed) {
            break;
        }
        if drop_now.swap(false, Ordering::Relaxed) {
            conn = None; // dropped: resume from `since` on a new connection
            reconnects += 1;
        }
        let Some(cl) = conn.as_mut() else {
            match c.try_client(i) {
                Some(mut cl) => {
                    if listen {
                        cl.batch_execute("LISTEN raft_kv").unwrap();
                    }
                    conn = Some(cl);
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
            continue;
        };
        let rows = if listen {
            cl.query("SELECT revision, key, kind, value FROM raft_changes($1, $2, 300, 'local')", &[&since, &PREFIX])
        } else {
            cl.query("SELECT revision, key, kind, value FROM raft_watch($1, $2, '1 second', 300)", &[&PREFIX, &since])
        };
        match rows {
            Ok(rows) => {
                for r in &rows {
                    seen.push((r.get(0), r.get(1), r.get(2), r.get(3)));
                }
                if let Some(last) = seen.last() {
                    since = since.max(last.0 + 1);
                }
                if listen && rows.is_empty() {
                    // Woken by the worker's NOTIFY (or a second passes).
                    let _ = postgres::fallible_iterator::FallibleIterator::next(
                        &mut cl.notifications().timeout_iter(Duration::from_secs(1)),
                    );
                }
            }
            Err(e) => {
                assert!(e.as_db_error().is_none_or(|d| d.code().code() != "72000"), "node {i}: {e}");
                conn = None;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    println!(
        "watcher on node {i} ({}): {} changes, {reconnects} deliberate reconnects",
        if listen { "LISTEN" } else { "raft_watch" },
        seen.len()
    );
    seen
}

#[test]
fn every_watcher_sees_every_change_once_in_order_through_a_leader_kill() {
    let seed: u64 = std::env::var("RAFT_KV_WATCH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let c = Cluster::start(3);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let done = AtomicUsize::new(0);
    let target = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let drops: Vec<AtomicBool> = (0..3).map(|_| AtomicBool::new(false)).collect();
    let expected = Mutex::new(Vec::new());
    let mut watched: Vec<Vec<Change>> = Vec::new();
    let mut killed = 0;
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let watchers: Vec<_> = (1..=3)
            .map(|i| {
                let (target, drop_now, stop, c) = (&target, &drops[i - 1], &stop, &c);
                s.spawn(move || watcher(c, i, i == 3, target, drop_now, stop))
            })
            .collect();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (c, done, expected) = (&c, &done, &expected);
                s.spawn(move || {
                    let mine = writer(c, w, seed, done);
                    expected.lock().unwrap().extend(mine);
                })
            })
            .collect();
        let total = WRITERS * OPS_PER_WRITER;
        // A third of the way: kill the leader (kill -9), restart it a little later.
        wait_for(Duration::from_secs(120), "a third of the writes", || {
            (done.load(Ordering::Relaxed) >= total / 3).then_some(())
        });
        let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
        c.kill9(l);
        killed = l;
        let others: Vec<usize> = (1..=3).filter(|&i| i != l).collect();
        c.wait_leader(&others, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
        c.start_node(l);
        // Two thirds: a watcher on a node that stayed up drops its connection and resumes.
        wait_for(Duration::from_secs(120), "two thirds of the writes", || {
            (done.load(Ordering::Relaxed) >= 2 * total / 3).then_some(())
        });
        drops[others[0] - 1].store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let last = expected.lock().unwrap().iter().filter(|c| c.1.starts_with(PREFIX)).map(|c| c.0).max().unwrap();
        target.store(last as u64, Ordering::Relaxed);
        watched = watchers.into_iter().map(|w| w.join().unwrap()).collect();
    });
    let mut want: Vec<Change> =
        expected.into_inner().unwrap().into_iter().filter(|c| c.1.starts_with(PREFIX)).collect();
    want.sort();
    let unique: BTreeSet<_> = want.iter().map(|c| (c.0, c.1.clone())).collect();
    assert_eq!(unique.len(), want.len(), "one change per key and revision");
    println!("{} acknowledged changes under {PREFIX}, leader {killed} killed", want.len());
    assert!(want.len() > 1000, "the writers made too few changes: {}", want.len());
    for (i, seen) in watched.iter().enumerate() {
        // In order, each once: the feed is sorted by (revision, key) and has no repeats.
        assert!(
            seen.windows(2).all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1)),
            "node {}: out of order or repeated",
            i + 1
        );
        assert_eq!(
            seen.len(),
            want.len(),
            "node {}: saw {} changes, the writers made {}",
            i + 1,
            seen.len(),
            want.len()
        );
        assert_eq!(seen, &want, "node {}: the feed differs from the acknowledged writes", i + 1);
    }
    assert!(watched.windows(2).all(|w| w[0] == w[1]), "watchers saw different sequences");
}

fn code(e: &postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_default()
}

fn history(cl: &mut Client, since: i64) -> Result<Vec<String>, postgres::Error> {
    Ok(cl
        .query("SELECT format('%s %s %s %s %s', revision, key, kind, value, prev_value) FROM raft_changes($1, '', 100000, 'local')", &[&since])?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

fn revisions(c: &Cluster, i: usize) -> (i64, i64) {
    let r = c.client(i).query_one("SELECT revision, compact_revision FROM raft_status()", &[]).unwrap();
    (r.get(0), r.get(1))
}

#[test]
fn compaction_is_identical_on_every_node_and_travels_in_snapshots() {
    let mut c =
        Cluster::builder(3).conf("raft_kv.snapshot_threshold = 10").conf("raft_kv.history_retention = 0").start();
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let mut cl = c.client(1);
    for n in 0..40 {
        let k = format!("k{}", n % 7);
        if n % 5 == 4 {
            cl.query_one("SELECT raft_delete($1)", &[&k]).unwrap();
        } else {
            cl.query_one("SELECT raft_set($1, $2)", &[&k, &format!("v{n}")]).unwrap();
        }
    }
    let r: i64 = cl.query_one("SELECT raft_set('marker', 'm')", &[]).unwrap().get(0);
    let cut = r - 10;
    // Before compaction the old revision is readable.
    cl.query_one("SELECT raft_get('k1', at_revision => $1)", &[&(cut - 1)]).unwrap();
    assert_eq!(cl.query_one("SELECT raft_compact($1)", &[&cut]).unwrap().get::<_, i64>(0), cut);
    // Compacting lower again changes nothing; past the store's revision is an error.
    assert_eq!(cl.query_one("SELECT raft_compact(2)", &[]).unwrap().get::<_, i64>(0), cut);
    assert_eq!(code(&cl.query_one("SELECT raft_compact($1)", &[&(r + 100)]).unwrap_err()), "22023");
    for i in 1..=3 {
        wait_for(Duration::from_secs(10), "the compaction to apply", || (revisions(&c, i).1 == cut).then_some(()));
        let mut n = c.client(i);
        for sql in [
            "SELECT * FROM raft_changes($1)",
            "SELECT raft_get('k1', at_revision => $1)",
            "SELECT * FROM raft_scan('', at_revision => $1)",
            "SELECT * FROM raft_watch('', $1, '1 second')",
        ] {
            let e = n.query(sql, &[&(cut - 1)]).unwrap_err();
            assert_eq!(code(&e), "72000", "node {i}: {sql}: {e}");
            assert!(format!("{:?}", e.as_db_error().unwrap().detail()).contains(&format!("from revision {cut}")));
        }
        assert_eq!(history(&mut n, cut).unwrap().len() as i64, r - cut + 1, "node {i}: one change per revision here");
        n.query_one("SELECT raft_get('k1', at_revision => $1)", &[&cut]).unwrap();
    }
    let want = history(&mut c.client(1), cut).unwrap();
    let scan_at = |c: &Cluster, i: usize| -> Vec<String> {
        c.client(i)
            .query("SELECT format('%s=%s@%s/%s/%s', key, value, mod_revision, create_revision, version) FROM raft_scan('', 'local', $1)", &[&(cut + 3)])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let want_scan = scan_at(&c, 1);
    for i in 2..=3 {
        assert_eq!(history(&mut c.client(i), cut).unwrap(), want, "node {i}");
        assert_eq!(scan_at(&c, i), want_scan, "node {i}");
    }

    // A node that joins now is installed from a snapshot (the log is compacted every 10
    // entries): it must answer history queries exactly like the others.
    // The last write's own revision: a node's status may not have applied it yet.
    let mut now = 0;
    for n in 0..30 {
        now = c.client(2).query_one("SELECT raft_set($1, 'filler')", &[&format!("f{n}")]).unwrap().get(0);
    }
    let n4 = c.add_node(joiner_conf);
    let addr = c.node(n4).raft_addr();
    c.client(1).query_one("SELECT raft_join(4, $1)", &[&addr]).unwrap();
    wait_for(Duration::from_secs(30), "node 4 to install a snapshot", || {
        c.node(n4).log().contains("installed the snapshot").then_some(())
    });
    wait_showing(Duration::from_secs(30), &format!("node 4 to catch up to revision {now}"), || {
        let (rev, _) = revisions(&c, n4);
        (rev == now).then_some(()).ok_or(rev)
    });
    assert_eq!(revisions(&c, n4), (now, cut));
    let want = history(&mut c.client(1), cut).unwrap();
    assert_eq!(history(&mut c.client(n4), cut).unwrap(), want, "the joined node's history");
    assert_eq!(scan_at(&c, n4), want_scan, "the joined node's reads at a revision");
    assert_eq!(code(&c.client(n4).query("SELECT * FROM raft_changes($1)", &[&(cut - 1)]).unwrap_err()), "72000");

    // Retention: the leader compacts by itself, identically everywhere.
    for i in 1..=4 {
        let mut n = c.client(i);
        n.batch_execute("ALTER SYSTEM SET raft_kv.history_retention = 20").unwrap();
        n.query_one("SELECT pg_reload_conf()", &[]).unwrap();
    }
    for n in 0..40 {
        now = c.client(3).query_one("SELECT raft_set($1, 'later')", &[&format!("r{n}")]).unwrap().get(0);
    }
    for i in 1..=4 {
        wait_showing(Duration::from_secs(20), &format!("retention to compact on node {i} at revision {now}"), || {
            let (rev, compact) = revisions(&c, i);
            (rev == now && compact > cut && compact >= now - 22).then_some(()).ok_or((rev, compact))
        });
    }
    let points: Vec<(i64, i64)> = (1..=4).map(|i| revisions(&c, i)).collect();
    assert!(points.windows(2).all(|w| w[0] == w[1]), "compaction points differ: {points:?}");
    let compact = points[0].1;
    let want = history(&mut c.client(1), compact).unwrap();
    for i in 2..=4 {
        assert_eq!(history(&mut c.client(i), compact).unwrap(), want, "node {i}");
    }
}

#[test]
fn bad_history_arguments_are_clear_errors() {
    let c = Cluster::start(1);
    c.wait_leader(&[1], Duration::from_secs(10));
    let mut cl = c.client(1);
    cl.query_one("SELECT raft_set('a', '1')", &[]).unwrap();
    for (sql, want) in [
        ("SELECT * FROM raft_changes(NULL)", "22004"),
        ("SELECT * FROM raft_changes(0)", "22023"),
        ("SELECT * FROM raft_changes(1, NULL)", "22004"),
        ("SELECT * FROM raft_changes(1, '', 0)", "22023"),
        ("SELECT * FROM raft_changes(1, '', 1000, 'sometimes')", "22023"),
        ("SELECT * FROM raft_watch('', 1, '-1 second')", "22023"),
        ("SELECT raft_get('a', at_revision => 0)", "22023"),
        ("SELECT raft_get('a', at_revision => 1000)", "22023"),
        ("SELECT raft_compact(NULL)", "22004"),
    ] {
        let e = cl.query(sql, &[]).unwrap_err();
        assert_eq!(code(&e), want, "{sql}: {e}");
    }
    // A watch that times out returns nothing, after about its timeout.
    let t = Instant::now();
    let rows = cl.query("SELECT * FROM raft_watch('nothing/', 1, '300 milliseconds')", &[]).unwrap();
    assert!(rows.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Revisions: +1 per change, not for a delete of an absent key or a failed CAS.
    let r1: i64 = cl.query_one("SELECT raft_set('b', '1')", &[]).unwrap().get(0);
    assert!(!cl.query_one("SELECT raft_delete('absent')", &[]).unwrap().get::<_, bool>(0));
    assert!(!cl.query_one("SELECT raft_cas('b', 'wrong', '2')", &[]).unwrap().get::<_, bool>(0));
    let r2: i64 = cl.query_one("SELECT raft_set('b', '3')", &[]).unwrap().get(0);
    assert_eq!(r2, r1 + 1);
    let kv = cl.query_one("SELECT mod_revision, create_revision, version FROM raft_get_kv('b')", &[]).unwrap();
    assert_eq!((kv.get::<_, i64>(0), kv.get::<_, i64>(1), kv.get::<_, i64>(2)), (r2, r1, 2));
    assert!(cl.query("SELECT * FROM raft_get_kv('absent')", &[]).unwrap().is_empty());
}

/// The README's Python watcher (examples/watch.py) follows a prefix on a follower through a
/// restart of that server, and prints exactly the history.
#[test]
fn the_python_watcher_example_follows_a_prefix_through_a_restart() {
    use std::io::{BufRead, BufReader};
    let c = Cluster::start(3);
    let (l, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let f = if l == 1 { 2 } else { 1 };
    let w = (1..=3).find(|&i| i != l && i != f).unwrap();
    let mut cl = c.client(l);
    let mut write = |n: usize| {
        let k = format!("ex/{}", n % 4);
        if n % 5 == 3 {
            cl.query_one("SELECT raft_delete($1)", &[&k]).unwrap();
        } else {
            cl.query_one("SELECT raft_set($1, $2)", &[&k, &format!("v{n}")]).unwrap();
        }
        cl.query_one("SELECT raft_set('noise', $1)", &[&n.to_string()]).unwrap();
    };
    for n in 0..15 {
        write(n);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/watch.py");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args([script, &c.node(w).conn_str(), "ex/", "1", "--count", "29"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running examples/watch.py (needs python3-psycopg)");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut lines = Vec::new();
    for _ in 0..5 {
        lines.push(out.next().unwrap().unwrap());
    }
    // The watcher's server restarts under it; it reconnects and carries on.
    c.stop_node(w, raft_kv_tests::Stop::Fast);
    for n in 15..30 {
        write(n);
    }
    c.start_node(w);
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in out.by_ref() {
        lines.push(line.unwrap());
        assert!(Instant::now() < deadline, "the watcher is too slow");
    }
    assert!(child.wait().unwrap().success());
    let want: Vec<String> = c
        .client(l)
        .query(
            "SELECT format('%s %s %s %s', revision, kind, key, coalesce(value, '')) FROM raft_changes(1, 'ex/')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(want.len(), 29, "30 writes, one a delete of an absent key");
    assert_eq!(lines, want);
}
