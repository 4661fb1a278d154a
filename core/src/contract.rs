//! The `raft::Storage` contract and state-machine replay, written once and run against
//! any backend (the in-memory one here, the table-backed one in the extension's tests).
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{GetEntriesContext, StorageError};

use crate::apply::Effects;
use crate::command::ApplyResult;
use crate::mem_backend::MemBackend;
use crate::snapshot::{Cursor, Frozen, Row};
use crate::storage::{apply_and_write, Backend, RaftStorage, WriteBatch};
use crate::types::SnapshotData;
use raft::Storage;

pub fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = vec![index as u8; 10].into();
    e
}

/// Puts the backend at snapshot (3, 3) with entries 4..=6 (terms 3, 4, 5) and checks
/// every Storage method, through the cache and through cold reads.
pub fn check<B: Backend>(mut backend: B, max_tail_bytes: usize) {
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 3;
    snap.mut_metadata().term = 3;
    snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    snap.set_data(SnapshotData::default().encode().into());
    let mut hs = HardState::default();
    hs.term = 5;
    hs.vote = 2;
    hs.commit = 5;
    backend
        .write(
            &WriteBatch {
                snapshot: Some(snap),
                entries: vec![entry(4, 3), entry(5, 4), entry(6, 5)],
                hard_state: Some(hs.clone()),
                applied: Some(4),
                cluster_id: Some(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
                ..Default::default()
            },
            &Effects::default(),
        )
        .unwrap();

    let s = RaftStorage::open(backend, max_tail_bytes).unwrap();
    assert_eq!(s.cluster_id(), 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, "the cluster id is durable");
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs);
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(s.first_index().unwrap(), 4);
    assert_eq!(s.last_index().unwrap(), 6);
    assert_eq!(s.term(3).unwrap(), 3);
    assert_eq!(s.term(5).unwrap(), 4);
    assert!(matches!(s.term(2), Err(raft::Error::Store(StorageError::Compacted))));
    assert!(matches!(s.term(7), Err(raft::Error::Store(StorageError::Unavailable))));
    let ctx = GetEntriesContext::empty(false);
    assert!(matches!(s.entries(3, 5, None, ctx), Err(raft::Error::Store(StorageError::Compacted))));
    let ctx = || GetEntriesContext::empty(false);
    let all = s.entries(4, 7, None, ctx()).unwrap();
    assert_eq!(all.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(4, 3), (5, 4), (6, 5)]);
    assert_eq!(all[1].data.as_ref(), &[5u8; 10]);
    // A size limit still returns at least one entry.
    assert_eq!(s.entries(4, 7, Some(1), ctx()).unwrap().len(), 1);
    assert_eq!(s.entries(5, 6, None, ctx()).unwrap().len(), 1);

    // A conflicting append truncates the suffix, in the cache and durably.
    s.write(&WriteBatch { entries: vec![entry(5, 6), entry(6, 6), entry(7, 6)], ..Default::default() }).unwrap();
    assert_eq!(s.last_index().unwrap(), 7);
    assert_eq!(s.term(5).unwrap(), 6);
    assert_eq!(s.term(4).unwrap(), 3);
    let got: Vec<_> = s.entries(4, 8, None, ctx()).unwrap().iter().map(|e| (e.index, e.term)).collect();
    assert_eq!(got, vec![(4, 3), (5, 6), (6, 6), (7, 6)]);
    let mut backend = s.into_backend();
    let reopened = backend.load().unwrap();
    assert_eq!(reopened.last_index, 7);
    assert_eq!(reopened.applied, 4);
    assert_eq!(reopened.hard_state, hs);
    assert_eq!(reopened.snapshot_index, 3);
    assert_eq!(reopened.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(backend.read_terms(4, 8).unwrap(), vec![3, 6, 6, 6]);
}

