//! Leases, etcd's: a TTL that keys are attached to, kept alive by its owner, and when it expires
//! or is revoked every attached key is deleted at one revision.
//!
//! Granting, keeping alive, revoking and expiring are all log entries, so every node holds the
//! same leases and deletes the same keys at the same revision. Time only enters in one place:
//! the leader's [`LeaseClock`] decides that a lease is due and proposes its expiry, naming the
//! lease's refresh count as the leader saw it. The expiry applies only if no keepalive applied
//! in between (the count still matches); a keepalive ordered before the expiry in the log wins
//! (etcd issue #15247 was an expiry decided on a stale view deleting a refreshed lease).
//!
//! The clock is monotonic milliseconds supplied by the caller, so wall-clock jumps cannot move
//! a deadline, and a new leader starts every lease's full TTL again (a failover never expires a
//! live lease early).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Most leases a cluster holds at once; a grant beyond it is refused.
pub const MAX_LEASES: u64 = 10_000;
/// Most keys attached to one lease; a put beyond it is refused.
pub const MAX_KEYS_PER_LEASE: u64 = 1_000;
/// Longest TTL accepted: 30 days.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// A lease as the state machine stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRow {
    pub ttl_ms: u64,
    /// Grants and keepalives applied so far: an expiry names the count it was decided on.
    pub refreshes: u64,
}

/// Why the state machine refused an operation (it changed nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The named lease does not exist (never granted, revoked or expired).
    LeaseNotFound,
    /// A grant named a lease id that exists.
    LeaseExists,
    /// A grant beyond [`MAX_LEASES`].
    TooManyLeases,
    /// A put beyond [`MAX_KEYS_PER_LEASE`] keys on one lease.
    LeaseFull,
}

