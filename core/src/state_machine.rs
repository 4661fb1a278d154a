//! Turning committed log entries into state-machine operations.
//!
//! The mapping is deterministic and depends only on the entry, so every node applying the
//! same log reaches the same key-value state. Revisions are counted by `apply`, not taken
//! from log indexes: they rise by one per command that changes something, as etcd's do.

use raft::eraftpb::{Entry, EntryType};

use crate::command::{Command, Proposal, RequestId};
use crate::types::{KvOp, OpAt};

/// What one committed entry asks of the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    /// An empty entry (a new leader's no-op): nothing to do.
    Nothing,
    /// A key-value operation; `ops[op_index]` in the batch is its operation.
    Kv { id: RequestId, op_index: usize },
    /// A membership change the driver must hand to raft.
    ConfChange,
    /// Sets the cluster id, unless one is set already (the first such entry wins everywhere).
    ClusterId { id: RequestId, cluster_id: u128 },
    /// A command no node can apply (a forged or corrupt entry): skipped on every node alike.
    Invalid { index: u64, reason: &'static str },
    /// Written in a newer format than this build reads: this node must stop before it, not
    /// skip it (the nodes that can read it apply it).
    NeedsUpgrade { index: u64, version: u8 },
}

/// Appends the operation for `entry` (if any) to `ops` and says what the entry was.
///
/// A malformed normal entry is skipped rather than fatal: it was accepted by a quorum, so every
/// node of this version skips it identically and the state machines stay equal. An entry of a
/// newer format is another matter (see [`Planned::NeedsUpgrade`]).
pub fn plan(entry: &Entry, ops: &mut Vec<OpAt>) -> Planned {
    match entry.get_entry_type() {
        EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => Planned::ConfChange,
        EntryType::EntryNormal if entry.data.is_empty() => Planned::Nothing,
        EntryType::EntryNormal => match Proposal::decode(&entry.data) {
            Err(crate::codec::DecodeError::NewerVersion { found }) => {
                Planned::NeedsUpgrade { index: entry.index, version: found }
            }
            Err(_) => Planned::Invalid { index: entry.index, reason: "undecodable" },
            Ok(p) if p.cmd.validate().is_err() => {
                Planned::Invalid { index: entry.index, reason: p.cmd.validate().unwrap_err() }
            }
            Ok(p) => {
                let op = match p.cmd {
                    Command::ClusterId { id } => return Planned::ClusterId { id: p.id, cluster_id: id },
                    Command::Put { key, value } => KvOp::Put { key, value, lease: 0 },
                    Command::PutLease { key, value, lease } => KvOp::Put { key, value, lease },
                    Command::LeaseGrant { id, ttl_ms } => KvOp::LeaseGrant { id, ttl_ms },
                    Command::LeaseKeepAlive { id } => KvOp::LeaseKeepAlive { id },
                    Command::LeaseRevoke { id } => KvOp::LeaseRevoke { id },
                    Command::LeaseExpire { id, refreshes } => KvOp::LeaseExpire { id, refreshes },
                    Command::Delete { key } => KvOp::Delete { key },
                    Command::Cas { key, expected, value } => KvOp::Cas { key, expected, value },
                    Command::Txn(t) => KvOp::Txn(t),
                    Command::Compact { revision } => KvOp::Compact { revision },
                };
                ops.push(OpAt { id: p.id, index: entry.index, op });
                Planned::Kv { id: p.id, op_index: ops.len() - 1 }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ApplyResult;
    use crate::mem_backend::MemBackend;
    use crate::storage::{apply_and_write, WriteBatch};

    fn proposal(index: u64, seq: u64, cmd: Command) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = 1;
        e.data = Proposal { id: RequestId { node: 1, nonce: 1, seq }, cmd }.encode().into();
        e
    }

    fn normal(index: u64, cmd: Command) -> Entry {
        proposal(index, index, cmd)
    }

    fn apply(b: &mut MemBackend, entries: &[Entry]) -> Vec<ApplyResult> {
        let mut ops = Vec::new();
        for e in entries {
            plan(e, &mut ops);
        }
        apply_and_write(b, &WriteBatch { ops, applied: entries.last().map(|e| e.index), ..Default::default() })
            .unwrap()
            .0
    }

    fn ok(revision: u64, flag: bool) -> ApplyResult {
        ApplyResult { revision, flag, duplicate: false, wrote: flag, refused: None }
    }

    #[test]
    fn apply_put_delete_and_noop() {
        let mut b = MemBackend::new();
        let put = |i, k: &str, v: &str| normal(i, Command::Put { key: k.into(), value: v.into() });
        let mut noop = Entry::default();
        noop.index = 2;
        let res =
            apply(&mut b, &[put(1, "a", "x"), noop, put(3, "a", "y"), normal(4, Command::Delete { key: "b".into() })]);
        // Revisions count changes: the no-op and the delete of an absent key change nothing.
        assert_eq!(res, vec![ok(1, true), ok(2, true), ok(2, false)]);
        assert_eq!(b.kv().get("a"), Some(&("y".to_string(), 2)));
        let res = apply(&mut b, &[normal(5, Command::Delete { key: "a".into() })]);
        assert_eq!(res, vec![ok(3, true)]);
        assert!(b.kv().is_empty());
        assert_eq!(b.inner.lock().unwrap().state.applied, 5);
    }

    #[test]
    fn compare_and_set() {
        let mut b = MemBackend::new();
        let cas = |i, exp: Option<&str>, v: &str| {
            normal(i, Command::Cas { key: "lock".into(), expected: exp.map(Into::into), value: v.into() })
        };
        let res =
            apply(&mut b, &[cas(1, None, "a"), cas(2, None, "b"), cas(3, Some("b"), "c"), cas(4, Some("a"), "d")]);
        assert_eq!(res, vec![ok(1, true), ok(1, false), ok(1, false), ok(2, true)]);
        assert_eq!(b.kv().get("lock"), Some(&("d".to_string(), 2)));
    }

    #[test]
    fn a_retried_request_applies_once() {
        let mut b = MemBackend::new();
        let first = proposal(1, 42, Command::Put { key: "k".into(), value: "1".into() });
        let other = normal(2, Command::Put { key: "k".into(), value: "2".into() });
        let retry = proposal(3, 42, Command::Put { key: "k".into(), value: "1".into() });
        let res = apply(&mut b, &[first, other, retry]);
        assert_eq!(res[2], ApplyResult { revision: 1, flag: true, duplicate: true, wrote: false, refused: None });
        // The retry did not overwrite the later write.
        assert_eq!(b.kv().get("k"), Some(&("2".to_string(), 2)));
    }

    #[test]
    fn replay_reaches_the_same_state() {
        let entries: Vec<Entry> = (1..=50)
            .map(|i| {
                if i % 7 == 0 {
                    normal(i, Command::Delete { key: format!("k{}", i % 5) })
                } else {
                    normal(i, Command::Put { key: format!("k{}", i % 5), value: format!("v{i}") })
                }
            })
            .collect();
        let mut once = MemBackend::new();
        apply(&mut once, &entries);
        let mut piecewise = MemBackend::new();
        for chunk in entries.chunks(6) {
            apply(&mut piecewise, chunk);
        }
        assert_eq!(once.kv(), piecewise.kv());
    }

    #[test]
    fn garbage_entries_are_skipped_identically_newer_formats_are_not() {
        let entry = |data: Vec<u8>| {
            let mut e = Entry::default();
            e.index = 1;
            e.data = data.into();
            e
        };
        let mut ops = Vec::new();
        for garbage in [vec![1, 0xff, 0xff, 0xff], vec![0, 1, 2]] {
            assert_eq!(plan(&entry(garbage), &mut ops), Planned::Invalid { index: 1, reason: "undecodable" });
        }
        let newer = crate::codec::FORMAT_VERSION + 1;
        assert_eq!(plan(&entry(vec![newer, 0, 0]), &mut ops), Planned::NeedsUpgrade { index: 1, version: newer });
        assert!(ops.is_empty());
    }
}
