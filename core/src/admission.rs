//! What a peer's message must satisfy before it reaches raft.
//!
//! raft-rs trusts its peers: a few malformed messages make it panic (`fatal!`) or disrupt
//! the cluster. A peer is authenticated, but may still be buggy or compromised, so every
//! message from the network passes these checks first, and one that fails is dropped.
//! Each rule names the raft-rs behaviour it guards against.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message, MessageType};

use crate::command::Proposal;
use crate::types::ConfChangeContext;

/// What admission needs to know of the local raft state.
pub struct View<'a> {
    pub id: u64,
    pub leader_id: u64,
    pub is_leader: bool,
    pub committed: u64,
    pub last_index: u64,
    /// The term of a log entry this node holds, if it holds it.
    pub term_at: &'a dyn Fn(u64) -> Option<u64>,
}

/// Why a message was dropped.
pub type Reason = &'static str;

pub fn check(m: &Message, v: &View<'_>) -> Result<(), Reason> {
    use MessageType::*;
    if m.to != v.id {
        return Err("addressed to another node");
    }
    if m.from == 0 || m.from == v.id {
        return Err("from an invalid sender id");
    }
    let t = m.get_msg_type();
    if matches!(t, MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum) {
        // Local messages: a peer could force elections with them.
        return Err("a local-only message type");
    }
    // raft-rs takes term 0 for a local message (a heartbeat's commit would then be applied
    // unchecked); only forwarded proposals and read requests carry it, and always carry it: a
    // follower forwards them on, and raft-rs's send() is fatal for one with a term set.
    let forwarded = matches!(t, MsgPropose | MsgReadIndex);
    if (m.term == 0) != forwarded {
        return Err(if forwarded { "a forwarded request with a term" } else { "term 0" });
    }
    // A follower would forward a transfer request again, term and all: fatal in send().
    if t == MsgTransferLeader && !v.is_leader {
        return Err("a leadership transfer request to a node that is not the leader");
    }
    match t {
        // "stepped empty MsgProp" is fatal in raft-rs.
        MsgPropose if m.entries.is_empty() => Err("an empty proposal"),
        MsgPropose => m.entries.iter().try_for_each(check_proposed),
        // raft-rs indexes entries[0] of read requests.
        MsgReadIndex | MsgReadIndexResp if m.entries.len() != 1 => Err("a read index request without one context"),
        // commit_to() beyond the last index is fatal; a leader never sends that.
        MsgHeartbeat if m.commit > v.last_index => Err("a heartbeat committing beyond this node's log"),
        MsgAppend => check_append(m, v),
        MsgAppendResponse if !m.reject && m.index > v.last_index => {
            Err("an acknowledgement of entries this node does not have")
        }
        // Only the leader may tell a follower to campaign at once.
        MsgTimeoutNow if m.from != v.leader_id => Err("a campaign order from a node that is not the leader"),
        _ => Ok(()),
    }
}

/// A proposal forwarded by a follower: entries not yet in any log, that decode.
fn check_proposed(e: &Entry) -> Result<(), Reason> {
    if e.index != 0 || e.term != 0 {
        return Err("a proposal with log positions");
    }
    match e.get_entry_type() {
        EntryType::EntryNormal if e.data.is_empty() => Ok(()),
        EntryType::EntryNormal => match Proposal::decode(&e.data) {
            Ok(p) => p.cmd.validate(),
            // A leader never logs what it could not apply itself (a newer member must not
            // propose a new format before every member reads it).
            Err(crate::codec::DecodeError::NewerVersion { .. }) => {
                Err("a proposal in a newer format than this leader's")
            }
            Err(_) => Err("an undecodable proposal"),
        },
        EntryType::EntryConfChange => {
            ConfChange::parse_from_bytes(&e.data).map_err(|_| "an undecodable membership change")?;
            check_context(e)
        }
        EntryType::EntryConfChangeV2 => {
            ConfChangeV2::parse_from_bytes(&e.data).map_err(|_| "an undecodable membership change")?;
            check_context(e)
        }
    }
}

fn check_context(e: &Entry) -> Result<(), Reason> {
    let ctx = ConfChangeContext::decode(&e.context).ok_or("a membership change without a request")?;
    match ctx.address {
        // Stored as text and shown in a fixed-size status row.
        Some(a) if a.len() > 64 || a.contains('\0') => Err("a membership change with a malformed address"),
        _ => Ok(()),
    }
}

