//! What a log entry means: the commands of the key-value state machine and their encoding.
//!
//! Every entry carries the id of the request that proposed it, so the node that proposed it
//! can wake its waiting client when the entry is applied (whichever node was leader), and so
//! a retried request can be recognised.

use serde::{Deserialize, Serialize};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Identifies one client request cluster-wide.
///
/// `(nonce, seq)` is the identity the state machine deduplicates on; `node` only says which
/// node waits for the answer. A worker draws `nonce` at random when it starts (top bit clear),
/// so a restarted worker never reuses the id of a request an earlier incarnation proposed.
/// A request id chosen by the client ([`RequestId::for_client_key`]) hashes into `(nonce,
/// seq)` with the top bit set, so the same key retried on any node is the same request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    pub node: u64,
    pub nonce: u64,
    pub seq: u64,
}

/// Longest client-chosen request id accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

impl RequestId {
    /// The id of a request whose client named it `key` (see [`scoped_request_key`]), proposed
    /// on `node`. SHA-256, so the id is stable across builds and platforms (a cluster of mixed
    /// binaries needs that) and nobody can make another key collide with a given one.
    pub fn for_client_key(node: u64, key: &str) -> RequestId {
        use sha2::Digest;
        let d = sha2::Sha256::digest(key.as_bytes());
        let word = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
        RequestId { node, nonce: word(0) | 1 << 63, seq: word(8) }
    }

    /// A worker incarnation's random nonce, kept apart from client-key hashes.
    pub fn worker_nonce(random: u64) -> u64 {
        random & !(1 << 63)
    }
}

/// What a client-chosen request id stands for: the id as the client wrote it, the role that
/// called (its OID), the operation and every argument. A retry (same role, same command,
/// same id) maps to the same key on every node; anything else is a different request.
pub fn scoped_request_key(role: u32, op: u8, args: &[Option<&str>], id: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"raft_kv request v1\0");
    h.update(role.to_le_bytes());
    h.update([op]);
    for a in args.iter().chain(std::iter::once(&Some(id))) {
        match a {
            None => h.update([0u8]),
            Some(a) => {
                h.update([1u8]);
                h.update((a.len() as u64).to_le_bytes());
                h.update(a.as_bytes());
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// Writes `value` only if the current value equals `expected` (`None`: the key is absent).
    Cas {
        key: String,
        expected: Option<String>,
        value: String,
    },
    /// Names the cluster with a random id, which every hello then carries (the first leader
    /// proposes it; once one is applied, later ones change nothing).
    ClusterId {
        id: u128,
    },
    /// A multi-key transaction (see `txn`).
    Txn(crate::txn::Txn),
    /// Forgets history below `revision` on every node (explicit, or by the retention setting).
    Compact {
        revision: u64,
    },
    // Leases (see `lease`). New kinds go at the end: the encoding numbers variants in order.
    /// Creates lease `id` (chosen by the proposer) with a TTL.
    LeaseGrant {
        id: u64,
        ttl_ms: u64,
    },
    /// Restarts lease `id`'s TTL.
    LeaseKeepAlive {
        id: u64,
    },
    /// Deletes lease `id` and every key attached to it, at one revision.
    LeaseRevoke {
        id: u64,
    },
    /// The leader's decision that lease `id` expired, taken when it had seen `refreshes`
    /// grants and keepalives: applies as a revoke only if no keepalive applied since.
    LeaseExpire {
        id: u64,
        refreshes: u64,
    },
    /// Writes `key = value` attached to lease `lease`.
    PutLease {
        key: String,
        value: String,
        lease: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: RequestId,
    pub cmd: Command,
}

/// The result of applying a command, reported to the client that proposed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyResult {
    /// The store's revision once the request applied: the revision of its writes, or the
    /// unchanged revision when it wrote nothing.
    pub revision: u64,
    /// Delete: whether the key existed. Cas: whether the value was written. Put: true.
    /// Txn: whether the compares held. Compact: whether the compaction point moved.
    pub flag: bool,
    /// The request had already been applied at `revision`; this entry was a retry and changed
    /// nothing.
    pub duplicate: bool,
    /// This entry changed something (so `revision` is the revision of its own writes).
    pub wrote: bool,
    /// Why the request was refused (it changed nothing), if it was.
    pub refused: Option<crate::lease::Refusal>,
}

pub use crate::codec::DecodeError;

impl Proposal {
    /// In the oldest format that can express the command (see `codec::FORMAT_VERSION`).
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode_as(self.cmd.format_version(), self)
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        crate::codec::decode(data)
    }
}

/// Largest value any node accepts at apply time: the ceiling of `raft_kv.max_value_bytes`
/// (that setting may differ between nodes, and applying must not).
pub const MAX_VALUE_BYTES_CEILING: usize = 64 << 20;

/// The rules every key obeys, checked by the SQL functions and again when an entry applies.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        Err("an empty key")
    } else if key.len() > MAX_KEY_BYTES {
        Err("a key over the size limit")
    } else if key.contains('\0') {
        Err("a NUL character in a key")
    } else {
        Ok(())
    }
}

/// The rules every value obeys at apply time (see [`MAX_VALUE_BYTES_CEILING`]).
pub fn check_value(value: &str) -> Result<(), &'static str> {
    if value.len() > MAX_VALUE_BYTES_CEILING {
        Err("a value over the size limit")
    } else if value.contains('\0') {
        Err("a NUL character in a value")
    } else {
        Ok(())
    }
}

