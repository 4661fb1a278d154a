//! When a follower applies what it learns is committed.
//!
//! A follower applies a write while the leader, which answers the client only once it has
//! applied the write itself, is still working on it: on a machine shared by the members, the
//! followers' applies take the cores the leader's path needs (traced at one client: the
//! leader's apply took 475 µs at the median while both followers applied, its acknowledgements
//! waited for a core too). Nobody waits for a follower's apply unless a request on that node
//! does, so a follower may hold committed entries back and apply several in one transaction
//! later: the I/O loop allows it only while nothing on the node waits (no forwarded write, read
//! or membership change), and applies them within a few milliseconds anyway, for `'local'`
//! readers and watchers. Only normal entries wait, fewer than `DEFER_BELOW` of them, and
//! never on a leader: a node that wins an election applies them first.
//!
//! Safety does not depend on it: the entries are in the durable log; the applied index is
//! written with their effects, so a crash re-applies them from the log, as it would any
//! committed entry not yet applied.

use raft::eraftpb::{Entry, EntryType};

use super::WriteBatch;
use super::{NodeError, Output};
use crate::storage::Backend;

/// Fewer than this many entries, and at most this many bytes of them, wait to be applied.
/// Under load an append brings more than that at once, and they are applied right after it
/// is acknowledged, as before. Holding up to 256 cost throughput at 32 clients (lower in 3 of
/// 4 paired rounds), likely because an apply run at its deadline delays the acknowledgement of
/// an append that arrives meanwhile.
pub const DEFER_BELOW: usize = 8;
const MAX_DEFERRED_BYTES: usize = 1 << 20;

impl<B: Backend> super::Node<B> {
    /// Whether committed entries may wait on this node until `apply_deferred` or the next
    /// entries that may not. The caller allows it only while no request on this node waits.
    pub fn set_may_defer(&mut self, may: bool) {
        self.may_defer = may;
    }

    /// How many times this node applied entries it had held back, since last asked.
    pub fn take_deferred_applies(&mut self) -> u64 {
        std::mem::take(&mut self.deferred_applies)
    }

    /// Whether committed entries wait to be applied here.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Of `committed`, what `batch` must apply now: nothing when it may wait (it joins the
    /// waiting entries, and so does a hard state that only moves the commit index), else the
    /// waiting entries, then it. A snapshot in `batch` supersedes what waits.
    pub(super) fn apply_now(&mut self, committed: Vec<Entry>, batch: &mut WriteBatch) -> Vec<Entry> {
        if batch.snapshot.is_some() {
            // Its index is above the commit index (raft refuses any other): it covers them.
            self.deferred.clear();
            self.deferred_commit = None;
        }
        if committed.is_empty() {
            return committed;
        }
        let wait = self.may_defer
            && !self.is_leader()
            && batch.snapshot.is_none()
            && self.deferred.len() + committed.len() < DEFER_BELOW
            && committed.iter().all(|e| e.get_entry_type() == EntryType::EntryNormal)
            && self.deferred.iter().chain(&committed).map(|e| e.data.len()).sum::<usize>() <= MAX_DEFERRED_BYTES;
        if wait {
            if let Some(hs) = batch.hard_state.take_if(|hs| self.only_commit_moved(hs)) {
                self.deferred_commit = Some(hs.commit);
            }
            self.deferred.extend(committed);
            return Vec::new();
        }
        self.restore_deferred_commit(batch);
        self.deferred_applies += u64::from(!self.deferred.is_empty());
        let mut all = std::mem::take(&mut self.deferred);
        all.extend(committed);
        all
    }

    /// Applies the waiting entries (with the commit index they came with) in one transaction.
    pub(super) fn apply_deferred(&mut self, out: &mut Output) -> Result<(), NodeError> {
        let Some(last) = self.deferred.last().map(|e| e.index) else { return Ok(()) };
        let mut batch = WriteBatch::default();
        self.restore_deferred_commit(&mut batch);
        let entries = std::mem::take(&mut self.deferred);
        self.deferred_applies += 1;
        self.write_and_apply(batch, &entries, out)?;
        self.raw.advance_apply_to(last);
        Ok(())
    }

