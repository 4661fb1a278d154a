//! The versioned encoding of everything raft_kv itself puts in the log, in snapshots and on
//! the snapshot channel: one format-version byte, then postcard (serde; compact, maintained,
//! stable across platforms), replacing bincode 1.
//!
//! The version says which decoder a reader needs. A build reads every version up to
//! [`FORMAT_VERSION`]; meeting a newer one is not garbage to skip but a sign that this node is
//! older than the cluster, so a committed entry of a newer version stops the node (see
//! `state_machine::plan`) instead of letting it diverge.

use serde::{de::DeserializeOwned, Serialize};

/// The newest format this build writes and reads. Raise it when a payload type changes shape
/// or a command kind is added, and keep decoding the older versions.
///
/// - 1: the first versioned format.
/// - 2: leases. New command kinds (appended, so a version-1 command decodes alike), `KvRow`
///   gains its lease and `SnapshotData` the leases: those are read and written in version 1
///   through `compat_v1`'s layouts. Every payload is written in the oldest version that can
///   express it ([`encode_as`]), so a command or snapshot that an older build knows is still
///   readable by it, and a command it does not know stops it instead of being skipped.
pub const FORMAT_VERSION: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Written by a newer build: this node must be upgraded to read it.
    #[error("format version {found} is newer than this build's {FORMAT_VERSION}")]
    NewerVersion { found: u8 },
    /// Not a valid payload of any version this build knows (empty, version 0, or malformed).
    #[error("malformed payload: {0}")]
    Malformed(String),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_as(FORMAT_VERSION, value)
}

/// `value` labelled as `version`, for a payload whose encoding that older version shares.
pub fn encode_as<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    debug_assert!((1..=FORMAT_VERSION).contains(&version));
    postcard::to_extend(value, vec![version]).unwrap_or_else(|e| panic!("encoding cannot fail: {e}"))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Malformed("empty".into())),
        Some((&v, _)) if v > FORMAT_VERSION => Err(DecodeError::NewerVersion { found: v }),
        // Payload types whose layout changed decode older versions themselves (`compat_v1`).
        Some((&(1..=FORMAT_VERSION), rest)) => {
            postcard::from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))
        }
        Some((&v, _)) => Err(DecodeError::Malformed(format!("unknown format version {v}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: String,
        c: Option<Vec<u8>>,
    }

    #[test]
    fn round_trip_and_versions() {
        let s = Sample { a: u64::MAX, b: "ü\0".into(), c: Some(vec![1, 2]) };
        let bytes = encode(&s);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), s);
        let mut newer = bytes.clone();
        newer[0] = FORMAT_VERSION + 1;
        assert_eq!(decode::<Sample>(&newer), Err(DecodeError::NewerVersion { found: FORMAT_VERSION + 1 }));
        assert!(matches!(decode::<Sample>(&[]), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<Sample>(&[0, 1]), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<Sample>(&bytes[..bytes.len() - 1]), Err(DecodeError::Malformed(_))));
    }
}
