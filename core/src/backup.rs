//! Backups: the state machine at one applied index as a sequence of self-describing records,
//! so a copy taken from any node (`raft_backup()`) can seed a brand-new cluster
//! (`raft_restore()`) with the same keys, revisions, history, leases and request ids.
//!
//! Record 0 is the [`Header`]: where the copy was taken and how many rows follow. Then come
//! row chunks in the snapshot's own row format ([`Row`]), and last an [`Record::End`] naming how
//! many records there were, so a truncated copy is refused rather than restored short. Every
//! record carries the codec's format version, like log entries and snapshots.

use crate::lease::LeaseRow;
use crate::snapshot::Row;

/// Where and when the copy was taken, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// The cluster the copy came from (the restored cluster keeps its own, new id).
    pub source_cluster: u128,
    /// The node and applied index the copy was taken at.
    pub node: u64,
    pub index: u64,
    pub revision: u64,
    pub compact_revision: u64,
    pub kv_rows: u64,
    pub request_rows: u64,
    pub change_rows: u64,
    pub leases: Vec<(u64, LeaseRow)>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    Header(Header),
    Rows(Vec<Row>),
    /// The last record; `records` counts all of them, this one included.
    End {
        records: u32,
    },
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        crate::codec::encode(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, crate::codec::DecodeError> {
        crate::codec::decode(b)
    }
}

/// Why a backup cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    #[error("the backup is empty")]
    Empty,
    #[error("backup record {0} is missing (records must be numbered from 0 without gaps)")]
    Missing(u32),
    #[error("backup record {seq} cannot be read: {why}")]
    Unreadable { seq: u32, why: String },
    #[error("backup record {0} is out of place (a header must come first, the end last)")]
    OutOfPlace(u32),
    #[error("the backup ends without its end record: it is truncated")]
    Truncated,
    #[error("the backup holds {found} {what} but its header announces {announced}")]
    Count { what: &'static str, found: u64, announced: u64 },
    #[error("backup record {0} holds a row out of order or twice")]
    Disordered(u32),
}

/// Checks records as they are read in order, and counts the rows they carry.
#[derive(Debug, Default)]
pub struct Reader {
    next: u32,
    header: Option<Header>,
    counts: (u64, u64, u64),
    ended: bool,
    /// The last row taken: rows come in the store's order (`Position`), each once.
    last: Option<crate::snapshot::Position<String>>,
}

