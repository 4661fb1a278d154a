//! Merges a Ready's consecutive appends to the same follower into one message.
//!
//! Every proposal makes raft send its own `MsgAppend` to each follower, so a pass that proposes
//! ten writes sends ten messages to each, and each follower answers each: at 32 clients that
//! was a tenth of the cluster's CPU per write (measured, BENCHMARKS.md). raft-rs's own
//! `batch_append` does this merge without a size limit, and a merged message could then exceed
//! the transport's frame limit and be dropped; here a merge stops at raft's `max_size_per_msg`.
//! A follower that took several appends in one pass likewise sends only its last
//! acknowledgement of them.

use raft::eraftpb::{Message, MessageType};
use std::collections::HashMap;

/// `msgs` in order, each `MsgAppend` folded into the previous message to the same peer when
/// that one is a `MsgAppend` of the same term whose entries it continues and the sum stays
/// within `max_bytes`. The merged message carries the later (higher) commit index. Messages to
/// other peers may sit in between: only per-peer order matters on the wire.
pub fn coalesce_appends(msgs: Vec<Message>, max_bytes: u64) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(msgs.len());
    // Per peer: where its last message is in `out`, and that message's entry bytes.
    let mut last: HashMap<u64, (usize, u64)> = HashMap::new();
    for m in msgs {
        let bytes = entry_bytes(&m);
        if m.get_msg_type() == MessageType::MsgAppend {
            if let Some(&(at, held)) = last.get(&m.to) {
                let p = &mut out[at];
                if continues(p, &m) && held + bytes <= max_bytes {
                    let m_commit = m.commit;
                    p.mut_entries().extend(m.entries.into_iter());
                    p.commit = p.commit.max(m_commit);
                    last.insert(p.to, (at, held + bytes));
                    continue;
                }
            }
        }
        last.insert(m.to, (out.len(), bytes));
        out.push(m);
    }
    out
}

/// Drops each successful `MsgAppendResponse` that a later one to the same peer, in the same
/// term, supersedes: the leader takes an acknowledgement of index `i` as one of everything up to
/// `i`, so only the highest matters (and raft tolerates the loss of any). Rejections and every
/// other message stay, in order.
pub fn drop_superseded_acks(msgs: &mut Vec<Message>) {
    let is_ack = |m: &Message| m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject;
    if msgs.iter().filter(|m| is_ack(m)).count() < 2 {
        return;
    }
    // Per (peer, term): the highest index acknowledged, and the position of its last ack.
    let mut best: HashMap<(u64, u64), (u64, usize)> = HashMap::new();
    for (at, m) in msgs.iter().enumerate() {
        if is_ack(m) {
            let e = best.entry((m.to, m.term)).or_insert((m.index, at));
            if m.index >= e.0 {
                *e = (m.index, at);
            }
        }
    }
    let mut at = 0;
    msgs.retain(|m| {
        let keep = !is_ack(m) || best.get(&(m.to, m.term)).is_some_and(|&(_, last)| last == at);
        at += 1;
        keep
    });
}

/// `m` is an append that picks up exactly where `p`, an append of the same term, ends.
fn continues(p: &Message, m: &Message) -> bool {
    if p.get_msg_type() != MessageType::MsgAppend || p.term != m.term {
        return false;
    }
    let (end_index, end_term) = match p.entries.last() {
        Some(e) => (e.index, e.term),
        None => (p.index, p.log_term),
    };
    m.index == end_index && m.log_term == end_term
}

