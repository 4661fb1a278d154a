//! Plain data shared by the core's modules: what the state machine records (members,
//! request ids, snapshot metadata) and the operations it applies. Depends on nothing but the
//! command encoding, so every other module can use it without import cycles.

use std::collections::BTreeMap;

use crate::command::RequestId;

/// One state-machine operation, decided by `apply` and executed by the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// `lease`: the lease the key is attached to from now on (0: none).
    Put {
        key: String,
        value: String,
        lease: u64,
    },
    Delete {
        key: String,
    },
    Cas {
        key: String,
        expected: Option<String>,
        value: String,
    },
    Txn(crate::txn::Txn),
    /// Forget history below this revision (see [`Change`]).
    Compact {
        revision: u64,
    },
    LeaseGrant {
        id: u64,
        ttl_ms: u64,
    },
    LeaseKeepAlive {
        id: u64,
    },
    LeaseRevoke {
        id: u64,
    },
    LeaseExpire {
        id: u64,
        refreshes: u64,
    },
}

impl KvOp {
    /// The single keys whose stored state deciding this op reads.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            KvOp::Put { key, .. } | KvOp::Delete { key } | KvOp::Cas { key, .. } => vec![key],
            KvOp::Txn(t) => t.keys(),
            _ => Vec::new(),
        }
    }

    /// The leases whose stored state (and number of attached keys) deciding this op reads.
    pub fn leases(&self) -> Vec<u64> {
        match self {
            KvOp::Put { lease, .. } if *lease != 0 => vec![*lease],
            KvOp::Txn(t) => {
                t.success.iter().chain(&t.failure).filter_map(|o| o.put()).map(|p| p.2).filter(|l| *l != 0).collect()
            }
            KvOp::LeaseGrant { id, .. }
            | KvOp::LeaseKeepAlive { id }
            | KvOp::LeaseRevoke { id }
            | KvOp::LeaseExpire { id, .. } => vec![*id],
            _ => Vec::new(),
        }
    }

    /// The leases whose attached keys this op may delete.
    pub fn lease_keys(&self) -> Vec<u64> {
        match self {
            KvOp::LeaseRevoke { id } | KvOp::LeaseExpire { id, .. } => vec![*id],
            _ => Vec::new(),
        }
    }

    /// The key prefixes whose every stored key deciding this op reads.
    pub fn prefixes(&self) -> Vec<&str> {
        match self {
            KvOp::Txn(t) => t.prefixes(),
            _ => Vec::new(),
        }
    }
}

/// A key's stored state, with etcd's metadata: the revision that created it (since it last
/// did not exist), the revision of its last write, and how many writes it has had since.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvRow {
    pub value: String,
    pub mod_revision: u64,
    pub create_revision: u64,
    pub version: u64,
    /// The lease the key is attached to (0: none).
    pub lease: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChangeKind {
    Put,
    Delete,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Delete => "delete",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "put" => Some(ChangeKind::Put),
            "delete" => Some(ChangeKind::Delete),
            _ => None,
        }
    }
}

/// One key's change at one revision, as the history records it. For a put, `value`,
/// `create_revision` and `version` are the key's new state; for a delete they describe the
/// key as it was (value `None`). `prev_value` and `prev_mod_revision` are the state before
/// (`None`: the key did not exist), so the state at any retained revision can be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub revision: u64,
    pub key: String,
    pub kind: ChangeKind,
    pub value: Option<String>,
    pub prev_value: Option<String>,
    pub create_revision: u64,
    pub version: u64,
    pub prev_mod_revision: Option<u64>,
}

impl Change {
    /// The key's state just before this change. The history does not record leases: a state
    /// rebuilt from it has none.
    pub fn before(&self) -> Option<KvRow> {
        let prev_mod = self.prev_mod_revision?;
        let version = match self.kind {
            ChangeKind::Put => self.version - 1,
            ChangeKind::Delete => self.version,
        };
        Some(KvRow {
            value: self.prev_value.clone().unwrap_or_default(),
            mod_revision: prev_mod,
            create_revision: self.create_revision,
            version,
            lease: 0,
        })
    }
}

