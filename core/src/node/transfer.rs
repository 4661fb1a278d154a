//! Streaming a snapshot in chunks: the leader's side (freeze, read rows by key range, send
//! up to `WINDOW` chunks unacknowledged, go back to the first unacknowledged after
//! `RESEND_TICKS`, hold raft's `MsgSnapshot` back until every chunk is acknowledged) and the
//! follower's (stage each chunk, acknowledge it, take the `MsgSnapshot` only once the whole
//! transfer is staged). Frames and rows are in `crate::snapshot`.

use raft::eraftpb::Message;
use raft::{ProgressState, SnapshotStatus};

use super::{Node, NodeError, Outbound};
use crate::snapshot::{Cursor, Position, SnapFrame, WINDOW};
use crate::storage::Backend;
use crate::types::SnapshotData;

/// A snapshot this leader is streaming to one follower.
#[derive(Debug)]
pub(super) struct OutStream {
    pub(super) stream: u64,
    pub(super) index: u64,
    pub(super) term: u64,
    /// raft's `MsgSnapshot`, held back until every chunk is acknowledged.
    pub(super) msg: Option<Message>,
    pub(super) cursor: Cursor,
    /// Where each sent, unacknowledged chunk started (front: chunk `acked`), to send again.
    pub(super) starts: std::collections::VecDeque<Cursor>,
    pub(super) next_seq: u32,
    pub(super) acked: u32,
    pub(super) sent_last: bool,
    /// Ticks since the transfer last made progress; it fails past the timeout.
    pub(super) idle_ticks: u32,
    /// Rows the snapshot holds (kv and request ids), announced in every chunk.
    pub(super) rows_total: u64,
}

/// Ticks without an acknowledgement after which unacknowledged chunks are sent again.
const RESEND_TICKS: u32 = 5;

/// Once every chunk is staged and the snapshot message is out, the follower installs the rows
/// in one transaction and says nothing meanwhile: the wait grows by a tick per this many rows
/// (a slow pace: 1,000,000 rows installed in 16 s here, against the 100 s this allows).
const INSTALL_ROWS_PER_TICK: u64 = 1_000;

impl OutStream {
    /// Ticks without progress after which the transfer counts as failed.
    fn patience(&self, timeout_ticks: u32) -> u32 {
        let installing = self.sent_last && self.msg.is_none();
        let install =
            if installing { (self.rows_total / INSTALL_ROWS_PER_TICK).min(u32::MAX as u64) as u32 } else { 0 };
        timeout_ticks.saturating_add(install)
    }
}

/// A snapshot being staged from a leader.
#[derive(Debug)]
pub(super) struct InStream {
    pub(super) from: u64,
    pub(super) stream: u64,
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) next_seq: u32,
    pub(super) complete: bool,
    /// Rows the transfer announced, and rows staged so far.
    pub(super) rows_total: u64,
    pub(super) staged: u64,
    /// The last row staged: every row must come after it.
    pub(super) last: Option<Position<String>>,
}

