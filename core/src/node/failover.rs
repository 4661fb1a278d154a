//! Early elections when the leader's process is known to be gone.
//!
//! A follower cannot tell a dead leader from a slow one by silence alone, so raft waits out a
//! randomized election timeout (1–2 s at the defaults). But when the leader's process dies,
//! its kernel closes or resets its connections at once, and a reconnect is refused: the
//! transport sees that within milliseconds and reports the peer gone. A follower told so
//! (`peer_gone`) does two things:
//!
//! - It gives up its lease on the leader (`election_elapsed` = the election timeout), so it
//!   grants the pre-votes and votes of others at once instead of ignoring them for the rest
//!   of the timeout (check-quorum's rule).
//! - If it is a voter, it moves its own election deadline to the next tick, staggered by its
//!   rank among the surviving voters (lowest id first, `STAGGER_TICKS` apart), so that
//!   normally one node campaigns and the others vote for it instead of splitting the vote.
//!
//! Why this is safe: Raft's safety never depends on when a node votes or campaigns; leases
//! only keep a healthy leader from being disturbed, and raft_kv serves no read from a lease
//! (reads use ReadIndex, which asks a quorum). Why it does not disturb a healthy cluster: the
//! campaign is a pre-vote, which changes no term, and a voter that still hears the leader
//! ignores it (its lease holds). A follower whose link merely flapped therefore becomes a
//! pre-candidate that wins nothing, and follows the leader again at its next heartbeat, with
//! no term change. The election timeout stays the fallback for a silent leader (power loss,
//! a partition without resets, a stopped process).

use raft::{StateRole, INVALID_ID};

use super::Node;
use crate::storage::Backend;

/// Ticks between the early campaigns of successive ranks: long enough for the rank before to
/// win (a pre-vote and a vote round on a LAN), short against the election timeout.
pub const STAGGER_TICKS: usize = 2;

impl<B: Backend> Node<B> {
    /// The connection to `peer` was closed or reset by its host, or a reconnect to it was
    /// refused. If `peer` is this follower's leader, gives up the lease on it and brings this
    /// node's election forward (see the module doc). Returns whether it did.
    pub fn peer_gone(&mut self, peer: u64) -> bool {
        let cs = self.raw.store().conf_state();
        let mut voters: Vec<u64> =
            cs.voters.iter().chain(cs.voters_outgoing.iter()).copied().filter(|&v| v != peer).collect();
        voters.sort_unstable();
        voters.dedup();
        let r = &mut self.raw.raft;
        if peer == INVALID_ID || r.state != StateRole::Follower || r.leader_id != peer {
            return false;
        }
        let timeout = r.election_timeout();
        r.election_elapsed = r.election_elapsed.max(timeout);
        if !r.promotable() {
            // A learner only votes, and may now.
            return true;
        }
        let rank = voters.iter().position(|&v| v == r.id).unwrap_or(voters.len());
        // raft draws election deadlines from [timeout, 2 × timeout); the next tick is one past
        // the elapsed count.
        let at = (timeout + 1 + STAGGER_TICKS * rank).max(r.election_elapsed + 1);
        if at < 2 * timeout {
            r.set_randomized_election_timeout(at);
        }
        true
    }
}
