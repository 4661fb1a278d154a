//! Tests that run inside PostgreSQL (`cargo pgrx test`): the SQL functions on a one-node
//! server, and the storage against the memory model (`raft_kv_core::contract`) in scratch
//! schemas. Built only for tests: none of this is in the installed library.

use pgrx::prelude::*;

// pgrx's test runner calls each test as a function in the SQL schema `tests`.
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn status_reports_this_node() {
        let id = Spi::get_one::<i64>("SELECT node_id FROM raft_status()").unwrap();
        assert_eq!(id, Some(1));
    }

    /// A scratch copy of the extension's tables, without the guard triggers.
    fn scratch_schema() {
        Spi::run(
            "CREATE SCHEMA contract;
             CREATE TABLE contract.log (LIKE raft_kv.log INCLUDING ALL);
             CREATE TABLE contract.state (LIKE raft_kv.state INCLUDING ALL);
             INSERT INTO contract.state (id) VALUES (1);
             CREATE TABLE contract.kv (LIKE raft_kv.kv INCLUDING ALL);
             CREATE TABLE contract.requests (LIKE raft_kv.requests INCLUDING ALL);
             CREATE TABLE contract.members (LIKE raft_kv.members INCLUDING ALL);
             CREATE TABLE contract.snapshot_kv (LIKE raft_kv.snapshot_kv INCLUDING ALL);
             CREATE TABLE contract.snapshot_requests (LIKE raft_kv.snapshot_requests INCLUDING ALL);
             CREATE TABLE contract.changes (LIKE raft_kv.changes INCLUDING ALL);
             CREATE TABLE contract.leases (LIKE raft_kv.leases INCLUDING ALL);
             CREATE TABLE contract.snapshot_changes (LIKE raft_kv.snapshot_changes INCLUDING ALL);
             CREATE TABLE contract.incoming_kv (LIKE raft_kv.incoming_kv INCLUDING ALL);
             CREATE TABLE contract.incoming_requests (LIKE raft_kv.incoming_requests INCLUDING ALL);
             CREATE TABLE contract.incoming_changes (LIKE raft_kv.incoming_changes INCLUDING ALL);",
        )
        .unwrap();
    }

    #[pg_test]
    fn table_backend_meets_the_storage_contract() {
        scratch_schema();
        raft_kv_core::contract::check(crate::storage::PgBackend::new("contract"), 64 << 20);
    }

    #[pg_test]
    fn table_backend_snapshot_store() {
        scratch_schema();
        let oid = |t: &str| Spi::get_one::<pg_sys::Oid>(&format!("SELECT 'contract.{t}'::regclass::oid")).unwrap();
        let indexes = |t: &str| {
            Spi::get_one::<String>(&format!(
                "SELECT string_agg(indexrelid::regclass::text, ' ' ORDER BY 1) FROM pg_index \
                 WHERE indrelid = 'contract.{t}'::regclass"
            ))
            .unwrap()
        };
        let before = (oid("kv"), oid("incoming_kv"), indexes("kv"), indexes("incoming_kv"));
        raft_kv_core::contract::check_snapshot_store(crate::storage::PgBackend::new("contract"));
        // Installed by swapping: the table the rows were staged in is now kv, under kv's index
        // names, and the old kv is the (empty) incoming table.
        assert_eq!((oid("kv"), oid("incoming_kv")), (before.1, before.0));
        assert_eq!((indexes("kv"), indexes("incoming_kv")), (before.2, before.3));
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM contract.incoming_kv").unwrap(), Some(0));
    }

    #[pg_test]
    fn table_backend_cold_reads() {
        scratch_schema();
        raft_kv_core::contract::check(crate::storage::PgBackend::new("contract"), 1);
    }

    #[pg_test]
    fn table_backend_replays_like_memory() {
        use raft_kv_core::{contract, mem_backend::MemBackend};
        scratch_schema();
        let log = contract::sample_log(60);
        let mut mem = MemBackend::new();
        let expected = contract::apply_log(&mut mem, &log, 60);
        let mut pg = crate::storage::PgBackend::new("contract");
        assert_eq!(contract::apply_log(&mut pg, &log, 7), expected);
        let rows: Vec<(String, String, i64, i64, i64)> = Spi::connect(|c| {
            c.select(
                "SELECT key, value, mod_revision, create_revision, version FROM contract.kv ORDER BY key",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                let g = |i| r.get::<i64>(i).unwrap().unwrap();
                (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap(), g(3), g(4), g(5))
            })
            .collect()
        });
        let m = mem.inner.lock().unwrap().clone();
        let want: Vec<(String, String, i64, i64, i64)> =
            m.kv.iter()
                .map(|(k, r)| {
                    (k.clone(), r.value.clone(), r.mod_revision as i64, r.create_revision as i64, r.version as i64)
                })
                .collect();
        assert_eq!(rows, want);
        // The history and the revisions, too.
        let want = model_history(&m);
        assert!(!want.is_empty());
        assert_eq!(table_history(), want);
        let revs = Spi::get_two::<i64, i64>("SELECT revision, compact_revision FROM contract.state").unwrap();
        assert_eq!(revs, (Some(m.revision as i64), Some(m.compact_revision as i64)));
        assert!(m.compact_revision > 0);
        // The remembered request ids, row by row, too.
        let rows: Vec<(i64, i64, i64, i64, bool)> = Spi::connect(|c| {
            c.select("SELECT nonce, seq, node, revision, flag FROM contract.requests ORDER BY nonce, seq", None, &[])
                .unwrap()
                .map(|r| {
                    let g = |i| r.get::<i64>(i).unwrap().unwrap();
                    (g(1), g(2), g(3), g(4), r.get::<bool>(5).unwrap().unwrap())
                })
                .collect()
        });
        let want: Vec<(i64, i64, i64, i64, bool)> = mem
            .inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(&(n, s), &(node, rev, flag))| (n as i64, s as i64, node as i64, rev as i64, flag))
            .collect();
        assert_eq!(rows, want);
        let applied = Spi::get_one::<i64>("SELECT applied_index FROM contract.state").unwrap();
        assert_eq!(applied, Some(60));
    }

    /// A compaction applied in the same batch as changes below its point removes those too:
    /// the history table holds exactly what the memory model's does, row for row.
    #[pg_test]
    fn a_compaction_removes_its_own_batch_s_changes_below_its_point() {
        use raft_kv_core::{contract, mem_backend::MemBackend};
        scratch_schema();
        let log = compactions_log();
        let mut mem = MemBackend::new();
        let expected = contract::apply_log(&mut mem, &log, 5);
        let mut pg = crate::storage::PgBackend::new("contract");
        assert_eq!(contract::apply_log(&mut pg, &log, 5), expected);
        let rows = table_history();
        assert_eq!(rows, model_history(&mem.inner.lock().unwrap()));
        // Revision r is entry r's put up to 4, then entry r + 1 up to 5, then r + 2.
        assert_eq!(rows, "5 a put a@6 a@3 1 3 3;6 c put c@8  6 1 ;7 a put a@9 a@6 1 4 5;8 b put b@10 b@4 2 3 4");
    }

    /// History rows left below the compaction point (by builds before 718b4a7, which compacted
    /// before writing a batch's own changes) go with the first compaction after a start.
    #[pg_test]
    fn the_first_compaction_after_a_start_removes_history_left_below_the_point() {
        use raft_kv_core::{contract, mem_backend::MemBackend};
        scratch_schema();
        let log = compactions_log();
        let mut mem = MemBackend::new();
        let expected = contract::apply_log(&mut mem, &log, 5);
        let mut pg = crate::storage::PgBackend::new("contract");
        let mut got = contract::apply_log(&mut pg, &log[..5], 5);
        // What the old order left behind: revisions 1 and 2, below point 3.
        Spi::run(
            "INSERT INTO contract.changes (revision, key, kind, value, create_revision, version) \
             VALUES (1, 'a', 'put', 'a@1', 1, 1), (2, 'b', 'put', 'b@2', 2, 1)",
        )
        .unwrap();
        // The worker starts again (and loads its state): its first compaction (to 5) sweeps
        // from revision 0.
        let mut pg = crate::storage::PgBackend::new("contract");
        raft_kv_core::storage::Backend::load(&mut pg).unwrap();
        got.extend(contract::apply_log(&mut pg, &log[5..], 5));
        assert_eq!(got, expected);
        assert_eq!(table_history(), model_history(&mem.inner.lock().unwrap()));
    }

    /// Batches of five: a b a b compact(3) | a compact(5) c a b.
    fn compactions_log() -> Vec<raft_kv_core::eraftpb::Entry> {
        use raft_kv_core::command::Command;
        let cmds = ["a", "b", "a", "b", "", "a", "", "c", "a", "b"];
        (1..)
            .zip(cmds)
            .map(|(index, k)| {
                let cmd = match (k, index) {
                    ("", 5) => Command::Compact { revision: 3 },
                    ("", _) => Command::Compact { revision: 5 },
                    (k, _) => Command::Put { key: k.into(), value: format!("{k}@{index}") },
                };
                proposal(index, index, cmd)
            })
            .collect()
    }

    /// `contract.changes`, row by row, as [`model_history`] writes the memory model's.
    fn table_history() -> String {
        Spi::get_one::<String>(
            "SELECT string_agg(format('%s %s %s %s %s %s %s %s', revision, key, kind, value, prev_value, \
                    create_revision, version, prev_mod_revision), ';' ORDER BY revision, key) FROM contract.changes",
        )
        .unwrap()
        .unwrap_or_default()
    }

    fn model_history(m: &raft_kv_core::mem_backend::MemState) -> String {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        m.changes
            .values()
            .map(|c| {
                format!(
                    "{} {} {} {} {} {} {} {}",
                    c.revision,
                    c.key,
                    c.kind.as_str(),
                    opt(&c.value),
                    opt(&c.prev_value),
                    c.create_revision,
                    c.version,
                    c.prev_mod_revision.map(|r| r.to_string()).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// A log entry at `index` (term 1) proposing `cmd` as request `seq` of one client.
    fn proposal(index: u64, seq: u64, cmd: raft_kv_core::command::Command) -> raft_kv_core::eraftpb::Entry {
        use raft_kv_core::command::{Proposal, RequestId};
        let mut e = raft_kv_core::eraftpb::Entry::default();
        (e.index, e.term) = (index, 1);
        e.data = Proposal { id: RequestId { node: 2, nonce: 9, seq }, cmd }.encode().into();
        e
    }

    #[pg_test]
    fn table_backend_applies_a_retried_request_once() {
        use raft_kv_core::command::Command;
        use raft_kv_core::contract;
        scratch_schema();
        let entry =
            |index, seq, value: &str| proposal(index, seq, Command::Put { key: "k".into(), value: value.into() });
        let mut pg = crate::storage::PgBackend::new("contract");
        let res =
            contract::apply_log(&mut pg, &[entry(1, 42, "first"), entry(2, 43, "second"), entry(3, 42, "first")], 2);
        assert!(!res[0].duplicate && !res[1].duplicate);
        assert!(res[2].duplicate);
        assert_eq!(res[2].revision, 1);
        let row = Spi::get_two::<String, i64>("SELECT value, mod_revision FROM contract.kv WHERE key = 'k'").unwrap();
        assert_eq!(row, (Some("second".to_string()), Some(2)));
    }

    /// The worker keeps its plans, generic ones (it runs with plan_cache_mode =
    /// force_generic_plan), made without knowing the parameters. None of them may scan a
    /// large table: a delete below a point written one-sided (`revision < $1`) was planned as a
    /// scan of all of `requests` or `changes`, on every prune and every compaction. The rows are
    /// stored out of order, as deletes and reused space leave them on a node that has run a while.
    #[pg_test]
    fn kept_statements_never_scan_a_large_table() {
        scratch_schema();
        Spi::run(
            "INSERT INTO contract.log SELECT g, 1, 0, '\\x00', '\\x' FROM generate_series(1, 50000) g ORDER BY random();
             INSERT INTO contract.kv SELECT 'k' || g, repeat('v', 100), g, g, 1, 0 FROM generate_series(1, 50000) g
               ORDER BY random();
             INSERT INTO contract.requests SELECT g, g, 1, g, true FROM generate_series(1, 50000) g ORDER BY random();
             INSERT INTO contract.changes SELECT g, 'k' || g, 'put', repeat('v', 100), NULL, g, 1, NULL
               FROM generate_series(1, 50000) g ORDER BY random();
             ANALYZE contract.log, contract.kv, contract.requests, contract.changes;
             SET LOCAL plan_cache_mode = force_generic_plan",
        )
        .unwrap();
        for (i, (sql, types)) in crate::storage::KEPT_PROBES.iter().enumerate() {
            let sql = sql.replace("raft_kv.", "contract.");
            let types: Vec<String> = types
                .iter()
                .map(|t| {
                    Spi::get_one::<String>(&format!("SELECT format_type({}, NULL)", t.value().to_u32()))
                        .unwrap()
                        .unwrap()
                })
                .collect();
            let nulls = vec!["NULL"; types.len()].join(", ");
            let types = types.join(", ");
            Spi::run(&format!("PREPARE kept{i} ({types}) AS {sql}")).unwrap();
            let plan: Vec<String> = Spi::connect(|c| {
                c.select(&format!("EXPLAIN EXECUTE kept{i} ({nulls})"), None, &[])
                    .unwrap()
                    .map(|r| r.get::<String>(1).unwrap().unwrap())
                    .collect()
            });
            for table in ["log", "kv", "requests", "changes"] {
                let scan = format!("Seq Scan on {table} ");
                assert!(!plan.iter().any(|l| l.contains(&scan)), "{sql}\n{}", plan.join("\n"));
            }
        }
    }

    /// The prunes and compactions start where the previous ones stopped (storage.rs,
    /// `Cleared`); none leaves a row below its point, and each keeps every row above it.
    #[pg_test]
    fn bounded_deletes_leave_nothing_below_their_points() {
        use raft_kv_core::apply::Effects;
        use raft_kv_core::eraftpb::Entry;
        use raft_kv_core::storage::{Backend, WriteBatch};
        scratch_schema();
        let mut pg = crate::storage::PgBackend::new("contract");
        pg.load().unwrap();
        let count = |sql: &str| Spi::get_one::<i64>(sql).unwrap().unwrap();
        let entries = |lo: u64, hi: u64| -> Vec<Entry> {
            (lo..=hi)
                .map(|i| {
                    let mut e = Entry::default();
                    (e.index, e.term) = (i, 1);
                    e
                })
                .collect()
        };
        let ids = |lo: u64, hi: u64| {
            let mut fx = Effects::default();
            fx.requests = (lo..=hi).map(|r| ((7, r), (1, r, true))).collect();
            fx
        };
        // As the worker writes: each batch in atomically, whose end is the commit there.
        let write = |pg: &mut crate::storage::PgBackend, b: WriteBatch, fx: Effects| {
            pg.atomically(&mut |pg| pg.write(&b, &fx)).unwrap();
        };
        write(&mut pg, WriteBatch { entries: entries(1, 40), ..Default::default() }, ids(1, 40));
        for (cut, compact) in [(10, 12), (25, 30), (26, 31)] {
            let mut fx = ids(41 + cut, 41 + cut);
            fx.prune_requests_below = Some(cut);
            write(&mut pg, WriteBatch { compact_to: Some((compact, 1)), ..Default::default() }, fx);
            let below = format!("SELECT count(*) FROM contract.requests WHERE revision < {cut}");
            assert_eq!(count(&below), 0, "request ids below {cut}");
            let above = format!("SELECT count(*) FROM contract.requests WHERE revision BETWEEN {cut} AND 40");
            assert_eq!(count(&above), 41 - cut as i64);
            assert_eq!(count(&format!("SELECT count(*) FROM contract.log WHERE idx <= {compact}")), 0);
            assert_eq!(count("SELECT count(*) FROM contract.log"), 40 - compact as i64);
        }
        // A new start reads the log's point from the state row and forgets the request ids'.
        let mut pg = crate::storage::PgBackend::new("contract");
        pg.load().unwrap();
        let mut fx = ids(5, 5);
        fx.prune_requests_below = Some(30);
        write(&mut pg, WriteBatch { compact_to: Some((35, 1)), ..Default::default() }, fx);
        assert_eq!(count("SELECT count(*) FROM contract.requests WHERE revision < 30"), 0);
        assert_eq!(count("SELECT min(idx) FROM contract.log"), 36);
    }

    /// A key the batch's look-up did not probe is looked for by the write itself: an existing
    /// row is replaced, not inserted again.
    #[pg_test]
    fn a_put_the_look_up_did_not_probe_replaces_the_row() {
        use raft_kv_core::apply::Effects;
        use raft_kv_core::storage::{Backend, WriteBatch};
        use raft_kv_core::types::KvRow;
        scratch_schema();
        let mut pg = crate::storage::PgBackend::new("contract");
        for (value, rev) in [("one", 1), ("two", 2)] {
            let mut fx = Effects::default();
            let row = KvRow { value: value.into(), mod_revision: rev, create_revision: 1, version: rev, lease: 0 };
            fx.kv.insert("k".into(), Some(row));
            pg.atomically(&mut |pg| pg.write(&WriteBatch::default(), &fx)).unwrap();
        }
        let got = Spi::get_one::<String>("SELECT string_agg(value || '@' || mod_revision, ',') FROM contract.kv");
        assert_eq!(got.unwrap().as_deref(), Some("two@2"));
    }

    /// A table shaped like raft_kv's: a text primary key, a partial index and a CHECK.
    fn writer_table() {
        Spi::run(
            "CREATE SCHEMA w;
             CREATE TABLE w.t (k text COLLATE \"C\" PRIMARY KEY, v text, n bigint NOT NULL CHECK (n >= 0),
                               lease bigint NOT NULL DEFAULT 0, b bytea NOT NULL);
             CREATE INDEX t_lease ON w.t (lease) WHERE lease <> 0;
             ALTER TABLE w.t ALTER COLUMN v SET COMPRESSION pglz;",
        )
        .unwrap();
    }

    fn writer(all: bool, columns: &[&std::ffi::CStr]) -> crate::heap_write::Writer {
        // SAFETY: in the test's transaction; the caller closes it.
        unsafe { crate::heap_write::Writer::open(c"w", c"t", columns, all) }.expect("w.t opens")
    }

    fn probe_t() -> crate::index_probe::Probe {
        let relid = crate::index_probe::relid(c"w", c"t").unwrap();
        // SAFETY: as above.
        unsafe { crate::index_probe::Probe::open(relid, 1, crate::index_probe::Snap::AfterOwnWrites) }.unwrap()
    }

    /// Rows written by the row writer are found through every index (a missed index entry
    /// would hide a row from the index scans below), updates keep what they do not set, a
    /// large value is stored out of line, and the writes are counted for autovacuum.
    #[pg_test]
    fn row_writer_inserts_and_updates_through_every_index() {
        use crate::heap_write::Value;
        use crate::index_probe::Key;
        writer_table();
        let all = [c"k", c"v", c"n", c"lease", c"b"];
        let big = "x".repeat(300_000);
        let mut w = writer(true, &all);
        for (k, v, lease) in [("a", "1", 0), ("b", big.as_str(), 7), ("c", "3", 0)] {
            w.insert(&[Value::Text(k), Value::Text(v), Value::Int8(1), Value::Int8(lease), Value::Bytes(b"\x00\x01")]);
        }
        w.close();
        // An update of every column, then one that sets only n, keeping the rest.
        let mut w = writer(true, &all);
        let mut p = probe_t();
        assert!(p.find(&[Key::Text("a")]));
        w.update(&p, &[Value::Text("a"), Value::Null, Value::Int8(2), Value::Int8(9), Value::Bytes(b"")]);
        p.close();
        w.close();
        let mut w = writer(false, &[c"n"]);
        let mut p = probe_t();
        assert!(p.find(&[Key::Text("c")]));
        w.update(&p, &[Value::Int8(5)]);
        assert!(p.find(&[Key::Text("b")]));
        w.update(&p, &[Value::Keep]);
        p.close();
        w.close();

        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        let rows = |sql: &str| -> Vec<String> {
            Spi::connect(|c| {
                c.select(sql, None, &[])
                    .unwrap()
                    .map(|r| r.get::<String>(1).unwrap().unwrap_or_default())
                    .collect::<Vec<_>>()
            })
        };
        let by_key = "SELECT k || ':' || coalesce(v, 'NULL') || ':' || n || ':' || lease || ':' || encode(b, 'hex') \
                      FROM w.t WHERE k IN ('a', 'b', 'c') AND length(coalesce(v, '')) < 10 ORDER BY k";
        assert_eq!(rows(by_key), ["a:NULL:2:9:", "c:3:5:0:0001"]);
        assert_eq!(rows("SELECT k FROM w.t WHERE lease <> 0 AND lease > 0 ORDER BY k"), ["a", "b"]);
        assert_eq!(
            Spi::get_one::<i64>("SELECT length(v) FROM w.t WHERE k = 'b' AND n = 1 AND lease = 7").unwrap(),
            Some(300_000)
        );
        let plan = rows("EXPLAIN (COSTS OFF) SELECT k FROM w.t WHERE lease <> 0 AND lease > 0");
        assert!(plan.iter().any(|l| l.contains("t_lease")), "{plan:?}");
        assert!(Spi::get_one::<bool>("SELECT pg_column_size(v) < 100000 FROM w.t WHERE k = 'b'").unwrap().unwrap());
        let counts = Spi::get_one::<String>(
            "SELECT n_tup_ins || '/' || n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'w.t'::regclass",
        )
        .unwrap();
        assert_eq!(counts.as_deref(), Some("3/3"));
    }

    /// Rows added are inserted together at the flush (or the close), each found through every
    /// index, a large one stored out of line, after rows inserted one by one; the writer's
    /// slots are reused across flushes.
    #[pg_test]
    fn row_writer_inserts_added_rows_together() {
        use crate::heap_write::Value;
        use crate::index_probe::Key;
        writer_table();
        let all = [c"k", c"v", c"n", c"lease", c"b"];
        let big = "y".repeat(300_000);
        let mut w = writer(true, &all);
        w.insert(&[Value::Text("a0"), Value::Text("0"), Value::Int8(0), Value::Int8(0), Value::Bytes(b"")]);
        let keys: Vec<String> = (1..=40).map(|i| format!("a{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            let v = if i == 7 { big.as_str() } else { "v" };
            w.add(&[
                Value::Text(k),
                Value::Text(v),
                Value::Int8(i as i64),
                Value::Int8(i as i64 % 3),
                Value::Bytes(b"\x02"),
            ]);
            if i == 19 {
                // Nothing added is visible before the flush; everything after it.
                let mut p = probe_t();
                assert!(!p.find(&[Key::Text("a1")]));
                p.close();
                w.flush();
                let mut p = probe_t();
                assert!(p.find(&[Key::Text("a1")]));
                p.close();
            }
        }
        w.close();
        let mut p = probe_t();
        for k in keys.iter().chain([&"a0".to_string()]) {
            assert!(p.find(&[Key::Text(k)]), "{k} not found through the primary key");
        }
        p.close();
        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        let n = |sql: &str| Spi::get_one::<i64>(sql).unwrap().unwrap();
        assert_eq!(n("SELECT count(*) FROM w.t WHERE k >= 'a' AND k < 'b'"), 41);
        // The 26 rows whose index (0 to 39) is not a multiple of 3 have a lease: through the
        // partial index.
        assert_eq!(n("SELECT count(*) FROM w.t WHERE lease <> 0 AND lease > 0"), 26);
        assert_eq!(n("SELECT length(v) FROM w.t WHERE k = 'a8'"), 300_000);
        assert_eq!(n("SELECT n_tup_ins FROM pg_stat_xact_user_tables WHERE relid = 'w.t'::regclass"), 41);
    }

    #[pg_test(error = "new row for relation \"t\" violates check constraint \"t_n_check\"")]
    fn row_writer_checks_constraints_of_added_rows() {
        use crate::heap_write::Value;
        writer_table();
        let mut w = writer(true, &[c"k", c"v", c"n", c"lease", c"b"]);
        w.add(&[Value::Text("a"), Value::Null, Value::Int8(1), Value::Int8(0), Value::Bytes(b"")]);
        w.add(&[Value::Text("b"), Value::Null, Value::Int8(-1), Value::Int8(0), Value::Bytes(b"")]);
    }

    #[pg_test(error = "duplicate key value violates unique constraint \"t_pkey\"")]
    fn row_writer_refuses_a_key_added_twice() {
        use crate::heap_write::Value;
        writer_table();
        let mut w = writer(true, &[c"k", c"v", c"n", c"lease", c"b"]);
        let row = [Value::Text("a"), Value::Null, Value::Int8(1), Value::Int8(0), Value::Bytes(b"")];
        w.add(&row);
        w.add(&row);
        w.close();
    }

    #[pg_test(error = "new row for relation \"t\" violates check constraint \"t_n_check\"")]
    fn row_writer_checks_constraints() {
        use crate::heap_write::Value;
        writer_table();
        let mut w = writer(true, &[c"k", c"v", c"n", c"lease", c"b"]);
        w.insert(&[Value::Text("a"), Value::Null, Value::Int8(-1), Value::Int8(0), Value::Bytes(b"")]);
    }

    #[pg_test(error = "duplicate key value violates unique constraint \"t_pkey\"")]
    fn row_writer_refuses_a_taken_key() {
        use crate::heap_write::Value;
        writer_table();
        let mut w = writer(true, &[c"k", c"v", c"n", c"lease", c"b"]);
        let row = [Value::Text("a"), Value::Null, Value::Int8(1), Value::Int8(0), Value::Bytes(b"")];
        w.insert(&row);
        w.insert(&row);
    }

    /// A writer opened for some columns only updates: an insert would leave the others null.
    #[pg_test(error = "an insert gives every column")]
    fn row_writer_inserts_only_whole_rows() {
        use crate::heap_write::Value;
        writer_table();
        writer(false, &[c"n"]).insert(&[Value::Int8(1)]);
    }

    /// A column the writer does not know of would get no default: the table is refused.
    #[pg_test]
    fn row_writer_refuses_a_table_with_other_columns() {
        writer_table();
        // SAFETY: in the test's transaction.
        let unknown = unsafe { crate::heap_write::Writer::open(c"w", c"t", &[c"k", c"v", c"n", c"lease"], true) };
        assert!(matches!(unknown, Err(crate::heap_write::OpenError::Columns(ref m)) if m.contains("column b")));
        let missing = unsafe { crate::heap_write::Writer::open(c"w", c"t", &[c"k", c"zz"], false) };
        assert!(matches!(missing, Err(crate::heap_write::OpenError::Columns(ref m)) if m.contains("column zz")));
        let absent = unsafe { crate::heap_write::Writer::open(c"w", c"nope", &[c"k"], true) };
        assert!(matches!(absent, Err(crate::heap_write::OpenError::Missing)));
        // A dropped column is left null.
        Spi::run("ALTER TABLE w.t DROP COLUMN b").unwrap();
        let w = writer(true, &[c"k", c"v", c"n", c"lease"]);
        w.close();
    }

    #[pg_test(error = "raft_kv key must not be NULL")]
    fn null_key_is_rejected() {
        Spi::run("SELECT raft_get(NULL)").unwrap();
    }

    #[pg_test(error = "direct INSERT on raft_kv.kv is not allowed")]
    fn direct_insert_is_rejected() {
        Spi::run("INSERT INTO raft_kv.kv VALUES ('k', 'v', 1, 1, 1)").unwrap();
    }
}