impl<B: Backend> Node<B> {
    /// Handles a frame of a snapshot transfer from `from`.
    pub fn receive_snap(&mut self, from: u64, frame: SnapFrame) -> Result<(), NodeError> {
        match frame {
            SnapFrame::Chunk { stream, index, term, seq, rows, last, rows_total } => {
                let reply = |node: &mut Self, frame| node.outbox.push(Outbound::Snap { to: from, frame });
                if self.is_leader() {
                    let reason = "a leader takes no snapshot".to_string();
                    reply(self, SnapFrame::Abort { stream, index, term, reason });
                    return Ok(());
                }
                let valid = |r: &crate::snapshot::Row| match r {
                    crate::snapshot::Row::Kv { key, row } => {
                        crate::command::check_key(key).is_ok() && crate::command::check_value(&row.value).is_ok()
                    }
                    crate::snapshot::Row::Request { .. } => true,
                    crate::snapshot::Row::Change(c) => {
                        crate::command::check_key(&c.key).is_ok()
                            && [&c.value, &c.prev_value]
                                .iter()
                                .all(|v| v.as_deref().is_none_or(|v| crate::command::check_value(v).is_ok()))
                    }
                };
                if !rows.iter().all(valid) {
                    let reason = "the chunk holds rows no node can store".to_string();
                    reply(self, SnapFrame::Abort { stream, index, term, reason });
                    return Ok(());
                }
                let same = |s: &InStream| (s.from, s.stream, s.index, s.term) == (from, stream, index, term);
                if !self.incoming.as_ref().is_some_and(same) {
                    // Only the leader this node follows starts a transfer.
                    if seq != 0 || self.install_pending || from != self.raw.raft.leader_id {
                        // Part of a transfer this node is not (or no longer) staging: the
                        // leader's wait for acknowledgements times out and it starts over.
                        return Ok(());
                    }
                    self.raw.store().forget_frozen();
                    self.raw.store().with_backend(|b| b.clear_snapshot_store())?;
                    let (next_seq, complete, staged, last) = (0, false, 0, None);
                    self.incoming =
                        Some(InStream { from, stream, index, term, next_seq, complete, rows_total, staged, last });
                }
                let inc = self.incoming.as_mut().expect("set above");
                if seq < inc.next_seq {
                    reply(self, SnapFrame::Ack { stream, index, term, seq });
                } else if seq == inc.next_seq && !inc.complete {
                    // Never stage more than the transfer announced at its start.
                    if inc.staged + rows.len() as u64 > inc.rows_total || rows_total != inc.rows_total {
                        self.incoming = None;
                        self.raw.store().with_backend(|b| b.clear_snapshot_store())?;
                        let reason = "the transfer sent more rows than it announced".to_string();
                        reply(self, SnapFrame::Abort { stream, index, term, reason });
                        return Ok(());
                    }
                    // Rows come in the store's order, each after the one before: a row out of
                    // order or sent twice would be staged twice.
                    let mut after = inc.last.as_ref().map(Position::as_ref);
                    for r in &rows {
                        let p = r.position();
                        if after.as_ref().is_some_and(|l| p <= *l) {
                            self.incoming = None;
                            self.raw.store().with_backend(|b| b.clear_snapshot_store())?;
                            let reason = "the transfer sent rows out of order or twice".to_string();
                            reply(self, SnapFrame::Abort { stream, index, term, reason });
                            return Ok(());
                        }
                        after = Some(p);
                    }
                    let after = after.map(|p| p.to_owned());
                    let inc = self.incoming.as_mut().expect("still set");
                    inc.last = after;
                    inc.staged += rows.len() as u64;
                    inc.next_seq += 1;
                    inc.complete = last;
                    self.raw.store().with_backend(|b| b.stage_snapshot(&rows))?;
                    reply(self, SnapFrame::Ack { stream, index, term, seq });
                }
                Ok(())
            }
            SnapFrame::Ack { stream, seq, .. } => {
                let Some(s) = self.streams.get_mut(&from).filter(|s| s.stream == stream) else {
                    return Ok(());
                };
                if seq < s.acked || seq >= s.next_seq {
                    return Ok(());
                }
                while s.acked <= seq {
                    s.acked += 1;
                    s.starts.pop_front();
                }
                s.idle_ticks = 0;
                self.pump(from)
            }
            SnapFrame::Abort { index, term, .. } => {
                if self.streams.get(&from).is_some_and(|s| (s.index, s.term) == (index, term)) {
                    self.end_stream(from, true);
                }
                Ok(())
            }
        }
    }

    /// The transport could not take a frame or message for `to`: a transfer to it failed.
    pub fn send_failed(&mut self, to: u64) {
        if self.streams.contains_key(&to) {
            self.end_stream(to, true);
        }
    }

    /// Snapshot transfers in progress from this node, as (recipient, snapshot index).
    pub fn snapshot_transfers(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = self.streams.iter().map(|(to, s)| (*to, s.index)).collect();
        v.sort();
        v
    }

