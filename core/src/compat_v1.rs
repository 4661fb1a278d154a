//! The version-1 layouts of the payloads that version 2 extended, so that while a rolling
//! upgrade runs a node of either version reads the snapshots the other sends. As for log
//! entries, a payload is written in the oldest version that can express it: a snapshot without
//! leases (no lease can exist before every member reads version 2) goes out in version 1.

use serde::{Deserialize, Serialize};

use crate::snapshot as v2;
use crate::types as t;

/// A key's row without its lease.
#[derive(Serialize, Deserialize)]
pub struct KvRow {
    value: String,
    mod_revision: u64,
    create_revision: u64,
    version: u64,
}

#[derive(Serialize, Deserialize)]
pub enum Row {
    Kv { key: String, row: KvRow },
    Request { nonce: u64, seq: u64, node: u64, revision: u64, flag: bool },
    Change(t::Change),
}

#[derive(Serialize, Deserialize)]
pub enum SnapFrame {
    Chunk { stream: u64, index: u64, term: u64, seq: u32, rows: Vec<Row>, last: bool, rows_total: u64 },
    Ack { stream: u64, index: u64, term: u64, seq: u32 },
    Abort { stream: u64, index: u64, term: u64, reason: String },
}

/// Snapshot metadata without the leases.
#[derive(Serialize, Deserialize)]
pub struct SnapshotData {
    members: Vec<t::Member>,
    kv_rows: u64,
    request_rows: u64,
    cluster_id: u128,
    change_rows: u64,
    revision: u64,
    compact_revision: u64,
}

impl From<Row> for v2::Row {
    fn from(r: Row) -> Self {
        match r {
            Row::Kv { key, row } => v2::Row::Kv {
                key,
                row: t::KvRow {
                    value: row.value,
                    mod_revision: row.mod_revision,
                    create_revision: row.create_revision,
                    version: row.version,
                    lease: 0,
                },
            },
            Row::Request { nonce, seq, node, revision, flag } => v2::Row::Request { nonce, seq, node, revision, flag },
            Row::Change(c) => v2::Row::Change(c),
        }
    }
}

impl Row {
    /// The version-1 row, when it has no lease.
    fn from_current(r: &v2::Row) -> Option<Self> {
        Some(match r {
            v2::Row::Kv { key, row } if row.lease == 0 => Row::Kv {
                key: key.clone(),
                row: KvRow {
                    value: row.value.clone(),
                    mod_revision: row.mod_revision,
                    create_revision: row.create_revision,
                    version: row.version,
                },
            },
            v2::Row::Kv { .. } => return None,
            &v2::Row::Request { nonce, seq, node, revision, flag } => Row::Request { nonce, seq, node, revision, flag },
            v2::Row::Change(c) => Row::Change(c.clone()),
        })
    }
}

impl From<SnapFrame> for v2::SnapFrame {
    fn from(f: SnapFrame) -> Self {
        match f {
            SnapFrame::Chunk { stream, index, term, seq, rows, last, rows_total } => v2::SnapFrame::Chunk {
                stream,
                index,
                term,
                seq,
                rows: rows.into_iter().map(Into::into).collect(),
                last,
                rows_total,
            },
            SnapFrame::Ack { stream, index, term, seq } => v2::SnapFrame::Ack { stream, index, term, seq },
            SnapFrame::Abort { stream, index, term, reason } => v2::SnapFrame::Abort { stream, index, term, reason },
        }
    }
}

impl SnapFrame {
    /// The version-1 frame, when none of its rows has a lease.
    pub fn from_current(f: &v2::SnapFrame) -> Option<Self> {
        Some(match f {
            v2::SnapFrame::Chunk { stream, index, term, seq, rows, last, rows_total } => SnapFrame::Chunk {
                stream: *stream,
                index: *index,
                term: *term,
                seq: *seq,
                rows: rows.iter().map(Row::from_current).collect::<Option<Vec<_>>>()?,
                last: *last,
                rows_total: *rows_total,
            },
            &v2::SnapFrame::Ack { stream, index, term, seq } => SnapFrame::Ack { stream, index, term, seq },
            v2::SnapFrame::Abort { stream, index, term, reason } => {
                SnapFrame::Abort { stream: *stream, index: *index, term: *term, reason: reason.clone() }
            }
        })
    }
}

impl From<SnapshotData> for t::SnapshotData {
    fn from(d: SnapshotData) -> Self {
        t::SnapshotData {
            members: d.members,
            kv_rows: d.kv_rows,
            request_rows: d.request_rows,
            cluster_id: d.cluster_id,
            change_rows: d.change_rows,
            revision: d.revision,
            compact_revision: d.compact_revision,
            leases: Vec::new(),
        }
    }
}

impl SnapshotData {
    /// The version-1 metadata, when the snapshot holds no lease.
    pub fn from_current(d: &t::SnapshotData) -> Option<Self> {
        d.leases.is_empty().then(|| SnapshotData {
            members: d.members.clone(),
            kv_rows: d.kv_rows,
            request_rows: d.request_rows,
            cluster_id: d.cluster_id,
            change_rows: d.change_rows,
            revision: d.revision,
            compact_revision: d.compact_revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::lease::LeaseRow;
    use crate::snapshot::{Row, SnapFrame};
    use crate::types::{KvRow, Member, SnapshotData};

    fn kv(lease: u64) -> Row {
        Row::Kv {
            key: "k".into(),
            row: KvRow { value: "v".into(), mod_revision: 3, create_revision: 2, version: 2, lease },
        }
    }

    fn chunk(rows: Vec<Row>) -> SnapFrame {
        SnapFrame::Chunk { stream: 1, index: 9, term: 2, seq: 0, rows, last: true, rows_total: 2 }
    }

    #[test]
    fn snapshots_without_leases_go_out_in_version_1_and_read_back() {
        let f = chunk(vec![kv(0), Row::Request { nonce: 1, seq: 2, node: 3, revision: 4, flag: true }]);
        let b = f.encode();
        assert_eq!(b[0], 1, "no lease: the version an older build reads");
        assert_eq!(SnapFrame::decode(&b), Some(f));
        // A version-1 build's own bytes (its layout, labelled 1) read the same.
        let ack = SnapFrame::Ack { stream: 1, index: 9, term: 2, seq: 0 };
        assert_eq!(ack.encode()[0], 1);
        assert_eq!(SnapFrame::decode(&ack.encode()), Some(ack));
        let d = SnapshotData {
            members: vec![Member { id: 1, address: "a".into(), promote: false }],
            kv_rows: 5,
            ..Default::default()
        };
        assert_eq!(d.encode()[0], 1);
        assert_eq!(SnapshotData::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn leases_need_version_2() {
        let f = chunk(vec![kv(0), kv(7)]);
        let b = f.encode();
        assert_eq!(b[0], crate::codec::FORMAT_VERSION);
        assert_eq!(SnapFrame::decode(&b), Some(f));
        let d = SnapshotData { leases: vec![(7, LeaseRow { ttl_ms: 1000, refreshes: 1 })], ..Default::default() };
        assert_eq!(d.encode()[0], crate::codec::FORMAT_VERSION);
        assert_eq!(SnapshotData::decode(&d.encode()).unwrap(), d);
        // Version-2 bytes are never misread as version 1 (the label decides the layout).
        let mut relabelled = d.encode();
        relabelled[0] = 1;
        assert_ne!(SnapshotData::decode(&relabelled).ok(), Some(d));
    }
}
