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
    /// The id of a request whose client named it `key`, proposed on `node`.
    pub fn for_client_key(node: u64, key: &str) -> RequestId {
        // FNV-1a, twice with different offsets: stable across builds and platforms, which a
        // cluster of mixed binaries needs (std's hasher promises neither).
        let fnv = |offset: u64| key.bytes().fold(offset, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
        RequestId { node, nonce: fnv(0xcbf2_9ce4_8422_2325) | 1 << 63, seq: fnv(0x6c62_272e_07bb_0142) }
    }

    /// A worker incarnation's random nonce, kept apart from client-key hashes.
    pub fn worker_nonce(random: u64) -> u64 {
        random & !(1 << 63)
    }
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: RequestId,
    pub cmd: Command,
}

/// The result of applying a command, reported to the client that proposed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyResult {
    /// The log index of the entry that applied the request (for a put, the key's new revision).
    pub revision: u64,
    /// Delete: whether the key existed. Cas: whether the value was written. Put: true.
    pub flag: bool,
    /// The request had already been applied at `revision`; this entry was a retry and changed
    /// nothing.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable log entry: {0}")]
pub struct DecodeError(#[from] bincode::Error);

impl Proposal {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("serializing a proposal cannot fail")
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        Ok(bincode::deserialize(data)?)
    }
}

impl Command {
    pub fn key(&self) -> &str {
        match self {
            Command::Put { key, .. } | Command::Delete { key } | Command::Cas { key, .. } => key,
        }
    }
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
    fn garbage_is_an_error() {
        assert!(Proposal::decode(&[0xff, 0x01]).is_err());
    }
}