fn entry_bytes(m: &Message) -> u64 {
    m.entries.iter().map(|e| (e.data.len() + e.context.len()) as u64 + 16).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::Entry;

    fn append(to: u64, term: u64, prev: (u64, u64), ents: &[(u64, u64)], commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = to;
        m.from = 1;
        m.term = term;
        m.index = prev.0;
        m.log_term = prev.1;
        m.commit = commit;
        for &(index, term) in ents {
            let mut e = Entry::default();
            e.index = index;
            e.term = term;
            e.data = vec![0u8; 100].into();
            m.mut_entries().push(e);
        }
        m
    }

    fn heartbeat(to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.to = to;
        m.from = 1;
        m.term = 3;
        m
    }

    fn indexes(m: &Message) -> Vec<u64> {
        m.entries.iter().map(|e| e.index).collect()
    }

    #[test]
    fn consecutive_appends_to_each_peer_become_one() {
        let out = coalesce_appends(
            vec![
                append(2, 3, (10, 3), &[(11, 3)], 10),
                append(3, 3, (10, 3), &[(11, 3)], 10),
                append(2, 3, (11, 3), &[(12, 3)], 10),
                append(3, 3, (11, 3), &[(12, 3)], 10),
                append(2, 3, (12, 3), &[(13, 3), (14, 3)], 11),
            ],
            1 << 20,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].to, indexes(&out[0]), out[0].index, out[0].log_term, out[0].commit),
            (2, vec![11, 12, 13, 14], 10, 3, 11)
        );
        assert_eq!((out[1].to, indexes(&out[1]), out[1].commit), (3, vec![11, 12], 10));
    }

    #[test]
    fn a_commit_only_append_takes_the_entries_that_follow_it() {
        // Acknowledgements advanced the commit (an empty append), then a proposal followed.
        let out =
            coalesce_appends(vec![append(2, 3, (10, 3), &[], 10), append(2, 3, (10, 3), &[(11, 3)], 10)], 1 << 20);
        assert_eq!(out.len(), 1);
        assert_eq!((indexes(&out[0]), out[0].index, out[0].commit), (vec![11], 10, 10));
        // And an empty append after entries only carries its commit forward.
        let out =
            coalesce_appends(vec![append(2, 3, (10, 3), &[(11, 3)], 10), append(2, 3, (11, 3), &[], 11)], 1 << 20);
        assert_eq!(out.len(), 1);
        assert_eq!((indexes(&out[0]), out[0].commit), (vec![11], 11));
    }

    #[test]
    fn what_does_not_continue_stays_apart() {
        // A gap, a different term, a different previous term, another message in between.
        let gap = coalesce_appends(
            vec![append(2, 3, (10, 3), &[(11, 3)], 10), append(2, 3, (12, 3), &[(13, 3)], 10)],
            1 << 20,
        );
        assert_eq!(gap.len(), 2);
        let term = coalesce_appends(
            vec![append(2, 3, (10, 3), &[(11, 3)], 10), append(2, 4, (11, 3), &[(12, 4)], 10)],
            1 << 20,
        );
        assert_eq!(term.len(), 2);
        let prev_term = coalesce_appends(
            vec![append(2, 3, (10, 3), &[(11, 2)], 10), append(2, 3, (11, 3), &[(12, 3)], 10)],
            1 << 20,
        );
        assert_eq!(prev_term.len(), 2);
        let between = coalesce_appends(
            vec![append(2, 3, (10, 3), &[(11, 3)], 10), heartbeat(2), append(2, 3, (11, 3), &[(12, 3)], 10)],
            1 << 20,
        );
        assert_eq!(
            between.iter().map(|m| m.get_msg_type()).collect::<Vec<_>>(),
            [MessageType::MsgAppend, MessageType::MsgHeartbeat, MessageType::MsgAppend]
        );
        // A heartbeat to another peer does not separate them.
        let other = coalesce_appends(
            vec![append(2, 3, (10, 3), &[(11, 3)], 10), heartbeat(3), append(2, 3, (11, 3), &[(12, 3)], 10)],
            1 << 20,
        );
        assert_eq!(other.len(), 2);
        assert_eq!(indexes(&other[0]), vec![11, 12]);
    }

    fn ack(to: u64, term: u64, index: u64, reject: bool) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppendResponse);
        m.to = to;
        m.from = 2;
        m.term = term;
        m.index = index;
        m.reject = reject;
        m
    }

    #[test]
    fn only_the_highest_acknowledgement_goes() {
        let mut msgs = vec![ack(1, 3, 11, false), heartbeat(1), ack(1, 3, 13, false), ack(1, 3, 12, false)];
        drop_superseded_acks(&mut msgs);
        let got: Vec<_> = msgs.iter().map(|m| (m.get_msg_type(), m.index)).collect();
        assert_eq!(got, [(MessageType::MsgHeartbeat, 0), (MessageType::MsgAppendResponse, 13)]);
        // Rejections, other terms and other peers are kept.
        let mut msgs = vec![
            ack(1, 3, 11, false),
            ack(1, 3, 9, true),
            ack(1, 4, 12, false),
            ack(5, 4, 12, false),
            ack(1, 4, 14, false),
        ];
        drop_superseded_acks(&mut msgs);
        let got: Vec<_> = msgs.iter().map(|m| (m.to, m.term, m.index, m.reject)).collect();
        assert_eq!(got, [(1, 3, 11, false), (1, 3, 9, true), (5, 4, 12, false), (1, 4, 14, false)]);
    }

    #[test]
    fn a_merge_stops_at_the_size_limit() {
        // Each entry counts 116 bytes: two fit in 300, a third does not.
        let msgs = (0..5).map(|i| append(2, 3, (10 + i, 3), &[(11 + i, 3)], 10)).collect();
        let out = coalesce_appends(msgs, 300);
        assert_eq!(out.iter().map(indexes).collect::<Vec<_>>(), vec![vec![11, 12], vec![13, 14], vec![15]]);
        // A single message over the limit goes as it is (raft sends at least one entry).
        let out = coalesce_appends(vec![append(2, 3, (10, 3), &[(11, 3), (12, 3), (13, 3)], 10)], 100);
        assert_eq!(out.len(), 1);
    }
}
