//! Issue 14, backup and disaster recovery on real servers:
//! - a backup taken from a follower while writes go on (`raft_backup()`, saved with binary
//!   COPY) seeds a brand-new cluster (`raft_restore()`) whose state, revisions, history and
//!   leases equal the source's at the backup's revision, which then grows to three nodes;
//! - after two of three nodes are destroyed, the survivor becomes a one-node cluster
//!   (`raft_force_new_cluster()`, refused while a quorum is reachable) keeping every
//!   acknowledged write, and grows back to three.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft_kv_tests::{joiner_conf, wait_for, Client, Cluster};

fn code(e: &raft_kv_tests::PgError) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

fn message(e: &raft_kv_tests::PgError) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

fn backup(cl: &mut Client) -> Vec<u8> {
    let mut out = Vec::new();
    cl.copy_out("COPY (SELECT * FROM raft_backup()) TO STDOUT (FORMAT binary)").unwrap().read_to_end(&mut out).unwrap();
    out
}

fn load(cl: &mut Client, bytes: &[u8]) {
    let mut w = cl.copy_in("COPY raft_kv.restore FROM STDIN (FORMAT binary)").unwrap();
    w.write_all(bytes).unwrap();
    w.finish().unwrap();
}

type Rows = Vec<(String, String, i64, i64, i64)>;

fn kv_rows(cl: &mut Client, sql: &str, args: &[&(dyn postgres::types::ToSql + Sync)]) -> Rows {
    cl.query(sql, args).unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect()
}