/// raft-rs's maybe_append() is fatal when new entries conflict with a committed one.
fn check_append(m: &Message, v: &View<'_>) -> Result<(), Reason> {
    // raft-rs reads the term of an index past its log as 0, so a term-0 predecessor would
    // "match" anywhere, and the commit that follows would run past the log: fatal.
    if m.index > 0 && m.log_term == 0 {
        return Err("an append whose predecessor has term 0");
    }
    let mut term = m.log_term;
    for (expect, e) in (m.index + 1..).zip(m.entries.iter()) {
        if e.index != expect || e.term == 0 || e.term < term || e.term > m.term {
            return Err("entries out of order");
        }
        if e.index <= v.committed && (v.term_at)(e.index).is_some_and(|t| t != e.term) {
            return Err("entries that conflict with committed ones");
        }
        term = e.term;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, RequestId};

    fn view() -> View<'static> {
        // Entries 1..=10 in term 2, committed up to 8; leader 1.
        View {
            id: 2,
            leader_id: 1,
            is_leader: false,
            committed: 8,
            last_index: 10,
            term_at: &|i| (i <= 10).then_some(2),
        }
    }

    fn msg(t: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = 1;
        m.to = 2;
        m.term = 2;
        m
    }

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e
    }

    #[test]
    fn well_formed_messages_pass() {
        let v = view();
        assert_eq!(check(&msg(MessageType::MsgHeartbeat), &v), Ok(()));
        let mut app = msg(MessageType::MsgAppend);
        app.index = 10;
        app.log_term = 2;
        app.entries = vec![entry(11, 2), entry(12, 2)].into();
        assert_eq!(check(&app, &v), Ok(()));
        let mut prop = msg(MessageType::MsgPropose);
        prop.term = 0;
        let mut e = Entry::default();
        let cmd = Command::Put { key: "k".into(), value: "v".into() };
        e.data = Proposal { id: RequestId { node: 1, nonce: 1, seq: 1 }, cmd }.encode().into();
        prop.entries = vec![e].into();
        assert_eq!(check(&prop, &v), Ok(()));
    }

    #[test]
    fn malformed_messages_are_dropped() {
        let v = view();
        let with = |t, f: &dyn Fn(&mut Message)| {
            let mut m = msg(t);
            f(&mut m);
            check(&m, &v)
        };
        use MessageType::*;
        assert!(with(MsgPropose, &|m| m.term = 0).is_err(), "empty proposal");
        assert!(with(MsgHeartbeat, &|m| m.term = 0).is_err(), "term 0");
        assert!(with(MsgHeartbeat, &|m| m.commit = 11).is_err(), "commit beyond the log");
        assert!(with(MsgHup, &|_| {}).is_err(), "local type");
        assert!(with(MsgHeartbeat, &|m| m.to = 3).is_err(), "another recipient");
        assert!(with(MsgTimeoutNow, &|m| m.from = 3).is_err(), "not the leader");
        assert!(with(MsgReadIndex, &|_| {}).is_err(), "no context");
        assert!(with(MsgAppendResponse, &|m| m.index = 11).is_err(), "acks the unknown");
        assert!(
            with(MsgAppend, &|m| {
                m.index = 5;
                m.log_term = 2;
                m.term = 3;
                m.entries = vec![entry(6, 3)].into();
            })
            .is_err(),
            "rewrites committed entry 6"
        );
        assert!(with(MsgAppend, &|m| m.entries = vec![entry(3, 2), entry(5, 2)].into()).is_err(), "gap");
        assert!(
            with(MsgAppend, &|m| {
                m.index = 25;
                m.commit = 25;
            })
            .is_err(),
            "a term-0 predecessor past the log (its commit would be fatal)"
        );
        assert!(with(MsgPropose, &|m| m.entries = vec![Entry::default()].into()).is_err(), "a proposal with a term");
        assert!(with(MsgTransferLeader, &|_| {}).is_err(), "a transfer request to a follower");
        assert!(
            with(MsgPropose, &|m| {
                let mut e = Entry::default();
                e.data = vec![0xff, 0xfe].into();
                m.entries = vec![e].into();
            })
            .is_err(),
            "garbage proposal"
        );
        assert!(
            with(MsgPropose, &|m| {
                let mut e = Entry::default();
                let cmd = Command::Put { key: "k\0".into(), value: "v".into() };
                e.data = Proposal { id: RequestId { node: 1, nonce: 1, seq: 1 }, cmd }.encode().into();
                m.entries = vec![e].into();
            })
            .is_err(),
            "a NUL in a key"
        );
    }
}
