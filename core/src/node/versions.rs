//! Which format version each member runs, so that a command older members cannot read is
//! proposed only once every member reads it (the mixed-version window of a rolling upgrade).
//!
//! The versions travel in the context of raft messages whose context raft-rs leaves unused: a
//! follower tags its `MsgAppendResponse` with its own format and version; the leader tags its
//! `MsgAppend` and its context-free `MsgHeartbeat` with the cluster's format (the lowest any
//! member reports) and every member's version. Builds before 0.2.0 neither send nor read tags,
//! so a member that has sent none counts as format 1. A follower echoes a heartbeat's context
//! in its response; the two tags have different magics, and only a follower's tag on an
//! append response is taken as that follower's version.

use std::collections::BTreeMap;

use raft::eraftpb::{Message, MessageType};

const FOLLOWER: &[u8; 4] = b"rkvF";
const LEADER: &[u8; 4] = b"rkvL";

/// Format of a member that has not said: the first versioned format, which every build reads.
pub const UNTAGGED_FORMAT: u8 = 1;

/// A member's format version and library version.
pub type MemberVersion = (u8, String);

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Tag {
    format: u8,
    version: String,
    /// Leader tags: the cluster's format (0: not known yet), and every member's version as the
    /// leader knows it.
    cluster: u8,
    members: Vec<(u64, u8, String)>,
}

/// The contexts a node's messages carry: its follower tag, and as leader its leader tag.
pub struct Tags {
    follower: bytes::Bytes,
    leader: Option<bytes::Bytes>,
}

impl Tags {
    /// Tags an outgoing message where raft-rs leaves the context unused: a follower's append
    /// response; a leader's append, and its heartbeat unless it carries a ReadIndex context.
    pub fn apply(&self, m: &mut Message) {
        if !m.context.is_empty() {
            return;
        }
        match (m.get_msg_type(), &self.leader) {
            (MessageType::MsgAppendResponse, _) => m.context = self.follower.clone(),
            (MessageType::MsgAppend | MessageType::MsgHeartbeat, Some(l)) => m.context = l.clone(),
            _ => {}
        }
    }
}

#[derive(Debug, Clone)]
pub struct Versions {
    mine: MemberVersion,
    /// The tag a follower's append responses carry: always the same.
    follower_tag: bytes::Bytes,
    /// On the leader: what followers reported. On a follower: what its leader relayed.
    known: BTreeMap<u64, MemberVersion>,
    /// On a follower: the cluster format its leader last stated, and which leader stated it.
    relayed: (u64, u8),
}

fn encode(magic: &[u8; 4], t: &Tag) -> Vec<u8> {
    let mut v = magic.to_vec();
    v.extend(crate::codec::encode(t));
    v
}

/// Longest version string kept (`raft_members()` shows at most this).
const MAX_VERSION_BYTES: usize = 16;

/// A tag, if well formed and of a sane size: a member's tag is authenticated but still not
/// trusted to be small.
fn decode(magic: &[u8; 4], ctx: &[u8]) -> Option<Tag> {
    let t: Tag = crate::codec::decode(ctx.strip_prefix(magic.as_slice())?).ok()?;
    let sane = t.version.len() <= MAX_VERSION_BYTES
        && t.members.len() <= crate::config::MAX_MEMBERS
        && t.members.iter().all(|m| m.2.len() <= MAX_VERSION_BYTES);
    sane.then_some(t)
}

impl Versions {
    pub fn new(version: &str) -> Self {
        let mine =
            Tag { format: crate::codec::FORMAT_VERSION, version: version.to_string(), cluster: 0, members: Vec::new() };
        Versions {
            follower_tag: encode(FOLLOWER, &mine).into(),
            mine: (crate::codec::FORMAT_VERSION, version.to_string()),
            known: BTreeMap::new(),
            relayed: (0, UNTAGGED_FORMAT),
        }
    }

    /// The lowest format among `members` (this node included), as the leader computes it.
    fn lowest(&self, me: u64, members: &[u64]) -> u8 {
        members
            .iter()
            .map(|id| if *id == me { self.mine.0 } else { self.known.get(id).map_or(UNTAGGED_FORMAT, |v| v.0) })
            .min()
            .unwrap_or(self.mine.0)
            .min(self.mine.0)
    }