    /// Puts the commit index held back with the waiting entries into `batch`, unless it
    /// writes a hard state of its own (which is newer: its commit index is no lower).
    fn restore_deferred_commit(&mut self, batch: &mut WriteBatch) {
        if let Some(commit) = self.deferred_commit.take() {
            if batch.hard_state.is_none() {
                let mut hs = self.raw.store().hard_state();
                hs.commit = hs.commit.max(commit);
                batch.hard_state = Some(hs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_cluster::Three;
    use super::super::Output;
    use crate::mem_backend::MemBackend;

    fn state(b: &MemBackend) -> (u64, u64, usize) {
        let s = b.inner.lock().unwrap();
        (s.state.applied, s.state.hard_state.commit, s.kv.len())
    }

    fn kv(b: &MemBackend) -> Vec<(String, u64)> {
        b.inner.lock().unwrap().kv.iter().map(|(k, r)| (k.clone(), r.mod_revision)).collect()
    }

    /// Three writes on the leader, all announced, with both followers allowed to hold them back;
    /// and the followers' state before them.
    fn three_writes_held_back() -> (Three, (u64, u64, usize)) {
        let mut t = Three::new();
        let before = state(&t.backends[&2]);
        for id in [2, 3] {
            t.nodes.get_mut(&id).unwrap().set_may_defer(true);
        }
        for seq in 1..=3 {
            t.put(1, seq);
        }
        t.nodes.get_mut(&1).unwrap().announce_commit();
        t.settle();
        for id in [2, 3] {
            assert!(t.nodes[&id].has_deferred(), "node {id}");
        }
        (t, before)
    }

    #[test]
    fn a_follower_holds_committed_entries_back_and_applies_them_in_one_write() {
        let (mut t, before) = three_writes_held_back();
        let leader = state(&t.backends[&1]);
        assert_eq!(leader.2, 3, "the leader applied and answered all three");
        for id in [2, 3] {
            assert_eq!(
                state(&t.backends[&id]),
                before,
                "node {id} acknowledged, applied nothing, wrote no commit index"
            );
        }
        // Let go: node 2 applies all three, and the commit index, in one write.
        let n2 = t.nodes.get_mut(&2).unwrap();
        n2.set_may_defer(false);
        n2.handle_ready(&mut Output::default(), &mut |_| {}).unwrap();
        assert_eq!(n2.take_deferred_applies(), 1);
        assert!(!n2.has_deferred());
        assert_eq!(state(&t.backends[&2]), (leader.0, leader.0, 3));
        assert_eq!(kv(&t.backends[&2]), kv(&t.backends[&1]));
        // A write on node 3, which then waits: forwarded, it applies what it held and the write.
        let n3 = t.nodes.get_mut(&3).unwrap();
        n3.set_may_defer(false);
        t.put(3, 4);
        t.assert_all_applied_alike();
        assert_eq!(kv(&t.backends[&3]), kv(&t.backends[&1]));
    }

    #[test]
    fn a_follower_elected_leader_applies_what_it_held_back_first() {
        let (mut t, _) = three_writes_held_back();
        t.nodes.get_mut(&1).unwrap().transfer_leader(2);
        t.settle();
        assert!(t.nodes[&2].is_leader());
        assert!(!t.nodes[&2].has_deferred());
        t.put(2, 4);
        assert_eq!(state(&t.backends[&2]).2, 4);
        assert_eq!(kv(&t.backends[&2])[..3], kv(&t.backends[&1])[..3]);
    }

    #[test]
    fn entries_held_back_at_a_crash_are_applied_from_the_log_after_it() {
        let (mut t, before) = three_writes_held_back();
        // Node 2 stops with nothing of them applied; it reopens on what it wrote.
        t.reopen(2);
        assert_eq!(state(&t.backends[&2]), before);
        t.nodes.get_mut(&3).unwrap().set_may_defer(false);
        t.put(1, 4);
        t.nodes.get_mut(&1).unwrap().announce_commit();
        t.settle();
        t.assert_all_applied_alike();
        assert_eq!(kv(&t.backends[&2]), kv(&t.backends[&1]));
        assert_eq!(kv(&t.backends[&3]), kv(&t.backends[&1]));
    }
}
