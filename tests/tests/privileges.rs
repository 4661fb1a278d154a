//! Issue 9: the SQL surface is least-privilege. Nothing is executable by PUBLIC; three roles
//! grant reading, writing and administration; no function can be hijacked through
//! search_path; a client's request id belongs to its role and its command.

use std::time::Duration;

use raft_kv_tests::{Client, Cluster};

/// Every raft_kv function, called with valid arguments: first the readers' ones.
const CALLS: &[&str] = &[
    "SELECT raft_get('k')",
    "SELECT raft_get('k', 'local')",
    "SELECT * FROM raft_scan('')",
    "SELECT * FROM raft_status()",
    "SELECT * FROM raft_get_kv('k')",
    "SELECT raft_get('k', 'local', 1)",
    "SELECT * FROM raft_changes(1)",
    "SELECT * FROM raft_watch('', 1, '0 seconds')",
    "SELECT * FROM raft_leases()",
    "SELECT * FROM raft_leader('election')",
    "SELECT * FROM raft_members()",
    "SELECT raft_set('k', 'v')",
    "SELECT raft_cas('k', NULL, 'v')",
    "SELECT raft_delete('k')",
    "SELECT * FROM raft_cas_rev('k', NULL, 'v')",
    "SELECT * FROM raft_delete_rev('k')",
    "SELECT * FROM raft_txn('[]', '[]')",
    "SELECT raft_lease_grant('10s')",
    "SELECT raft_lease_keepalive(1)",
    "SELECT raft_lease_revoke(1)",
    "SELECT raft_lock('lock', 1, '0s')",
    "SELECT raft_unlock('lock', 1)",
    "SELECT raft_campaign('election', 1, 'v', '0s')",
    "SELECT raft_resign('election', 1)",
    "SELECT raft_join(9, '127.0.0.1:1')",
    "SELECT raft_remove(9)",
    "SELECT raft_transfer_leader(9)",
    "SELECT raft_compact(1)",
    "SELECT * FROM raft_backup()",
    "SELECT raft_restore()",
    "SELECT raft_force_new_cluster()",
    "SELECT raft_kv.is_worker()",
];
/// How many of `CALLS` a reader may make.
const READER_CALLS: usize = 10;

fn code(c: &mut Client, sql: &str) -> Option<String> {
    c.batch_execute(sql).err().map(|e| e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or(e.to_string()))
}

fn as_role(c: &Cluster, role: &str) -> Client {
    let mut cl = c.client(1);
    cl.batch_execute(&format!("SET ROLE {role}")).unwrap();
    cl
}

fn leader_ready(c: &Cluster) {
    c.wait_leader(&[1, 2, 3], Duration::from_secs(20));
}

