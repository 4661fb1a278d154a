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
/// `nonce` is drawn at random when a worker starts, so a restarted worker never reuses the id
/// of a request an earlier incarnation proposed (whose entry might still be applied later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    pub node: u64,
    pub nonce: u64,
    pub seq: u64,
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
    fn garbage_is_an_error() {
        assert!(Proposal::decode(&[0xff, 0x01]).is_err());
    }
}