    pub(super) fn start_stream(&mut self, m: Message) -> Result<(), NodeError> {
        let to = m.to;
        let md = m.get_snapshot().get_metadata();
        self.streams_started += 1;
        let stream = (self.raw.raft.term << 32) | (self.streams_started & 0xffff_ffff);
        let rows_total = SnapshotData::decode(m.get_snapshot().get_data())
            .map(|d| d.kv_rows + d.request_rows + d.change_rows)
            .unwrap_or(0);
        let s = OutStream {
            stream,
            index: md.index,
            term: md.term,
            rows_total,
            msg: Some(m),
            cursor: Cursor::start(),
            starts: Default::default(),
            next_seq: 0,
            acked: 0,
            sent_last: false,
            idle_ticks: 0,
        };
        self.streams.insert(to, s);
        self.raw.store().set_streaming(true);
        self.pump(to)
    }

    /// Sends chunks to `to` while the window allows; after the last is acknowledged, the
    /// snapshot message itself. The stream then waits until raft sees the follower caught up.
    pub(super) fn pump(&mut self, to: u64) -> Result<(), NodeError> {
        loop {
            let Some(s) = self.streams.get_mut(&to) else { return Ok(()) };
            if s.sent_last {
                if s.acked == s.next_seq {
                    if let Some(m) = s.msg.take() {
                        s.idle_ticks = 0;
                        self.outbox.push(Outbound::Raft(m));
                    }
                }
                return Ok(());
            }
            if s.next_seq - s.acked >= WINDOW {
                return Ok(());
            }
            s.starts.push_back(s.cursor.clone());
            let mut rows = Vec::new();
            while rows.is_empty() && s.cursor != Cursor::Done {
                let (r, next) = self.raw.store().with_backend(|b| b.read_snapshot(&s.cursor, self.chunk_bytes))?;
                rows = r;
                s.cursor = next;
            }
            let last = s.cursor == Cursor::Done;
            let (stream, index, term, seq, rows_total) = (s.stream, s.index, s.term, s.next_seq, s.rows_total);
            let frame = SnapFrame::Chunk { stream, index, term, seq, rows, last, rows_total };
            s.next_seq += 1;
            s.sent_last = last;
            self.outbox.push(Outbound::Snap { to, frame });
        }
    }