#[test]
fn roles_get_what_they_are_granted_and_nothing_more() {
    let c = Cluster::start(3);
    leader_ready(&c);
    let mut admin = c.client(1);
    admin
        .batch_execute(
            "CREATE ROLE nobody; CREATE ROLE reader IN ROLE raft_kv_reader; \
             CREATE ROLE writer IN ROLE raft_kv_writer; CREATE ROLE operator IN ROLE raft_kv_admin; \
             CREATE ROLE monitor IN ROLE pg_monitor",
        )
        .unwrap();
    admin.batch_execute("SELECT raft_set('k', 'before')").unwrap();

    // No grants: 42501 from every function, and nothing changed.
    let mut nobody = as_role(&c, "nobody");
    for call in CALLS {
        assert_eq!(code(&mut nobody, call).as_deref(), Some("42501"), "nobody: {call}");
    }
    let ttl = "SELECT * FROM raft_lease_ttl(1)";
    assert_eq!(code(&mut nobody, ttl).as_deref(), Some("42501"), "nobody: {ttl}");
    // A reader reads (linearizably too) and sees the status, but no peer address.
    let mut reader = as_role(&c, "reader");
    let v: Option<String> = reader.query_one("SELECT raft_get('k')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("before"));
    assert_eq!(reader.query("SELECT * FROM raft_scan('')", &[]).unwrap().len(), 1);
    let r = reader.query_one("SELECT node_id, role, listen_addr, peers FROM raft_status()", &[]).unwrap();
    assert_eq!(r.get::<_, Option<i64>>(0), Some(1));
    assert!(r.get::<_, Option<String>>(1).is_some());
    assert_eq!(r.get::<_, Option<String>>(2), None, "a reader must not see addresses");
    assert_eq!(r.get::<_, Option<String>>(3), None);
    for call in &CALLS[..READER_CALLS] {
        reader.batch_execute(call).unwrap_or_else(|e| panic!("reader: {call}: {e}"));
    }
    assert_eq!(code(&mut reader, ttl).as_deref(), Some("42704"), "reader: {ttl} runs (no such lease)");
    for call in &CALLS[READER_CALLS..] {
        assert_eq!(code(&mut reader, call).as_deref(), Some("42501"), "reader: {call}");
    }
    // A writer writes, but cannot change the membership or see it.
    let mut writer = as_role(&c, "writer");
    writer
        .batch_execute(
            "SELECT raft_set('k', 'written'); SELECT raft_cas('k', 'written', 'cas'); SELECT raft_delete('gone'); \
             SELECT * FROM raft_txn('[{\"key\": \"k\", \"target\": \"value\", \"op\": \"=\", \"value\": \"cas\"}]', '[]'); \
             SELECT raft_unlock('lock', l) FROM (SELECT raft_lease_grant('10s') AS l) g WHERE raft_lock('lock', l) > 0",
        )
        .unwrap();
    for call in [
        "SELECT * FROM raft_members()",
        "SELECT raft_join(9, '127.0.0.1:1')",
        "SELECT raft_remove(2)",
        "SELECT raft_transfer_leader(2)",
        "SELECT raft_compact(1)",
        "SELECT * FROM raft_backup()",
        "SELECT raft_restore()",
        "SELECT raft_force_new_cluster()",
    ] {
        assert_eq!(code(&mut writer, call).as_deref(), Some("42501"), "writer: {call}");
    }
    assert_eq!(code(&mut writer, "INSERT INTO raft_kv.restore VALUES (0, '')").as_deref(), Some("42501"));
    assert_eq!(code(&mut writer, "DELETE FROM raft_kv.kv").as_deref(), Some("42501"));
    // The admin sees members and addresses; so does pg_monitor.
    let mut operator = as_role(&c, "operator");
    assert_eq!(operator.query("SELECT * FROM raft_members()", &[]).unwrap().len(), 3);
    operator.batch_execute("SELECT raft_compact(1)").unwrap();
    assert!(operator.query("SELECT * FROM raft_backup()", &[]).unwrap().len() >= 3, "an admin takes backups");
    // Restoring and forcing a new cluster are a superuser's alone.
    for call in ["SELECT raft_restore()", "SELECT raft_force_new_cluster()"] {
        assert_eq!(code(&mut operator, call).as_deref(), Some("42501"), "operator: {call}");
    }
    assert_eq!(code(&mut operator, "INSERT INTO raft_kv.restore VALUES (0, '')").as_deref(), Some("42501"));
    let peers: Option<String> = operator.query_one("SELECT peers FROM raft_status()", &[]).unwrap().get(0);
    assert_eq!(peers.map(|p| p.split(',').count()), Some(3));
    let mut monitor = as_role(&c, "monitor");
    let addr: Option<String> = monitor.query_one("SELECT listen_addr FROM raft_status()", &[]).unwrap().get(0);
    assert_eq!(addr, Some(c.node(1).raft_addr()));
    assert_eq!(monitor.query("SELECT * FROM raft_members()", &[]).unwrap().len(), 3);
    assert_eq!(code(&mut monitor, "SELECT raft_set('k', 'v')").as_deref(), Some("42501"));
    let v: Option<String> = admin.query_one("SELECT raft_get('k')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("cas"));
}

#[test]
fn a_search_path_hijack_does_not_make_a_role_superuser() {
    let c = Cluster::start(3);
    leader_ready(&c);
    let mut su = c.client(1);
    // mallory owns a schema, may create objects in public (as before PostgreSQL 15), and may
    // call every data function.
    su.batch_execute(
        "CREATE ROLE mallory IN ROLE raft_kv_writer; CREATE SCHEMA evil AUTHORIZATION mallory; \
         GRANT CREATE ON SCHEMA public TO mallory",
    )
    .unwrap();
    let mut m = as_role(&c, "mallory");
    // Functions and operators that grant mallory superuser when a superuser runs them.
    let trap = |schema: &str| {
        format!(
            "CREATE FUNCTION {schema}.trap(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$ \
             BEGIN BEGIN ALTER ROLE mallory SUPERUSER; EXCEPTION WHEN OTHERS THEN NULL; END; \
             RETURN a OPERATOR(pg_catalog.=) b; END $$; \
             CREATE FUNCTION {schema}.trap8(a bigint, b bigint) RETURNS boolean LANGUAGE plpgsql AS $$ \
             BEGIN BEGIN ALTER ROLE mallory SUPERUSER; EXCEPTION WHEN OTHERS THEN NULL; END; \
             RETURN a OPERATOR(pg_catalog.=) b; END $$; \
             CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.trap); \
             CREATE OPERATOR {schema}.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = {schema}.trap8); \
             CREATE FUNCTION {schema}.starts_with(a text, b text) RETURNS boolean LANGUAGE sql \
             AS $$ SELECT {schema}.trap(a, a) $$; \
             CREATE DOMAIN {schema}.text AS pg_catalog.text CHECK ({schema}.trap(VALUE, VALUE));"
        )
    };
    m.batch_execute(&trap("evil")).unwrap();
    m.batch_execute(&trap("public")).unwrap();
    // Roles are per server: the same trap in public on the other nodes, for their workers.
    for i in 2..=3 {
        let mut su = c.client(i);
        su.batch_execute("CREATE ROLE mallory; GRANT CREATE ON SCHEMA public TO mallory; SET ROLE mallory").unwrap();
        su.batch_execute(&trap("public")).unwrap();
    }
    let is_super = |su: &mut Client| -> bool {
        su.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'", &[]).unwrap().get(0)
    };
    // The trap works: a superuser whose search_path puts evil first is caught by it.
    su.batch_execute("SET search_path = evil, pg_catalog; SELECT 'a'::text = 'a'::text; RESET search_path").unwrap();
    assert!(is_super(&mut su), "the trap must work, or this test proves nothing");
    su.batch_execute("ALTER ROLE mallory NOSUPERUSER").unwrap();

    m.batch_execute("SET search_path = evil, public, pg_catalog").unwrap();
    let calls = [
        "SELECT raft_get('x')",
        "SELECT raft_get('x', 'local')",
        "SELECT * FROM raft_scan('x')",
        "SELECT * FROM raft_scan('', 'local')",
        "SELECT raft_set('x', 'v')",
        "SELECT raft_set('x', 'v', request_id => 'r1')",
        "SELECT raft_cas('x', 'v', 'w')",
        "SELECT raft_delete('x')",
        "SELECT * FROM raft_cas_rev('x', NULL, 'v')",
        "SELECT * FROM raft_delete_rev('x')",
        "SELECT * FROM raft_status()",
        "SELECT * FROM raft_get_kv('x')",
        "SELECT raft_get('x', 'local', 1)",
        "SELECT * FROM raft_scan('', 'local', 1)",
        "SELECT * FROM raft_changes(1, 'x')",
        "SELECT * FROM raft_watch('x', 1, '0 seconds')",
        "SELECT * FROM raft_txn('[{\"prefix\": \"x\", \"target\": \"version\", \"op\": \">\", \"value\": 0}]', \
         '[{\"op\": \"get\", \"prefix\": \"x\"}, {\"op\": \"delete\", \"prefix\": \"y\"}]')",
    ];
    for call in calls {
        m.batch_execute(call).unwrap_or_else(|e| panic!("{call}: {e}"));
        assert!(!is_super(&mut su), "{call} made mallory superuser");
    }
    // A superuser whose search_path lets mallory's objects in: whatever runs inside the
    // functions runs as the superuser, so a name resolved through search_path would trip the
    // trap (raft_get and the writes do not pin their search_path; the others do).
    let mut su2 = c.client(1);
    su2.batch_execute("SET search_path = evil, public, pg_catalog").unwrap();
    for call in calls {
        // A request id belongs to the role that used it first.
        let call = call.replace("'r1'", "'r2'");
        su2.batch_execute(&call).unwrap_or_else(|e| panic!("{call} as superuser: {e}"));
        assert!(!is_super(&mut su), "{call}, called by a superuser, made mallory superuser");
    }
    // The workers' own SQL (applying, on every node) ran meanwhile: still not superuser, and
    // the writes applied everywhere.
    c.assert_converged(&[1, 2, 3]);
    assert!(!is_super(&mut su));
    for i in 2..=3 {
        let s: bool =
            c.client(i).query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'", &[]).unwrap().get(0);
        assert!(!s, "node {i}");
    }
}

#[test]
fn a_request_id_belongs_to_its_role_and_its_command() {
    let c = Cluster::start(3);
    leader_ready(&c);
    c.client(1)
        .batch_execute("CREATE ROLE alice IN ROLE raft_kv_writer; CREATE ROLE bob IN ROLE raft_kv_writer")
        .unwrap();
    let mut alice = as_role(&c, "alice");
    let mut bob = as_role(&c, "bob");
    let set = |cl: &mut Client, v: &str| -> i64 {
        cl.query_one("SELECT raft_set('shared', $1, request_id => 'same-id')", &[&v]).unwrap().get(0)
    };
    let first = set(&mut alice, "alice");
    // Alice's retry is deduplicated: the same revision, no second write.
    assert_eq!(set(&mut alice, "alice"), first);
    // Bob's call with the same id is his own request: it writes, and learns nothing of Alice's.
    let bobs = set(&mut bob, "bob");
    assert!(bobs > first, "bob got alice's result ({bobs} vs {first})");
    let v: Option<String> = bob.query_one("SELECT raft_get('shared')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("bob"));
    // The same id with another command is another request too.
    let again = set(&mut alice, "alice-2");
    assert!(again > bobs);
    let v: Option<String> = alice.query_one("SELECT raft_get('shared')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("alice-2"));
    // And Alice's first command, retried, still is the first (it is remembered, not redone).
    assert_eq!(set(&mut alice, "alice"), first);
    let v: Option<String> = alice.query_one("SELECT raft_get('shared')", &[]).unwrap().get(0);
    assert_eq!(v.as_deref(), Some("alice-2"));
}

#[test]
fn many_sessions_never_run_out_of_request_slots() {
    let c = Cluster::builder(3).conf("max_connections = 200").start();
    leader_ready(&c);
    // 150 sessions write at once on one node: each has its own slot; none fails.
    let errors = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..150 {
            let (c, errors) = (&c, &errors);
            s.spawn(move || {
                let mut cl = c.client(2);
                for i in 0..3 {
                    if cl.query_one("SELECT raft_set($1, 'v')", &[&format!("s{t}/{i}")]).is_err() {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(errors.into_inner(), 0);
    let n: i64 = c.client(2).query_one("SELECT count(*) FROM raft_scan('s')", &[]).unwrap().get(0);
    assert_eq!(n, 450);
    // apply_timeout is capped, so no session can hold its slot for an hour.
    let err = c.client(1).batch_execute("SET raft_kv.apply_timeout = '1h'").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "22023", "{err}");
}

/// raft_get reads a key through the primary-key index without the executor where the caller
/// may read the table plainly. Whatever path it takes, it reads what a SELECT by that role
/// would: a fresh value after a write elsewhere, whole values stored out of line, nothing where
/// the role may not read the table, and only the rows row-level security lets it see.
#[test]
fn a_read_sees_what_a_select_by_its_role_would() {
    let c = Cluster::start(3);
    let (leader, _) = c.wait_leader(&[1, 2, 3], Duration::from_secs(20));
    let follower = if leader == 1 { 2 } else { 1 };
    let mut su = c.client(leader);
    for i in 1..=3 {
        c.client(i)
            .batch_execute(
                "CREATE ROLE reader IN ROLE raft_kv_reader; CREATE ROLE caller; \
                 GRANT EXECUTE ON FUNCTION raft_get(text, text, bigint) TO caller; \
                 CREATE ROLE columns; GRANT EXECUTE ON FUNCTION raft_get(text, text, bigint) TO columns; \
                 GRANT USAGE ON SCHEMA raft_kv TO columns; GRANT SELECT (key, value) ON raft_kv.kv TO columns",
            )
            .unwrap();
    }
    // Linearizable reads on a follower see each write made on the leader just before, values
    // of 300,000 bytes (stored compressed, out of line) included.
    let mut reader = c.client(follower);
    reader.batch_execute("SET ROLE reader").unwrap();
    for i in 0..20 {
        let v = if i % 2 == 0 { format!("v{i}") } else { format!("{i}-").repeat(150_000)[..300_000].to_string() };
        su.query_one("SELECT raft_set('k', $1)", &[&v]).unwrap();
        let got: Option<String> = reader.query_one("SELECT raft_get('k')", &[]).unwrap().get(0);
        assert_eq!(got.as_deref().map(str::len), Some(v.len()), "write {i}");
        assert!(got.as_deref() == Some(v.as_str()), "write {i}: another value");
    }
    let last: Option<String> = reader.query_one("SELECT raft_get('k', 'local')", &[]).unwrap().get(0);
    assert_eq!(last.map(|s| s.len()), Some(300_000));
    let none: Option<String> = reader.query_one("SELECT raft_get('no such key')", &[]).unwrap().get(0);
    assert_eq!(none, None);
    // May call raft_get but not read the table: refused as a SELECT of it would be.
    let mut caller = c.client(follower);
    caller.batch_execute("SET ROLE caller").unwrap();
    for consistency in ["linearizable", "local"] {
        let sql = format!("SELECT raft_get('k', '{consistency}')");
        assert_eq!(code(&mut caller, &sql).as_deref(), Some("42501"), "{sql}");
    }
    // May read the two columns a read needs, not the whole table: the value, as a SELECT.
    let mut columns = c.client(follower);
    columns.batch_execute("SET ROLE columns").unwrap();
    let got: Option<String> = columns.query_one("SELECT raft_get('k')", &[]).unwrap().get(0);
    assert_eq!(got.map(|s| s.len()), Some(300_000));
    // Row-level security: the reader sees the rows its policy shows, the workers still apply.
    su.batch_execute("SELECT raft_set('pub/a', 'open'); SELECT raft_set('secret', 'hidden')").unwrap();
    for i in 1..=3 {
        c.client(i)
            .batch_execute(
                "ALTER TABLE raft_kv.kv ENABLE ROW LEVEL SECURITY; \
                 CREATE POLICY public_keys ON raft_kv.kv FOR SELECT TO reader USING (key LIKE 'pub/%')",
            )
            .unwrap();
    }
    su.batch_execute("SELECT raft_set('pub/b', 'also open'); SELECT raft_set('secret', 'still hidden')").unwrap();
    for consistency in ["linearizable", "local"] {
        let get = |c: &mut Client, k: &str| -> Option<String> {
            c.query_one("SELECT raft_get($1, $2)", &[&k, &consistency]).unwrap().get(0)
        };
        assert_eq!(get(&mut reader, "secret"), None, "{consistency}: a row its policy hides");
        assert_eq!(get(&mut reader, "pub/a").as_deref(), Some("open"), "{consistency}");
        assert_eq!(get(&mut reader, "pub/b").as_deref(), Some("also open"), "{consistency}");
        let mut su_f = c.client(follower);
        assert_eq!(get(&mut su_f, "secret").as_deref(), Some("still hidden"), "{consistency}: a superuser");
    }
}