fn changes(cl: &mut Client, upto: i64) -> Vec<(i64, String, String, Option<String>)> {
    cl.query(
        "SELECT revision, key, kind, value FROM raft_kv.changes WHERE revision <= $1 ORDER BY revision, key",
        &[&upto],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Adds a node to `c` (which must have a leader among `voters`) and waits until it votes.
fn grow(c: &mut Cluster, voters: &[usize]) -> usize {
    let i = c.add_node(joiner_conf);
    let (l, _) = c.wait_leader(voters, Duration::from_secs(10));
    let id = c.node(i).spec.id as i64;
    c.client(l).query_one("SELECT raft_join($1, $2)", &[&id, &c.node(i).raft_addr()]).unwrap();
    let mut cl = c.client(l);
    wait_for(Duration::from_secs(60), "the new node to be promoted to voter", || {
        let v: Vec<i64> = cl.query_one("SELECT voters FROM raft_status()", &[]).unwrap().get(0);
        v.contains(&id).then_some(())
    });
    i
}

#[test]
fn a_backup_taken_under_writes_seeds_a_new_cluster_with_the_same_state() {
    let a = Cluster::start(3);
    let (leader, _) = a.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let mut w = a.client(leader);
    for i in 0..200 {
        w.query_one("SELECT raft_set($1, $2)", &[&format!("k/{}", i % 50), &format!("v{i}")]).unwrap();
    }
    w.query_one("SELECT raft_delete('k/7')", &[]).unwrap();
    let lease: i64 = w.query_one("SELECT raft_lease_grant('10 minutes')", &[]).unwrap().get(0);
    w.query_one("SELECT raft_set('svc/a', 'up', lease => $1)", &[&lease]).unwrap();
    w.query_one("SELECT raft_set('k/big', repeat('x', 200000))", &[]).unwrap();

    // Writes go on while the backup is taken, on a follower, by an administrator.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, mut cl) = (stop.clone(), a.client(leader));
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                cl.query_one("SELECT raft_set($1, $2)", &[&format!("live/{}", n % 20), &n.to_string()]).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut admin = a.client(follower);
    admin.batch_execute("CREATE ROLE operator IN ROLE raft_kv_admin; SET ROLE operator").unwrap();
    // A follower's copy is as of what it has applied; a linearizable read first makes it hold
    // every write acknowledged before (the README's recipe): here, k/big and the delete of k/7.
    let big: Option<String> = admin.query_one("SELECT raft_get('k/big')", &[]).unwrap().get(0);
    assert_eq!(big.map(|v| v.len()), Some(200000));
    let bytes = backup(&mut admin);
    stop.store(true, Ordering::Relaxed);
    let during = writer.join().unwrap();
    assert!(during > 0, "writes went on during the backup");
    // A role without raft_kv_admin cannot take one; nobody but a superuser restores.
    admin.batch_execute("RESET ROLE; CREATE ROLE nobody; SET ROLE nobody").unwrap();
    let e = admin.query("SELECT * FROM raft_backup()", &[]).unwrap_err();
    assert_eq!(code(&e), "42501", "{}", message(&e));
    admin.batch_execute("RESET ROLE").unwrap();

    // Restore refuses a cluster that is not brand new, and one of three nodes.
    let mut su = a.client(leader);
    load(&mut su, &bytes);
    let e = su.query_one("SELECT raft_restore()", &[]).unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    su.batch_execute("TRUNCATE raft_kv.restore").unwrap();

    // A brand-new one-node cluster: a damaged copy is refused and changes nothing.
    let mut b = Cluster::start(1);
    b.wait_leader(&[1], Duration::from_secs(10));
    let mut bc = b.client(1);
    wait_for(Duration::from_secs(10), "the new cluster's id", || {
        let id: Option<String> = bc.query_one("SELECT cluster_id FROM raft_status()", &[]).unwrap().get(0);
        id.is_some().then_some(())
    });
    load(&mut bc, &bytes);
    bc.batch_execute("DELETE FROM raft_kv.restore WHERE seq = 2").unwrap();
    let e = bc.query_one("SELECT raft_restore()", &[]).unwrap_err();
    assert_eq!(code(&e), "22000", "{}", message(&e));
    assert!(message(&e).contains("record 2 is missing"), "{}", message(&e));
    let rev: i64 = bc.query_one("SELECT revision FROM raft_status()", &[]).unwrap().get(0);
    assert_eq!(rev, 0, "nothing was restored");
    bc.batch_execute("TRUNCATE raft_kv.restore").unwrap();
    let e = bc.query_one("SELECT raft_restore()", &[]).unwrap_err();
    assert_eq!(code(&e), "55000", "an empty staging table: {}", message(&e));
    assert!(message(&e).contains("raft_kv.restore is empty"), "{}", message(&e));
    load(&mut bc, &bytes);
    bc.batch_execute("CREATE ROLE operator IN ROLE raft_kv_admin; SET ROLE operator").unwrap();
    let e = bc.query_one("SELECT raft_restore()", &[]).unwrap_err();
    assert_eq!(code(&e), "42501", "{}", message(&e));
    bc.batch_execute("RESET ROLE").unwrap();

    // The whole copy restores.
    let restored: i64 = bc.query_one("SELECT raft_restore()", &[]).unwrap().get(0);
    let staged: i64 = bc.query_one("SELECT count(*) FROM raft_kv.restore", &[]).unwrap().get(0);
    assert_eq!(staged, 0, "the staging table is emptied");
    let (a_id, b_id): (Option<String>, Option<String>) = (
        a.client(1).query_one("SELECT cluster_id FROM raft_status()", &[]).unwrap().get(0),
        bc.query_one("SELECT cluster_id FROM raft_status()", &[]).unwrap().get(0),
    );
    assert_ne!(a_id, b_id, "the new cluster keeps its own id");
    // Its state is the source's at the restored revision: keys with their revisions, history.
    let mut src = a.client(follower);
    let want = kv_rows(
        &mut src,
        "SELECT key, value, mod_revision, create_revision, version FROM raft_scan('', 'local', $1) ORDER BY key",
        &[&restored],
    );
    assert!(want.iter().any(|r| r.0 == "k/big") && !want.iter().any(|r| r.0 == "k/7"));
    let want_changes = changes(&mut src, restored);
    let (src_compact,): (i64,) = {
        let r = src.query_one("SELECT compact_revision FROM raft_status()", &[]).unwrap();
        (r.get(0),)
    };
    let sql = "SELECT key, value, mod_revision, create_revision, version FROM raft_kv.kv ORDER BY key";
    assert_eq!(kv_rows(&mut bc, sql, &[]), want);
    assert_eq!(changes(&mut bc, restored), want_changes);
    let r = bc.query_one("SELECT revision, compact_revision FROM raft_status()", &[]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (restored, src_compact));
    let leased: i64 = bc.query_one("SELECT lease FROM raft_kv.kv WHERE key = 'svc/a'", &[]).unwrap().get(0);
    assert_eq!(leased, lease);
    let r = bc
        .query_one("SELECT extract(epoch FROM remaining_ttl)::bigint, keys FROM raft_lease_ttl($1)", &[&lease])
        .unwrap();
    assert!(r.get::<_, i64>(0) > 60, "the lease lives on");
    assert_eq!(r.get::<_, Vec<String>>(1), vec!["svc/a".to_string()]);
    // It grows to three nodes, which receive the restored state, and carries on writing.
    grow(&mut b, &[1]);
    grow(&mut b, &[1, 2]);
    let next: i64 = b.client(2).query_one("SELECT raft_set('after', 'restore')", &[]).unwrap().get(0);
    assert_eq!(next, restored + 1);
    b.assert_converged(&[1, 2, 3]);
    for i in 2..=3 {
        let mut cl = b.client(i);
        let mut got = kv_rows(&mut cl, sql, &[]);
        got.retain(|r| r.0 != "after");
        assert_eq!(got, want, "node {i}");
        assert_eq!(changes(&mut cl, restored), want_changes, "node {i}");
    }
    // Only once.
    load(&mut bc, &bytes);
    let e = bc.query_one("SELECT raft_restore()", &[]).unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
}

#[test]
fn the_survivor_of_a_lost_majority_becomes_a_new_cluster_keeping_acknowledged_writes() {
    let mut c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(10));
    // The survivor is a follower; the leader is among the nodes lost.
    let survivor = (1..=3).find(|&i| i != leader).unwrap();
    let lost: Vec<usize> = (1..=3).filter(|&i| i != survivor).collect();
    let acked = Arc::new(Mutex::new(Vec::new()));
    for n in 0..300 {
        let (k, v) = (format!("k/{}", n % 40), format!("v{n}"));
        c.client(leader).query_one("SELECT raft_set($1, $2)", &[&k, &v]).unwrap();
        acked.lock().unwrap().push((k, v));
    }
    // Refused while a quorum is reachable, and for anyone but a superuser.
    let mut s = c.client(survivor);
    let e = s.query_one("SELECT raft_force_new_cluster()", &[]).unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    s.batch_execute("CREATE ROLE operator IN ROLE raft_kv_admin; SET ROLE operator").unwrap();
    let e = s.query_one("SELECT raft_force_new_cluster()", &[]).unwrap_err();
    assert_eq!(code(&e), "42501", "{}", message(&e));
    s.batch_execute("RESET ROLE").unwrap();
    // Every acknowledged write has reached the survivor's log (it may not know all committed).
    let commit: i64 = c.client(leader).query_one("SELECT commit_index FROM raft_status()", &[]).unwrap().get(0);
    wait_for(Duration::from_secs(10), "the survivor to hold the leader's committed entries", || {
        let last: i64 = s.query_one("SELECT last_index FROM raft_status()", &[]).unwrap().get(0);
        (last >= commit).then_some(())
    });
    // Two nodes are lost for good: killed, their data directories destroyed.
    for &i in &lost {
        c.kill9(i);
        std::fs::remove_dir_all(c.node(i).data()).unwrap();
    }
    // Once it no longer hears from them, the survivor may go it alone.
    let started = wait_for(Duration::from_secs(20), "raft_force_new_cluster to be allowed", || {
        match s.query_one("SELECT raft_force_new_cluster()", &[]) {
            Ok(r) => Some(r.get::<_, i64>(0)),
            Err(e) if code(&e) == "55000" => None,
            Err(e) => panic!("{}", message(&e)),
        }
    });
    assert!(started >= commit, "it applies every entry it holds: {started} < {commit}");
    let mut s = wait_for(Duration::from_secs(20), "the survivor to lead alone", || {
        let mut cl = c.try_client(survivor)?;
        let r = cl.query_one("SELECT role, voters FROM raft_status()", &[]).ok()?;
        (r.get::<_, Option<String>>(0).as_deref() == Some("leader") && r.get::<_, Vec<i64>>(1) == vec![survivor as i64])
            .then_some(cl)
    });
    let check = |cl: &mut Client| {
        let mut last = std::collections::HashMap::new();
        for (k, v) in acked.lock().unwrap().iter() {
            last.insert(k.clone(), v.clone());
        }
        for (k, v) in last {
            let got: Option<String> = cl.query_one("SELECT raft_get($1, 'local')", &[&k]).unwrap().get(0);
            assert_eq!(got.as_deref(), Some(v.as_str()), "{k}");
        }
    };
    check(&mut s);
    let members: i64 = s.query_one("SELECT count(*) FROM raft_members()", &[]).unwrap().get(0);
    assert_eq!(members, 1);
    s.query_one("SELECT raft_set('after', 'loss')", &[]).unwrap();
    // Grown back to three with two new nodes.
    let n4 = grow(&mut c, &[survivor]);
    let n5 = grow(&mut c, &[survivor, n4]);
    c.assert_converged(&[survivor, n4, n5]);
    for i in [n4, n5] {
        check(&mut c.client(i));
    }
    let e = s.query_one("SELECT raft_force_new_cluster()", &[]).unwrap_err();
    assert_eq!(code(&e), "55000", "refused with a quorum again: {e}");
}