    /// Snapshot transfers that failed since the last call, as (recipient, snapshot index);
    /// raft has been told and sends a snapshot again once the follower responds.
    pub fn take_failed_transfers(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.failed_transfers)
    }

    pub(super) fn end_stream(&mut self, to: u64, failed: bool) {
        let s = self.streams.remove(&to);
        self.raw.store().set_streaming(!self.streams.is_empty());
        if failed {
            if let Some(s) = s {
                self.failed_transfers.push((to, s.index));
            }
            self.raw.report_snapshot(to, SnapshotStatus::Failure);
        }
    }

    /// Ends the transfers whose snapshot the follower has taken (raft has left the snapshot
    /// state for it) and all of them once this node no longer leads.
    pub(super) fn finish_streams(&mut self) {
        if !self.is_leader() {
            self.streams.clear();
            self.raw.store().set_streaming(false);
            return;
        }
        let prs = self.raw.raft.prs();
        let done: Vec<u64> = self
            .streams
            .iter()
            .filter(|(to, s)| {
                s.msg.is_none()
                    && prs.get(**to).is_none_or(|p| p.state != ProgressState::Snapshot || p.pending_snapshot != s.index)
            })
            .map(|(to, _)| *to)
            .collect();
        for to in done {
            self.end_stream(to, false);
        }
    }

    /// Times out stalled transfers and sends lost chunks again.
    pub(super) fn tick_transfers(&mut self) -> Result<(), NodeError> {
        let mut failed = Vec::new();
        let mut resend = Vec::new();
        for (&to, s) in self.streams.iter_mut() {
            s.idle_ticks += 1;
            if s.idle_ticks > s.patience(self.snapshot_timeout_ticks) {
                failed.push(to);
            } else if s.idle_ticks % RESEND_TICKS == 0 && s.acked < s.next_seq {
                // A chunk or its acknowledgement was lost: go back to the first unacknowledged.
                s.cursor = s.starts.front().cloned().unwrap_or_else(|| s.cursor.clone());
                s.starts.clear();
                s.next_seq = s.acked;
                s.sent_last = false;
                resend.push(to);
            }
        }
        for to in failed {
            self.end_stream(to, true);
        }
        for to in resend {
            self.pump(to)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NodeOptions, Output};
    use super::*;
    use crate::mem_backend::MemBackend;
    use crate::snapshot::Row;
    use crate::types::Member;
    use raft::eraftpb::MessageType;

    /// Node 2 of a 3-node cluster, following node 1 in term 2.
    fn follower_of_1() -> Node<MemBackend> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let members: Vec<Member> =
            (1..=3).map(|id| Member { id, address: format!("sim:{id}"), promote: false }).collect();
        let mut n = Node::open(MemBackend::new(), &NodeOptions::new(2), &members, &logger).unwrap();
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        (hb.from, hb.to, hb.term) = (1, 2, 2);
        n.step(hb);
        assert_eq!(n.leader_id(), 1);
        n
    }

    fn sent(n: &mut Node<MemBackend>) -> Vec<Outbound> {
        let mut v = Vec::new();
        n.handle_ready(&mut Output::default(), &mut |m| v.push(m)).unwrap();
        v
    }

    #[test]
    fn a_transfer_sending_more_rows_than_it_announced_is_aborted() {
        let mut n = follower_of_1();
        let row = |k: &str| Row::Kv {
            key: k.into(),
            row: crate::types::KvRow { value: "v".into(), mod_revision: 1, create_revision: 1, version: 1, lease: 0 },
        };
        let chunk =
            |seq, rows, last| SnapFrame::Chunk { stream: 7, index: 50, term: 2, seq, rows, last, rows_total: 2 };
        n.receive_snap(1, chunk(0, vec![row("a"), row("b")], false)).unwrap();
        n.receive_snap(1, chunk(1, vec![row("c")], true)).unwrap();
        let frames: Vec<SnapFrame> = sent(&mut n)
            .into_iter()
            .filter_map(|m| match m {
                Outbound::Snap { to: 1, frame } => Some(frame),
                _ => None,
            })
            .collect();
        assert!(matches!(frames[0], SnapFrame::Ack { seq: 0, .. }), "{frames:?}");
        assert!(matches!(&frames[1], SnapFrame::Abort { reason, .. } if reason.contains("more rows")), "{frames:?}");
        assert!(n.storage().with_backend(|b| b.inner.lock().unwrap().snap_kv.is_empty()), "staging emptied");
    }

    fn frames_to_1(n: &mut Node<MemBackend>) -> Vec<SnapFrame> {
        sent(n)
            .into_iter()
            .filter_map(|m| match m {
                Outbound::Snap { to: 1, frame } => Some(frame),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn rows_out_of_the_stores_order_or_sent_twice_abort_the_transfer() {
        let kv = |k: &str| Row::Kv {
            key: k.into(),
            row: crate::types::KvRow { value: "v".into(), mod_revision: 1, create_revision: 1, version: 1, lease: 0 },
        };
        let id = |nonce: u64, seq| Row::Request { nonce, seq, node: 1, revision: 1, flag: false };
        let chunk =
            |seq, rows, last| SnapFrame::Chunk { stream: 7, index: 50, term: 2, seq, rows, last, rows_total: 9 };
        let aborted = |frames: &[SnapFrame]| {
            frames.iter().any(|f| matches!(f, SnapFrame::Abort { reason, .. } if reason.contains("out of order")))
        };

        // In order: keys by bytes, then request ids as signed bigints (a nonce with the top
        // bit set comes first), across chunks.
        let mut n = follower_of_1();
        n.receive_snap(1, chunk(0, vec![kv("a"), kv("b")], false)).unwrap();
        n.receive_snap(1, chunk(1, vec![kv("c"), id(u64::MAX, 1), id(3, 1)], false)).unwrap();
        n.receive_snap(1, chunk(2, vec![id(3, 2)], false)).unwrap();
        let frames = frames_to_1(&mut n);
        assert!(!aborted(&frames), "{frames:?}");
        assert_eq!(frames.len(), 3, "every chunk acknowledged: {frames:?}");

        // A key of the chunk before, sent again in the next one.
        let mut n = follower_of_1();
        n.receive_snap(1, chunk(0, vec![kv("a"), kv("b")], false)).unwrap();
        n.receive_snap(1, chunk(1, vec![kv("b"), kv("c")], false)).unwrap();
        assert!(aborted(&frames_to_1(&mut n)));
        assert!(n.storage().with_backend(|b| b.inner.lock().unwrap().snap_kv.is_empty()), "staging emptied");

        // Out of order within one chunk; and a kv row after the request ids.
        for rows in [vec![kv("b"), kv("a")], vec![id(1, 1), kv("z")]] {
            let mut n = follower_of_1();
            n.receive_snap(1, chunk(0, rows, false)).unwrap();
            assert!(aborted(&frames_to_1(&mut n)));
            assert!(n.storage().with_backend(|b| b.inner.lock().unwrap().snap_kv.is_empty()), "nothing staged");
        }
    }

    /// A leader with a transfer to node 2 of `rows_total` rows, every chunk acknowledged and
    /// the snapshot message sent: node 2 is installing.
    fn leader_waiting_for_an_install(rows_total: u64) -> Node<MemBackend> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let one = Member { id: 1, address: "a".into(), promote: false };
        let mut n = Node::open(MemBackend::new(), &NodeOptions::new(1), &[one], &logger).unwrap();
        while !n.is_leader() {
            n.tick().unwrap();
            n.handle_ready(&mut Output::default(), &mut |_| {}).unwrap();
        }
        let s = OutStream {
            stream: 1,
            index: 10,
            term: 1,
            msg: None,
            cursor: Cursor::Done,
            starts: Default::default(),
            next_seq: 3,
            acked: 3,
            sent_last: true,
            idle_ticks: 0,
            rows_total,
        };
        n.streams.insert(2, s);
        n
    }

    fn ticks_until_failed(n: &mut Node<MemBackend>) -> u32 {
        for t in 1..=1_000_000 {
            n.tick_transfers().unwrap();
            if !n.take_failed_transfers().is_empty() {
                return t;
            }
        }
        panic!("the transfer never timed out")
    }

    #[test]
    fn a_follower_installing_a_large_snapshot_is_given_time_in_proportion() {
        let timeout = NodeOptions::new(1).snapshot_timeout_ticks;
        let mut small = leader_waiting_for_an_install(10);
        assert_eq!(ticks_until_failed(&mut small), timeout + 1);
        // A million rows took 16 s to install here (160 ticks), past the 100-tick timeout.
        let mut large = leader_waiting_for_an_install(2_000_000);
        assert_eq!(ticks_until_failed(&mut large), timeout + 2_000 + 1);
        // While chunks are still being sent, the plain timeout applies.
        let mut sending = leader_waiting_for_an_install(2_000_000);
        sending.streams.get_mut(&2).unwrap().sent_last = false;
        assert_eq!(ticks_until_failed(&mut sending), timeout + 1);
    }

    #[test]
    fn only_the_leader_starts_a_transfer() {
        let mut n = follower_of_1();
        let rows = vec![Row::Kv {
            key: "a".into(),
            row: crate::types::KvRow { value: "v".into(), mod_revision: 1, create_revision: 1, version: 1, lease: 0 },
        }];
        let frame = SnapFrame::Chunk { stream: 7, index: 50, term: 2, seq: 0, rows, last: true, rows_total: 1 };
        n.receive_snap(3, frame).unwrap();
        assert!(sent(&mut n).iter().all(|m| !matches!(m, Outbound::Snap { .. })), "node 3 is not the leader");
        assert!(n.storage().with_backend(|b| b.inner.lock().unwrap().snap_kv.is_empty()));
    }
}