/// Freezes the state machine, waiting for a backend that does it in the background.
pub fn freeze_now<B: Backend>(b: &mut B) -> Frozen {
    for _ in 0..3000 {
        if let Some(f) = b.freeze_snapshot().unwrap() {
            return f;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the snapshot store was not frozen within 30 s");
}

/// Freezes an applied state, reads it back in small chunks, stages it again after the
/// state moved on, installs it, and checks the install refuses a wrong row count.
pub fn check_snapshot_store<B: Backend>(mut b: B) {
    let log = sample_log(40);
    apply_log(&mut b, &log, 40);
    let frozen = freeze_now(&mut b);
    assert_eq!(frozen.index, 40);
    // Later writes do not change the frozen copy.
    let mut more = sample_log(50);
    for e in more.iter_mut() {
        e.index += 40;
    }
    apply_log(&mut b, &more[..10], 10);
    let read_all = |b: &mut B, max_bytes| {
        let mut rows = Vec::new();
        let mut cursor = Cursor::start();
        let mut chunks = 0;
        while cursor != Cursor::Done {
            let (mut r, next) = b.read_snapshot(&cursor, max_bytes).unwrap();
            rows.append(&mut r);
            cursor = next;
            chunks += 1;
        }
        (rows, chunks)
    };
    let (rows, chunks) = read_all(&mut b, 50);
    assert!(chunks > 3, "50-byte chunks must split the snapshot ({chunks} reads)");
    let kv_rows = rows.iter().filter(|r| matches!(r, Row::Kv { .. })).count() as u64;
    let change_rows = rows.iter().filter(|r| matches!(r, Row::Change(_))).count() as u64;
    let request_rows = rows.len() as u64 - kv_rows - change_rows;
    assert_eq!((kv_rows, request_rows, change_rows), (frozen.kv_rows, frozen.request_rows, frozen.change_rows));
    assert!(change_rows > 0 && frozen.revision > 0, "history travels with the snapshot");
    let mut replay = MemBackend::new();
    apply_log(&mut replay, &log, 40);
    let want_kv: Vec<Row> = replay
        .inner
        .lock()
        .unwrap()
        .kv
        .iter()
        .map(|(key, row)| Row::Kv { key: key.clone(), row: row.clone() })
        .collect();
    assert_eq!(rows[..kv_rows as usize].to_vec(), want_kv, "kv rows in key order, as of index 40");
    assert_eq!(request_rows, replay.inner.lock().unwrap().requests.len() as u64);

    // Stage the rows (in two parts; the node never stages a row twice) and install them over
    // the newer state.
    b.clear_snapshot_store().unwrap();
    let (a, z) = rows.split_at(rows.len() / 2);
    b.stage_snapshot(a).unwrap();
    b.stage_snapshot(z).unwrap();
    let snapshot = |kv_rows, request_rows: u64| {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 40;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        snap.set_data(
            SnapshotData {
                members: Vec::new(),
                kv_rows,
                request_rows,
                change_rows,
                revision: frozen.revision,
                compact_revision: frozen.compact_revision,
                cluster_id: 0,
                leases: frozen.leases.clone(),
            }
            .encode()
            .into(),
        );
        snap
    };
    let wrong = WriteBatch { snapshot: Some(snapshot(kv_rows + 1, request_rows)), sync: true, ..Default::default() };
    assert!(
        b.write(&wrong, &Effects::default()).is_err(),
        "a row count that does not match the staged rows is refused"
    );
    let right = WriteBatch { snapshot: Some(snapshot(kv_rows, request_rows)), sync: true, ..Default::default() };
    b.write(&right, &Effects::default()).unwrap();
    let st = b.load().unwrap();
    assert_eq!((st.snapshot_index, st.applied, st.last_index), (40, 40, 40));
    // What was installed is exactly what was frozen.
    let again = freeze_now(&mut b);
    assert_eq!((again.index, again.kv_rows, again.request_rows), (40, kv_rows, request_rows));
    assert_eq!((again.revision, again.compact_revision), (frozen.revision, frozen.compact_revision));
    assert_eq!(b.leases().unwrap(), frozen.leases, "the leases are installed from the snapshot");
    assert_eq!(again.conf_state.voters, vec![1]);
    assert_eq!(read_all(&mut b, 1 << 20).0, rows);
    // The installed state behaves like the replayed one: a retried request is a duplicate.
    let again = apply_log(&mut b, &log[..1], 1);
    assert!(again[0].duplicate);
}

/// A log of puts, deletes, compare-and-sets, transactions, compactions and lease operations
/// (grants, puts attached to leases, keepalives, revokes, current and stale expiries) over a
/// few keys, with no-op entries mixed in.
pub fn sample_log(n: u64) -> Vec<Entry> {
    use crate::command::{Command, Proposal, RequestId};
    use crate::txn::{CmpOp, Compare, Scope, Target, Txn, TxnOp};
    (1..=n)
        .map(|i| {
            let mut e = Entry::default();
            e.index = i;
            e.term = 1;
            let key = format!("k{}", i % 5);
            let lease = 1 + (i / 17) % 3;
            // Each block of 17 entries: grant lease L, attach keys to it (and to a lease that
            // does not exist), expire it (in odd blocks, before any keepalive: effective), keep
            // it alive, expire it on a stale view (no effect), revoke it.
            let lease_cmd = match i % 17 {
                1 => Some(Command::LeaseGrant { id: lease, ttl_ms: 5_000 }),
                2 => Some(Command::PutLease { key: key.clone(), value: format!("l{i}"), lease }),
                7 => Some(Command::PutLease { key: key.clone(), value: format!("l{i}"), lease: lease + 1 }),
                10 if (i / 17) % 2 == 1 => Some(Command::LeaseExpire { id: lease, refreshes: 1 }),
                12 => Some(Command::LeaseKeepAlive { id: lease }),
                14 => Some(Command::LeaseExpire { id: lease, refreshes: 1 }),
                15 => Some(Command::LeaseRevoke { id: lease }),
                _ => None,
            };
            let cmd = match i % 11 {
                _ if lease_cmd.is_some() => lease_cmd,
                0 => None,
                3 | 5 => Some(Command::Delete { key }),
                // Compare-and-set that succeeds (the key holds the value written 5 entries
                // earlier, unless a delete came between) or fails, and one on an absent key.
                4 | 8 => Some(Command::Cas {
                    key,
                    expected: Some(format!("v{}", i.saturating_sub(5))),
                    value: format!("c{i}"),
                }),
                9 => Some(Command::Cas { key, expected: None, value: format!("n{i}") }),
                // A transaction on the key's version (both branches happen), writing another
                // key space and deleting a prefix, or reading.
                6 => Some(Command::Txn(Txn {
                    compare: vec![Compare {
                        scope: Scope::Key(key.clone()),
                        target: Target::Version(0),
                        op: CmpOp::Gt,
                    }],
                    success: [
                        TxnOp::Put { key: format!("t{}", i % 3), value: format!("t{i}") },
                        TxnOp::Delete(Scope::Prefix("k3".into())),
                        TxnOp::PutLease { key: "tl".into(), value: format!("t{i}"), lease: 2 },
                    ][..if i % 2 == 0 { 3 } else { 2 }]
                        .to_vec(),
                    failure: vec![TxnOp::Put { key, value: format!("f{i}") }, TxnOp::Get(Scope::Prefix("t".into()))],
                })),
                10 if i > 20 => Some(Command::Compact { revision: i / 4 }),
                _ => Some(Command::Put { key, value: format!("v{i}") }),
            };
            // Every 13th entry retries the request of the entry 6 before it.
            let seq = if i % 13 == 0 && i > 6 { i - 6 } else { i };
            if let Some(cmd) = cmd {
                e.data = Proposal { id: RequestId { node: 1, nonce: 1, seq }, cmd }.encode().into();
            }
            e
        })
        .collect()
}

/// Applies `entries` in batches of `chunk`, as the node would, returning every result.
pub fn apply_log<B: Backend>(b: &mut B, entries: &[Entry], chunk: usize) -> Vec<ApplyResult> {
    let mut results = Vec::new();
    for part in entries.chunks(chunk) {
        let mut ops = Vec::new();
        for e in part {
            crate::state_machine::plan(e, &mut ops);
        }
        let applied = part.last().map(|e| e.index);
        let batch = WriteBatch { ops, applied, ..Default::default() };
        results.extend(apply_and_write(b, &batch).unwrap().0);
    }
    results
}