impl Refusal {
    pub fn code(self) -> u8 {
        match self {
            Refusal::LeaseNotFound => 1,
            Refusal::LeaseExists => 2,
            Refusal::TooManyLeases => 3,
            Refusal::LeaseFull => 4,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Refusal::LeaseNotFound,
            2 => Refusal::LeaseExists,
            3 => Refusal::TooManyLeases,
            4 => Refusal::LeaseFull,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    ttl_ms: u64,
    refreshes: u64,
    deadline: u64,
    /// When this node last proposed the lease's expiry (monotonic ms), if it did.
    proposed_at: Option<u64>,
}

/// Deadlines of the leases, as this node applied them. Every node keeps one; only the leader's
/// decides anything ([`LeaseClock::due`]).
#[derive(Debug, Default)]
pub struct LeaseClock {
    leases: HashMap<u64, Tracked>,
    /// No lease is due before this (monotonic ms): `due` returns at once until then, so the
    /// leader's loop does not scan every lease on every pass.
    next_due: u64,
    /// Something changed since [`LeaseClock::take_changed`] was last called.
    changed: bool,
}

/// An expiry proposed but not applied (lost with a leader change, say) is proposed again after this.
const REPROPOSE_AFTER_MS: u64 = 1_000;

impl LeaseClock {
    /// The leases as stored, each with its full TTL from `now` (at start, and from a snapshot).
    pub fn load(&mut self, leases: impl IntoIterator<Item = (u64, LeaseRow)>, now: u64) {
        self.leases.clear();
        for (id, l) in leases {
            self.applied(id, Some(l), now);
        }
        self.changed = true;
    }

    /// A lease's applied state changed: granted or kept alive (`Some`), or gone (`None`).
    pub fn applied(&mut self, id: u64, lease: Option<LeaseRow>, now: u64) {
        match lease {
            Some(l) => {
                let deadline = now.saturating_add(l.ttl_ms);
                self.leases
                    .insert(id, Tracked { ttl_ms: l.ttl_ms, refreshes: l.refreshes, deadline, proposed_at: None });
                self.next_due = self.next_due.min(deadline);
            }
            None => {
                self.leases.remove(&id);
            }
        }
        self.changed = true;
    }

    /// This node became leader: every lease gets its full TTL again from `now`.
    pub fn restart_all(&mut self, now: u64) {
        for t in self.leases.values_mut() {
            t.deadline = now.saturating_add(t.ttl_ms);
            t.proposed_at = None;
        }
        self.next_due = 0;
        self.changed = true;
    }

    /// Leases past their deadline whose expiry is not already proposed, with the refresh count
    /// to name in the expiry; marks them proposed. For the leader only.
    pub fn due(&mut self, now: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if now < self.next_due {
            return out;
        }
        self.next_due = u64::MAX;
        for (id, t) in self.leases.iter_mut() {
            let recent = t.proposed_at.is_some_and(|p| now < p.saturating_add(REPROPOSE_AFTER_MS));
            if t.deadline <= now && !recent {
                t.proposed_at = Some(now);
                out.push((*id, t.refreshes));
            }
            // When this lease next needs a look: its deadline, or the time to propose again.
            let again = match t.proposed_at {
                Some(p) if t.deadline <= now => p.saturating_add(REPROPOSE_AFTER_MS),
                _ => t.deadline,
            };
            self.next_due = self.next_due.min(again);
        }
        out.sort_unstable();
        out
    }

    /// Milliseconds left of `id`'s TTL at `now` as this node sees it.
    pub fn remaining(&self, id: u64, now: u64) -> Option<u64> {
        self.leases.get(&id).map(|t| t.deadline.saturating_sub(now))
    }

    /// Every lease's deadline (monotonic ms), when they changed since the last call.
    pub fn take_changed(&mut self) -> Option<Vec<(u64, u64)>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        let mut v: Vec<(u64, u64)> = self.leases.iter().map(|(id, t)| (*id, t.deadline)).collect();
        v.sort_unstable();
        Some(v)
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ttl_ms: u64, refreshes: u64) -> Option<LeaseRow> {
        Some(LeaseRow { ttl_ms, refreshes })
    }

    #[test]
    fn a_lease_is_due_after_its_ttl_from_the_last_refresh() {
        let mut c = LeaseClock::default();
        c.applied(7, lease(3_000, 1), 1_000);
        assert!(c.due(3_999).is_empty());
        c.applied(7, lease(3_000, 2), 2_000); // a keepalive
        assert!(c.due(4_500).is_empty(), "the keepalive moved the deadline");
        assert_eq!(c.remaining(7, 4_500), Some(500));
        assert_eq!(c.due(5_000), vec![(7, 2)], "the expiry names the refresh count it saw");
        assert!(c.due(5_100).is_empty(), "proposed once");
        assert_eq!(c.due(6_000), vec![(7, 2)], "proposed again when it did not apply");
        c.applied(7, None, 6_100);
        assert!(c.due(9_000).is_empty());
        assert_eq!(c.remaining(7, 9_000), None);
    }

    #[test]
    fn a_new_leader_gives_every_lease_its_full_ttl() {
        let mut c = LeaseClock::default();
        c.applied(1, lease(2_000, 1), 0);
        c.applied(2, lease(10_000, 1), 0);
        c.restart_all(1_900);
        assert!(c.due(3_800).is_empty());
        assert_eq!(c.due(3_900), vec![(1, 1)]);
        assert_eq!(c.remaining(2, 3_900), Some(8_000));
    }

    #[test]
    fn changes_are_reported_once() {
        let mut c = LeaseClock::default();
        assert_eq!(c.take_changed(), None);
        c.load([(5, LeaseRow { ttl_ms: 100, refreshes: 3 })], 50);
        assert_eq!(c.take_changed(), Some(vec![(5, 150)]));
        assert_eq!(c.take_changed(), None);
        assert_eq!(Refusal::from_code(Refusal::LeaseFull.code()), Some(Refusal::LeaseFull));
    }
}