impl Reader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes record `seq` (numbered from 0); returns its rows (none for the header and end).
    pub fn take(&mut self, seq: u32, bytes: &[u8]) -> Result<Vec<Row>, BackupError> {
        if seq != self.next {
            return Err(BackupError::Missing(self.next));
        }
        self.next += 1;
        let record = Record::decode(bytes).map_err(|e| BackupError::Unreadable { seq, why: e.to_string() })?;
        match (record, &self.header, self.ended) {
            (_, _, true) => Err(BackupError::OutOfPlace(seq)),
            (Record::Header(h), None, _) => {
                self.header = Some(h);
                Ok(Vec::new())
            }
            (Record::Rows(rows), Some(_), _) => {
                let mut after = self.last.as_ref().map(|p| p.as_ref());
                for r in &rows {
                    let p = r.position();
                    if after.as_ref().is_some_and(|l| p <= *l) {
                        return Err(BackupError::Disordered(seq));
                    }
                    after = Some(p);
                }
                self.last = after.map(|p| p.to_owned());
                for r in &rows {
                    match r {
                        Row::Kv { .. } => self.counts.0 += 1,
                        Row::Request { .. } => self.counts.1 += 1,
                        Row::Change(_) => self.counts.2 += 1,
                    }
                }
                Ok(rows)
            }
            (Record::End { records }, Some(_), _) if records == self.next => {
                self.ended = true;
                Ok(Vec::new())
            }
            _ => Err(BackupError::OutOfPlace(seq)),
        }
    }

    /// The header, once every record was taken and the counts agree with it.
    pub fn finish(self) -> Result<Header, BackupError> {
        let header = self.header.ok_or(BackupError::Empty)?;
        if !self.ended {
            return Err(BackupError::Truncated);
        }
        for (what, found, announced) in [
            ("keys", self.counts.0, header.kv_rows),
            ("request ids", self.counts.1, header.request_rows),
            ("history records", self.counts.2, header.change_rows),
        ] {
            if found != announced {
                return Err(BackupError::Count { what, found, announced });
            }
        }
        Ok(header)
    }

    /// The header, as soon as it has been read.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::KvRow;

    fn kv(k: &str) -> Row {
        Row::Kv {
            key: k.into(),
            row: KvRow { value: "v".into(), mod_revision: 1, create_revision: 1, version: 1, lease: 0 },
        }
    }

    fn backup() -> Vec<Vec<u8>> {
        let h = Header { index: 7, revision: 3, kv_rows: 3, ..Default::default() };
        vec![
            Record::Header(h).encode(),
            Record::Rows(vec![kv("a"), kv("b")]).encode(),
            Record::Rows(vec![kv("c")]).encode(),
            Record::End { records: 4 }.encode(),
        ]
    }

    fn read(records: &[Vec<u8>]) -> Result<(Header, usize), BackupError> {
        let mut r = Reader::new();
        let mut rows = 0;
        for (seq, b) in records.iter().enumerate() {
            rows += r.take(seq as u32, b)?.len();
        }
        r.finish().map(|h| (h, rows))
    }

    #[test]
    fn a_whole_backup_reads_back() {
        let (h, rows) = read(&backup()).unwrap();
        assert_eq!((h.index, h.revision, rows), (7, 3, 3));
    }

    #[test]
    fn damaged_backups_are_refused() {
        let b = backup();
        assert_eq!(read(&[]).unwrap_err(), BackupError::Empty);
        assert_eq!(read(&b[..3]).unwrap_err(), BackupError::Truncated);
        let mut r = Reader::new();
        r.take(0, &b[0]).unwrap();
        assert_eq!(r.take(2, &b[2]).unwrap_err(), BackupError::Missing(1));
        // A chunk lost along with a renumbering: the counts no longer match.
        let short = vec![b[0].clone(), b[1].clone(), Record::End { records: 3 }.encode()];
        assert!(matches!(read(&short).unwrap_err(), BackupError::Count { what: "keys", found: 2, announced: 3 }));
        // Rows before the header, a second header, anything after the end.
        assert_eq!(read(&[b[1].clone()]).unwrap_err(), BackupError::OutOfPlace(0));
        assert_eq!(read(&[b[0].clone(), b[0].clone()]).unwrap_err(), BackupError::OutOfPlace(1));
        let mut after = b.clone();
        after.push(b[1].clone());
        assert_eq!(read(&after).unwrap_err(), BackupError::OutOfPlace(4));
        let mut garbage = b.clone();
        garbage[1] = vec![1, 0xff, 0xff];
        assert!(matches!(read(&garbage).unwrap_err(), BackupError::Unreadable { seq: 1, .. }));
        // The end must count the records.
        let mut wrong_end = b.clone();
        wrong_end[3] = Record::End { records: 9 }.encode();
        assert_eq!(read(&wrong_end).unwrap_err(), BackupError::OutOfPlace(3));
        // A row repeated (in the next record), or rows out of the store's order: staged, they
        // would be written twice.
        let mut repeated = b.clone();
        repeated[2] = Record::Rows(vec![kv("b"), kv("c")]).encode();
        assert_eq!(read(&repeated).unwrap_err(), BackupError::Disordered(2));
        let mut swapped = b.clone();
        swapped[1] = Record::Rows(vec![kv("b"), kv("a")]).encode();
        assert_eq!(read(&swapped).unwrap_err(), BackupError::Disordered(1));
    }
}