    /// The newest format every member reads: computed on the leader (`settled`: it has led
    /// long enough for every member of this build to have answered; until then a member that
    /// has not said leaves it unknown), as the current leader last relayed it on a follower.
    /// `None`: not known yet.
    pub fn cluster_format(&self, me: u64, leader: u64, members: &[u64], settled: bool) -> Option<u8> {
        if leader == me {
            let unheard = members.iter().any(|id| *id != me && !self.known.contains_key(id));
            (settled || !unheard).then(|| self.lowest(me, members))
        } else if self.relayed.0 == leader && leader != 0 && self.relayed.1 != 0 {
            Some(self.relayed.1.min(self.mine.0))
        } else {
            None
        }
    }

    /// The contexts this node's messages carry now (see [`Tags::apply`]): built once per
    /// Ready, so tagging a message only shares bytes.
    /// `settled` as for [`Versions::cluster_format`]: until then a leader that has not heard
    /// from every member says the cluster's format is not known, so followers wait rather than
    /// refuse.
    pub fn tags(&self, me: u64, leader: u64, members: &[u64], settled: bool) -> Tags {
        Tags {
            follower: self.follower_tag.clone(),
            leader: (leader == me).then(|| {
                let t = Tag {
                    format: self.mine.0,
                    version: self.mine.1.clone(),
                    cluster: self.cluster_format(me, leader, members, settled).unwrap_or(0),
                    members: members
                        .iter()
                        .filter_map(|&id| self.version_of(me, id).map(|(f, v)| (id, f, v)))
                        .collect(),
                };
                encode(LEADER, &t).into()
            }),
        }
    }

    /// Tags one message (the tests'; the node tags through [`Versions::tags`]).
    #[cfg(test)]
    pub fn tag(&self, m: &mut Message, me: u64, leader: u64, members: &[u64]) {
        self.tags(me, leader, members, true).apply(m)
    }

    /// Learns from an incoming message: a follower's version from its append response, the
    /// cluster's format and the members' versions from the leader's appends and heartbeats.
    pub fn observe(&mut self, m: &Message, me: u64) {
        match m.get_msg_type() {
            MessageType::MsgAppendResponse => {
                if let Some(t) = decode(FOLLOWER, &m.context) {
                    self.known.insert(m.from, (t.format, t.version));
                }
            }
            MessageType::MsgAppend | MessageType::MsgHeartbeat => {
                if let Some(t) = decode(LEADER, &m.context) {
                    self.relayed = (m.from, t.cluster);
                    self.known =
                        t.members.into_iter().filter(|(id, ..)| *id != me).map(|(id, f, v)| (id, (f, v))).collect();
                    self.known.insert(m.from, (t.format, t.version));
                } else if m.context.is_empty() {
                    // A leader that does not tag is older than versioned tags.
                    self.relayed = (m.from, UNTAGGED_FORMAT);
                    self.known.clear();
                }
            }
            _ => {}
        }
    }