impl Command {
    /// Whether every node can apply this command (Postgres text holds no NUL, an index entry
    /// has a size limit): a command that fails is skipped identically everywhere.
    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            Command::ClusterId { id } => return if *id == 0 { Err("a zero cluster id") } else { Ok(()) },
            Command::Txn(t) => return t.validate().map_err(|_| "an invalid transaction"),
            Command::Compact { .. } | Command::LeaseKeepAlive { .. } | Command::LeaseRevoke { .. } => return Ok(()),
            Command::LeaseExpire { .. } => return Ok(()),
            Command::LeaseGrant { id, ttl_ms } => {
                return if *id == 0 || *id > i64::MAX as u64 {
                    Err("a lease id out of range")
                } else if *ttl_ms == 0 || *ttl_ms > crate::lease::MAX_TTL_MS {
                    Err("a lease TTL out of range")
                } else {
                    Ok(())
                }
            }
            _ => {}
        }
        check_key(self.key())?;
        match self {
            Command::Put { value, .. } | Command::PutLease { value, .. } => check_value(value),
            Command::Delete { .. } => Ok(()),
            Command::Cas { expected, value, .. } => {
                check_value(value)?;
                expected.as_deref().map_or(Ok(()), check_value)
            }
            _ => Ok(()),
        }
    }

    /// The oldest format version that knows this command.
    pub fn format_version(&self) -> u8 {
        let leased_txn = |t: &crate::txn::Txn| {
            t.success.iter().chain(&t.failure).any(|o| matches!(o, crate::txn::TxnOp::PutLease { .. }))
        };
        match self {
            Command::LeaseGrant { .. }
            | Command::LeaseKeepAlive { .. }
            | Command::LeaseRevoke { .. }
            | Command::LeaseExpire { .. }
            | Command::PutLease { .. } => 2,
            Command::Txn(t) if leased_txn(t) => 2,
            _ => 1,
        }
    }

    /// The key a single-key command touches ("" for the others).
    pub fn key(&self) -> &str {
        match self {
            Command::Put { key, .. }
            | Command::PutLease { key, .. }
            | Command::Delete { key }
            | Command::Cas { key, .. } => key,
            _ => "",
        }
    }
}

/// The least string above every string starting with `prefix`, `None` when there is none
/// (the empty prefix, or one made only of the largest character). UTF-8 sorts bytewise in
/// code-point order, so the prefix with its last character replaced by the next one is it.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Proposal {
            id: RequestId { node: 3, nonce: 99, seq: 7 },
            cmd: Command::Put { key: "k/ü".into(), value: "v\0x".into() },
        };
        assert_eq!(Proposal::decode(&p.encode()).unwrap(), p);
        let d = Proposal { id: p.id, cmd: Command::Delete { key: "k".into() } };
        assert_eq!(Proposal::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn a_command_is_written_in_the_oldest_format_that_knows_it() {
        let id = RequestId { node: 1, nonce: 2, seq: 3 };
        let old = Proposal { id, cmd: Command::Put { key: "k".into(), value: "v".into() } };
        let new = Proposal { id, cmd: Command::LeaseKeepAlive { id: 9 } };
        // A build of format 1 reads the first and stops at the second (NewerVersion).
        assert_eq!(old.encode()[0], 1);
        assert_eq!(new.encode()[0], 2);
        assert_eq!(Proposal::decode(&new.encode()).unwrap(), new);
        // Version 1's encoding of a command is the same bytes under either label.
        let mut relabelled = old.encode();
        relabelled[0] = 2;
        assert_eq!(Proposal::decode(&relabelled).unwrap(), old);
    }

    #[test]
    fn client_keys_name_the_same_request_on_every_node() {
        let a = RequestId::for_client_key(1, "order-17");
        let b = RequestId::for_client_key(3, "order-17");
        assert_eq!((a.nonce, a.seq), (b.nonce, b.seq));
        assert_ne!(a.node, b.node);
        let c = RequestId::for_client_key(1, "order-18");
        assert_ne!((a.nonce, a.seq), (c.nonce, c.seq));
        assert_ne!(a.nonce & 1 << 63, RequestId::worker_nonce(u64::MAX) & 1 << 63);
    }

    #[test]
    fn a_request_id_is_scoped_to_the_role_and_the_command() {
        let k = |role, op, args: &[Option<&str>], id| scoped_request_key(role, op, args, id);
        let base = k(10, 1, &[Some("key"), Some("v")], "op-1");
        assert_eq!(base, k(10, 1, &[Some("key"), Some("v")], "op-1"), "a retry is the same request");
        assert_ne!(base, k(11, 1, &[Some("key"), Some("v")], "op-1"), "another role");
        assert_ne!(base, k(10, 2, &[Some("key"), Some("v")], "op-1"), "another operation");
        assert_ne!(base, k(10, 1, &[Some("key"), Some("w")], "op-1"), "another value");
        assert_ne!(base, k(10, 1, &[Some("ke"), Some("yv")], "op-1"), "arguments are delimited");
        assert_ne!(k(10, 3, &[Some("k"), Some("v"), None], "x"), k(10, 3, &[Some("k"), Some("v"), Some("")], "x"));
        assert_eq!(base.len(), 64);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Proposal::decode(&[0xff, 0x01]).is_err());
    }
}
