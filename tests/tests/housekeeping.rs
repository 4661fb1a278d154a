//! Issue 11: the worker's writes reach the statistics autovacuum works from, and prefix scans
//! read a key range.

use std::time::Duration;

use raft_kv_tests::{wait_for, Cluster};

#[test]
fn the_workers_writes_appear_in_pg_stat_user_tables_on_every_node() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(30));
    let mut l = c.client(leader);
    for i in 0..50 {
        l.query_one("SELECT raft_set($1, 'v')", &[&format!("stats/{i}")]).unwrap();
    }
    l.query_one("SELECT raft_delete('stats/0')", &[]).unwrap();
    for i in 1..=3 {
        let mut cl = c.client(i);
        let (log, kv, requests) = wait_for(Duration::from_secs(30), "the worker's statistics", || {
            // Each query is its own transaction, so it reads fresh statistics.
            let row = cl
                .query_one(
                    "SELECT \
                       (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'raft_kv.log'::regclass), \
                       (SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE relid = 'raft_kv.kv'::regclass), \
                       (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'raft_kv.requests'::regclass)",
                    &[],
                )
                .unwrap();
            let (log, kv, req): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            (log >= 51 && kv >= 50 && req >= 51).then_some((log, kv, req))
        });
        println!("node {i}: log inserts {log}, kv inserts+updates {kv}, request inserts {requests}");
        let dead: i64 = cl
            .query_one("SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'raft_kv.kv'::regclass", &[])
            .unwrap()
            .get(0);
        assert!(dead >= 1, "node {i}: the delete is counted");
    }
}

#[test]
fn prefix_scans_return_exactly_the_keys_under_the_prefix() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(30));
    let mut l = c.client(leader);
    let keys =
        ["a", "a/", "a/1", "a/2", "a/\u{7f}", "a0", "b", "é", "é/x", "éa", "ê", "z\u{10ffff}", "z\u{10ffff}x", "zz"];
    for k in keys {
        l.query_one("SELECT raft_set($1, 'v')", &[&k]).unwrap();
    }
    for prefix in ["", "a", "a/", "a/1", "é", "z\u{10ffff}", "\u{10ffff}", "q", "a/\u{7f}"] {
        let got: Vec<String> =
            l.query("SELECT key FROM raft_scan($1)", &[&prefix]).unwrap().iter().map(|r| r.get(0)).collect();
        let mut want: Vec<String> = keys.iter().filter(|k| k.starts_with(prefix)).map(|k| k.to_string()).collect();
        // Keys sort bytewise (UTF-8 order is code-point order).
        want.sort();
        assert_eq!(got, want, "prefix {prefix:?}");
    }
    // The rows come from the executor straight into the result set: a value stored out of
    // line (TOASTed) arrives whole, also in the select list and through 'local' on a follower.
    // Hex digits of splitmix64: nothing for the compressor to shorten below the TOAST threshold.
    let mix = |i: u64| {
        let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) & 15
    };
    let big: String = (0..40_000u64).map(|i| format!("{:x}", mix(i))).collect();
    let rev: i64 = l.query_one("SELECT raft_set('big/1', $1)", &[&big]).unwrap().get(0);
    let toast: String = l
        .query_one("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'raft_kv.kv'::regclass", &[])
        .unwrap()
        .get(0);
    let chunks: i64 = l.query_one(&format!("SELECT count(*) FROM {toast}"), &[]).unwrap().get(0);
    assert!(chunks > 0, "the value is stored out of line");
    let row = l.query_one("SELECT value, mod_revision, version FROM raft_scan('big/')", &[]).unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (big.clone(), rev, 1));
    let listed: Vec<String> = l.query("SELECT (raft_scan('a/')).key", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(listed, ["a/", "a/1", "a/2", "a/\u{7f}"]);
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let mut f = c.client(follower);
    f.query("SELECT * FROM raft_scan('big/')", &[]).unwrap();
    let local: String = f.query_one("SELECT value FROM raft_scan('big/', 'local')", &[]).unwrap().get(0);
    assert_eq!(local, big);
}
