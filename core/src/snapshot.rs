//! Snapshots that stream in bounded chunks, so neither side holds the state machine in memory.
//!
//! raft-rs sends a snapshot as one message. Here that message carries only the metadata and
//! the member addresses ([`crate::types::SnapshotData`]); the rows travel beforehand
//! as [`SnapFrame::Chunk`]s on the peer connection:
//!
//! 1. The leader *freezes* the state machine at its applied index into the backend's snapshot
//!    store (a server-side copy in Postgres) when raft first asks for a snapshot, and reuses
//!    it while it still covers the compacted log.
//! 2. When raft emits `MsgSnapshot` to a follower, the node holds the message back and streams
//!    the frozen rows to it, a few chunks in flight at a time, each acknowledged once the
//!    follower has staged it in its own snapshot store.
//! 3. After the last acknowledgement the `MsgSnapshot` itself goes out. The follower steps it
//!    into raft only if it has staged that very snapshot completely, and then installs the
//!    staged rows in one transaction.
//!
//! A lost chunk, a refusal ([`SnapFrame::Abort`]) or a silent follower ends the stream and is
//! reported to raft as a failed snapshot, which makes the leader try again later.

/// One frame of the snapshot side channel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapFrame {
    /// Leader → follower: rows of the snapshot `(index, term)`, numbered from 0 within one
    /// transfer (`stream`, unique per leader term).
    /// `rows_total`: how many rows the whole transfer holds (what the snapshot's metadata
    /// announces), so the receiver stages no more than that.
    Chunk { stream: u64, index: u64, term: u64, seq: u32, rows: Vec<Row>, last: bool, rows_total: u64 },
    /// Follower → leader: chunk `seq` is staged.
    Ack { stream: u64, index: u64, term: u64, seq: u32 },
    /// Follower → leader: this transfer failed (`stream` 0: whichever sent that snapshot).
    Abort { stream: u64, index: u64, term: u64, reason: String },
}

impl SnapFrame {
    /// In version 1 when it can be (no row with a lease), so a build of 0.1.0 reads it.
    pub fn encode(&self) -> Vec<u8> {
        match crate::compat_v1::SnapFrame::from_current(self) {
            Some(v1) => crate::codec::encode_as(1, &v1),
            None => crate::codec::encode(self),
        }
    }
    pub fn decode(b: &[u8]) -> Option<Self> {
        match b.first() {
            Some(1) => crate::codec::decode::<crate::compat_v1::SnapFrame>(b).ok().map(Into::into),
            _ => crate::codec::decode(b).ok(),
        }
    }
}

/// A row of the state machine, as a snapshot carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Row {
    Kv {
        key: String,
        row: crate::types::KvRow,
    },
    /// A remembered request id, so retries stay deduplicated across a snapshot.
    Request {
        nonce: u64,
        seq: u64,
        node: u64,
        revision: u64,
        flag: bool,
    },
    /// A retained history record, so a node installed from a snapshot answers history
    /// queries exactly like the others.
    Change(crate::types::Change),
}

impl Row {
    /// Approximate wire size, for chunk limits.
    pub fn bytes(&self) -> usize {
        match self {
            Row::Kv { key, row } => key.len() + row.value.len() + 32,
            Row::Request { .. } => 40,
            Row::Change(c) => {
                c.key.len()
                    + c.value.as_ref().map_or(0, String::len)
                    + c.prev_value.as_ref().map_or(0, String::len)
                    + 48
            }
        }
    }
}

/// Where a row stands in the order a transfer sends rows: the kv rows by key, then the request
/// ids by (nonce, seq), then the history by (revision, key), as the store's primary keys sort
/// them (bigints signed, text in the "C" collation, which is byte order). A receiver that
/// takes only rows past the last one stages no row twice, so it needs no conflict check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Position<S> {
    Kv(S),
    Request(i64, i64),
    Change(i64, S),
}

impl Position<String> {
    pub fn as_ref(&self) -> Position<&str> {
        match self {
            Position::Kv(k) => Position::Kv(k),
            Position::Request(n, s) => Position::Request(*n, *s),
            Position::Change(r, k) => Position::Change(*r, k),
        }
    }
}

impl Position<&str> {
    pub fn to_owned(&self) -> Position<String> {
        match *self {
            Position::Kv(k) => Position::Kv(k.to_string()),
            Position::Request(n, s) => Position::Request(n, s),
            Position::Change(r, k) => Position::Change(r, k.to_string()),
        }
    }
}

impl Row {
    pub fn position(&self) -> Position<&str> {
        match self {
            Row::Kv { key, .. } => Position::Kv(key),
            Row::Request { nonce, seq, .. } => Position::Request(*nonce as i64, *seq as i64),
            Row::Change(c) => Position::Change(c.revision as i64, &c.key),
        }
    }
}

/// Where reading the snapshot store stopped: the kv rows in key order, then the request ids,
/// then the history by (revision, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    Kv(Option<String>),
    Requests(Option<(u64, u64)>),
    Changes(Option<(u64, String)>),
    Done,
}

impl Cursor {
    pub fn start() -> Self {
        Cursor::Kv(None)
    }
}

/// What a freeze copied: the state machine as of one applied index, with the configuration
/// and member addresses as of that index.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frozen {
    /// The applied index the copy was taken at.
    pub index: u64,
    pub kv_rows: u64,
    pub request_rows: u64,
    pub change_rows: u64,
    /// The store's revision and history compaction point as of `index`.
    pub revision: u64,
    pub compact_revision: u64,
    pub conf_state: raft::eraftpb::ConfState,
    pub members: Vec<crate::types::Member>,
    pub leases: Vec<(u64, crate::lease::LeaseRow)>,
}

/// Chunks sent and not yet acknowledged, per stream.
pub const WINDOW: u32 = 32;
/// Default upper bound of one chunk's rows, in bytes (one row may exceed it alone).
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 10;