    /// A member's format and version, as far as this node knows (`None`: it has not said).
    pub fn version_of(&self, me: u64, id: u64) -> Option<MemberVersion> {
        if id == me {
            Some(self.mine.clone())
        } else {
            self.known.get(&id).cloned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: MessageType, from: u64, to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = from;
        m.to = to;
        m
    }

    #[test]
    fn the_cluster_format_is_the_lowest_any_member_reports() {
        let members = [1, 2, 3];
        let mut leader = Versions::new("0.2.0");
        let mut follower = Versions::new("0.2.0");
        assert_eq!(follower.cluster_format(2, 1, &members, false), None, "no leader heard yet");
        // A young leader that has heard from nobody tells followers it does not know yet.
        let mut early = msg(MessageType::MsgHeartbeat, 1, 2);
        leader.tags(1, 1, &members, false).apply(&mut early);
        follower.observe(&early, 2);
        assert_eq!(follower.cluster_format(2, 1, &members, false), None, "wait, do not refuse");
        // Nobody has said anything: unknown while the leadership is young, then the untagged format.
        assert_eq!(leader.cluster_format(1, 1, &members, false), None);
        assert_eq!(leader.cluster_format(1, 1, &members, true), Some(UNTAGGED_FORMAT));
        // Node 2 (new) answers an append with its tag; node 3 (old) answers untagged.
        let mut r = msg(MessageType::MsgAppendResponse, 2, 1);
        follower.tag(&mut r, 2, 1, &members);
        leader.observe(&r, 1);
        leader.observe(&msg(MessageType::MsgAppendResponse, 3, 1), 1);
        assert_eq!(leader.cluster_format(1, 1, &members, true), Some(UNTAGGED_FORMAT), "node 3 has not said");
        assert_eq!(leader.version_of(1, 2), Some((crate::codec::FORMAT_VERSION, "0.2.0".into())));
        assert_eq!(leader.version_of(1, 3), None);
        let old = Versions::new("0.2.0");
        let mut r3 = msg(MessageType::MsgAppendResponse, 3, 1);
        old.tag(&mut r3, 3, 1, &members);
        leader.observe(&r3, 1);
        assert_eq!(leader.cluster_format(1, 1, &members, false), Some(crate::codec::FORMAT_VERSION));
        // The leader relays it to followers in appends and heartbeats.
        let mut hb = msg(MessageType::MsgHeartbeat, 1, 2);
        leader.tag(&mut hb, 1, 1, &members);
        follower.observe(&hb, 2);
        assert_eq!(follower.cluster_format(2, 1, &members, false), Some(crate::codec::FORMAT_VERSION));
        assert_eq!(follower.version_of(2, 3), Some((crate::codec::FORMAT_VERSION, "0.2.0".into())));
        // Another leader that does not tag (an older build): back to the untagged format.
        follower.observe(&msg(MessageType::MsgHeartbeat, 3, 2), 2);
        assert_eq!(follower.cluster_format(2, 3, &members, false), Some(UNTAGGED_FORMAT));
        // Before a new leader has said anything: unknown.
        assert_eq!(follower.cluster_format(2, 1, &members, false), None);
    }

    #[test]
    fn echoed_and_read_index_contexts_are_left_alone() {
        let members = [1, 2];
        let mut leader = Versions::new("0.2.0");
        // A heartbeat carrying a ReadIndex context is not tagged.
        let mut hb = msg(MessageType::MsgHeartbeat, 1, 2);
        hb.context = b"read-42".to_vec().into();
        leader.tag(&mut hb, 1, 1, &members);
        assert_eq!(&hb.context[..], b"read-42");
        // A follower's heartbeat response echoing the leader's tag is not a version report.
        let mut tagged = msg(MessageType::MsgHeartbeat, 1, 2);
        leader.tag(&mut tagged, 1, 1, &members);
        let mut echo = msg(MessageType::MsgHeartbeatResponse, 2, 1);
        echo.context = tagged.context.clone();
        leader.observe(&echo, 1);
        assert_eq!(leader.version_of(1, 2), None);
        // Followers do not tag heartbeat responses; non-leaders do not tag appends.
        let mut resp = msg(MessageType::MsgHeartbeatResponse, 2, 1);
        Versions::new("x").tag(&mut resp, 2, 1, &members);
        assert!(resp.context.is_empty());
        let mut app = msg(MessageType::MsgAppend, 2, 1);
        Versions::new("x").tag(&mut app, 2, 1, &members);
        assert!(app.context.is_empty());
    }

    #[test]
    fn oversized_tags_are_ignored() {
        let mut leader = Versions::new("0.2.0");
        let mut r = msg(MessageType::MsgAppendResponse, 2, 1);
        Versions::new(&"9".repeat(100)).tag(&mut r, 2, 1, &[1, 2]);
        leader.observe(&r, 1);
        assert_eq!(leader.version_of(1, 2), None, "a version string too long");
        let mut follower = Versions::new("0.2.0");
        let many: Vec<(u64, u8, String)> = (1..=100).map(|id| (id, 2, "0.2.0".to_string())).collect();
        let t = Tag { format: 2, version: "0.2.0".into(), cluster: 2, members: many };
        let mut hb = msg(MessageType::MsgHeartbeat, 1, 2);
        hb.context = encode(LEADER, &t).into();
        follower.observe(&hb, 2);
        assert_eq!(follower.cluster_format(2, 1, &[1, 2], false), None, "too many members: ignored");
        assert_eq!(follower.version_of(2, 50), None);
    }
}