/// An operation with the request that asked for it and the log index applying it.
///
/// The backend records every applied request id (for [`DEDUP_WINDOW`] entries) in the same
/// transaction: an id seen again is a retry, and is answered with the first result instead of
/// being applied twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpAt {
    pub id: RequestId,
    pub index: u64,
    pub op: KvOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberOp {
    Upsert(Member),
    Remove(u64),
}

impl MemberOp {
    /// Applies the change to a map of members by id.
    pub fn apply_to(&self, members: &mut BTreeMap<u64, Member>) {
        match self {
            MemberOp::Upsert(m) => {
                members.insert(m.id, m.clone());
            }
            MemberOp::Remove(id) => {
                members.remove(id);
            }
        }
    }
}

/// How many revisions a request id is remembered for duplicate detection (at least as many
/// log entries: the revision rises by at most one per entry).
pub const DEDUP_WINDOW: u64 = 100_000;
/// Forgetting old request ids happens when the revision crosses a multiple of this.
pub const DEDUP_PRUNE_EVERY: u64 = 1024;

/// When applying moves the store revision from `before` to `after`, the revision below which
/// remembered request ids are forgotten, if this is a pruning point. Depends only on
/// revisions, so every node prunes identically.
pub fn dedup_prune_below(before: u64, after: u64) -> Option<u64> {
    (after / DEDUP_PRUNE_EVERY > before / DEDUP_PRUNE_EVERY && after > DEDUP_WINDOW).then(|| after - DEDUP_WINDOW)
}

/// A member's address as the state machine records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: u64,
    pub address: String,
    /// A learner to be promoted to voter once it has caught up.
    pub promote: bool,
}

/// What the snapshot message carries besides the conf state (which travels in its metadata):
/// the member addresses, and how many rows the streamed part holds (see `snapshot`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotData {
    pub members: Vec<Member>,
    pub kv_rows: u64,
    pub request_rows: u64,
    /// The cluster id, installed with the snapshot (0: the cluster had none yet).
    pub cluster_id: u128,
    /// History rows streamed, and the store's revision and compaction point.
    pub change_rows: u64,
    pub revision: u64,
    pub compact_revision: u64,
    /// Every lease (at most `lease::MAX_LEASES`, so they travel in the message itself).
    pub leases: Vec<(u64, crate::lease::LeaseRow)>,
}

impl SnapshotData {
    /// In version 1 when it can be (no leases), so a build of 0.1.0 reads it.
    pub fn encode(&self) -> Vec<u8> {
        match crate::compat_v1::SnapshotData::from_current(self) {
            Some(v1) => crate::codec::encode_as(1, &v1),
            None => crate::codec::encode(self),
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, crate::codec::DecodeError> {
        match b.first() {
            None => Ok(Self::default()),
            Some(1) => crate::codec::decode::<crate::compat_v1::SnapshotData>(b).map(Into::into),
            Some(_) => crate::codec::decode(b),
        }
    }
}

/// Payload of a membership change entry (the `context` of the ConfChangeV2).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfChangeContext {
    pub id: RequestId,
    /// Address of the node being added.
    pub address: Option<String>,
    /// Add as a learner and promote automatically once caught up.
    pub promote: bool,
}

impl ConfChangeContext {
    /// Its layout has not changed since version 1: labelled so, a build of 0.1.0 reads it.
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode_as(1, self)
    }
    pub fn decode(b: &[u8]) -> Option<Self> {
        crate::codec::decode(b).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_forgotten_after_the_window() {
        assert_eq!(dedup_prune_below(0, 10), None);
        assert_eq!(dedup_prune_below(DEDUP_WINDOW, DEDUP_WINDOW + 1), None);
        let a = DEDUP_PRUNE_EVERY * (DEDUP_WINDOW / DEDUP_PRUNE_EVERY + 3);
        assert_eq!(dedup_prune_below(a - 1, a), Some(a - DEDUP_WINDOW));
    }

    #[test]
    fn snapshot_data_round_trip() {
        let mut d = SnapshotData::default();
        d.kv_rows = 100_000;
        d.request_rows = 7;
        d.members.push(Member { id: 1, address: "127.0.0.1:7001".into(), promote: false });
        assert_eq!(SnapshotData::decode(&d.encode()).unwrap(), d);
        assert_eq!(SnapshotData::decode(&[]).unwrap(), SnapshotData::default());
    }
}
