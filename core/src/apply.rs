//! The state machine's rules, decided once for every backend: what each operation of a batch
//! does, given the state before the batch, and what must be persisted as a result.
//!
//! A backend only looks up the keys, prefixes and request ids a batch touches ([`needs`]) and
//! stores the [`Effects`] as they are, so the in-memory backend and the tables cannot
//! disagree on what a put, a delete, a compare-and-set, a transaction or a retried request
//! means, nor on the revisions and the history they produce.

use std::collections::{BTreeMap, HashMap};

use crate::command::ApplyResult;
use crate::lease::{LeaseRow, Refusal, MAX_KEYS_PER_LEASE, MAX_LEASES};
use crate::txn::Scope;
use crate::types::{dedup_prune_below, Change, ChangeKind, KvOp, KvRow, OpAt};

/// What a batch's decisions depend on: the stored state of each key it touches (and of every
/// key under the prefixes it touches), which of its request ids were applied before, as
/// (node, revision, flag), and the store's revision and history compaction point.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Lookup {
    pub kv: HashMap<String, KvRow>,
    pub requests: HashMap<(u64, u64), (u64, u64, bool)>,
    pub revision: u64,
    pub compact_revision: u64,
    /// The needed leases that exist, with how many keys each has attached.
    pub leases: HashMap<u64, (LeaseRow, u64)>,
    /// How many leases exist.
    pub lease_count: u64,
    /// The keys attached to each lease of [`Needs::lease_keys`] (their rows are in `kv`).
    pub lease_keys: HashMap<u64, Vec<String>>,
}

/// What applying a batch changes, for a backend to persist as it is.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// The final state of every key the batch changed; `None`: deleted.
    pub kv: BTreeMap<String, Option<KvRow>>,
    /// Request ids the batch applied: (nonce, seq) → (node, revision, flag).
    pub requests: BTreeMap<(u64, u64), (u64, u64, bool)>,
    /// Forget request ids applied below this revision (see `types::dedup_prune_below`).
    pub prune_requests_below: Option<u64>,
    /// The history of the batch, in revision order (a revision's keys in key order).
    pub changes: Vec<Change>,
    /// The store's new revision, when the batch changed anything.
    pub revision: Option<u64>,
    /// The new history compaction point: history below it is to be forgotten.
    pub compact_revision: Option<u64>,
    /// The final state of every lease the batch changed; `None`: gone.
    pub leases: BTreeMap<u64, Option<LeaseRow>>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
            && self.requests.is_empty()
            && self.prune_requests_below.is_none()
            && self.changes.is_empty()
            && self.revision.is_none()
            && self.compact_revision.is_none()
            && self.leases.is_empty()
    }
}

/// What a batch reads: single keys, key prefixes and request ids, each listed once.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Needs {
    pub keys: Vec<String>,
    pub prefixes: Vec<String>,
    pub ids: Vec<(u64, u64)>,
    /// Leases to look up, with their number of attached keys.
    pub leases: Vec<u64>,
    /// Leases whose attached keys (and their rows) to look up.
    pub lease_keys: Vec<u64>,
    /// Whether to count every lease (a grant checks the cap).
    pub lease_total: bool,
}

/// The keys, prefixes and request ids whose stored state the batch's decisions read.
pub fn needs(ops: &[OpAt]) -> Needs {
    let mut keys: Vec<String> = ops.iter().flat_map(|o| o.op.keys()).map(str::to_string).collect();
    keys.sort();
    keys.dedup();
    let mut prefixes: Vec<String> = ops.iter().flat_map(|o| o.op.prefixes()).map(str::to_string).collect();
    prefixes.sort();
    prefixes.dedup();
    let mut ids: Vec<(u64, u64)> = ops.iter().map(|o| (o.id.nonce, o.id.seq)).collect();
    ids.sort();
    ids.dedup();
    let mut leases: Vec<u64> = ops.iter().flat_map(|o| o.op.leases()).collect();
    leases.sort_unstable();
    leases.dedup();
    let mut lease_keys: Vec<u64> = ops.iter().flat_map(|o| o.op.lease_keys()).collect();
    lease_keys.sort_unstable();
    lease_keys.dedup();
    let lease_total = ops.iter().any(|o| matches!(o.op, KvOp::LeaseGrant { .. }));
    Needs { keys, prefixes, ids, leases, lease_keys, lease_total }
}

/// The state as the batch has made it so far.
struct View<'a> {
    before: &'a Lookup,
    fx: &'a Effects,
}

/// Leases as the batch has changed them so far: keys attached (by lease) and leases existing.
#[derive(Default, Clone)]
struct LeaseTally {
    attached: HashMap<u64, i64>,
    count: i64,
}

impl View<'_> {
    fn lease(&self, id: u64) -> Option<LeaseRow> {
        match self.fx.leases.get(&id) {
            Some(now) => *now,
            None => self.before.leases.get(&id).map(|l| l.0),
        }
    }

    fn attached(&self, id: u64, tally: &LeaseTally) -> i64 {
        self.before.leases.get(&id).map_or(0, |l| l.1 as i64) + tally.attached.get(&id).copied().unwrap_or(0)
    }

    /// Whether `key` may be written attached to `lease` (0: none).
    fn check_put(&self, key: &str, lease: u64, tally: &LeaseTally) -> Result<(), Refusal> {
        if lease == 0 {
            return Ok(());
        }
        if self.lease(lease).is_none() {
            return Err(Refusal::LeaseNotFound);
        }
        let already = self.get(key).is_some_and(|r| r.lease == lease);
        if !already && self.attached(lease, tally) >= MAX_KEYS_PER_LEASE as i64 {
            return Err(Refusal::LeaseFull);
        }
        Ok(())
    }

    /// The existing keys attached to `lease`, in key order.
    fn keys_of(&self, lease: u64) -> Vec<String> {
        let mut keys: Vec<String> = self
            .before
            .lease_keys
            .get(&lease)
            .into_iter()
            .flatten()
            .chain(self.fx.kv.keys())
            .filter(|k| self.get(k).is_some_and(|r| r.lease == lease))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn get(&self, key: &str) -> Option<&KvRow> {
        match self.fx.kv.get(key) {
            Some(now) => now.as_ref(),
            None => self.before.kv.get(key),
        }
    }

    /// The existing keys in scope, in key order.
    fn keys_in(&self, scope: &Scope) -> Vec<String> {
        match scope {
            Scope::Key(k) => self.get(k).map(|_| vec![k.clone()]).unwrap_or_default(),
            Scope::Prefix(p) => {
                let mut keys: Vec<String> = self
                    .before
                    .kv
                    .keys()
                    .chain(self.fx.kv.keys())
                    .filter(|k| k.starts_with(p.as_str()) && self.get(k).is_some())
                    .cloned()
                    .collect();
                keys.sort();
                keys.dedup();
                keys
            }
        }
    }
}

/// Applies `ops` in order to the state `before` (and to what earlier ops of the batch did):
/// each op's result for its client, and the batch's effects.
///
/// - A request id applied before (in the window, or earlier in this batch) is a retry: it
///   changes nothing and answers with the first result.
/// - An op that changes something raises the store revision by one; all its writes carry
///   that revision, and each changed key gets a history record. An op that changes nothing
///   answers with the current revision.
/// - Put writes the value; its flag is true.
/// - Delete removes the key; its flag says whether the key existed.
/// - Cas writes only if the current value equals `expected` (`None`: the key is absent); its
///   flag says whether it wrote.
/// - Txn runs its success ops if every compare holds, else its failure ops; its flag says
///   whether the compares held. Gets write nothing (the SQL function reads them afterwards
///   at the transaction's revision).
/// - Compact moves the history compaction point up to at most the current revision; its
///   flag says whether it moved.
/// - Every put attaches the key to the lease it names, or to none (etcd's rule); a put naming
///   a lease that does not exist, or one with [`MAX_KEYS_PER_LEASE`] keys, is refused, and so
///   is a transaction holding one in the branch it takes.
/// - LeaseGrant creates a lease (refused if the id exists or [`MAX_LEASES`] do), LeaseKeepAlive
///   counts one more refresh (refused for a missing lease), LeaseRevoke deletes the lease and
///   its keys at one revision (refused for a missing lease). LeaseExpire does what a revoke
///   does only if the lease's refresh count is still the one it names, else nothing; its
///   flag says whether it expired the lease. None of these changes the revision by itself.
pub fn decide(ops: &[OpAt], before: &Lookup) -> (Vec<ApplyResult>, Effects) {
    let mut fx = Effects::default();
    let mut results = Vec::with_capacity(ops.len());
    let mut rev = before.revision;
    let mut compact = before.compact_revision;
    let mut tally = LeaseTally::default();
    for o in ops {
        let rid = (o.id.nonce, o.id.seq);
        if let Some(&(_, revision, flag)) = fx.requests.get(&rid).or_else(|| before.requests.get(&rid)) {
            results.push(ApplyResult { revision, flag, duplicate: true, wrote: false, refused: None });
            continue;
        }
        let view = View { before, fx: &fx };
        // Each write: the key and its new value and lease (None: delete).
        type Write = (String, Option<(String, u64)>);
        let mut refused = None;
        let mut lease_change = None;
        let (flag, writes): (bool, Vec<Write>) = match &o.op {
            KvOp::Put { key, value, lease } => match view.check_put(key, *lease, &tally) {
                Ok(()) => (true, vec![(key.clone(), Some((value.clone(), *lease)))]),
                Err(r) => {
                    refused = Some(r);
                    (false, Vec::new())
                }
            },
            KvOp::Delete { key } => {
                let exists = view.get(key).is_some();
                (exists, if exists { vec![(key.clone(), None)] } else { Vec::new() })
            }
            KvOp::Cas { key, expected, value } => {
                let matches = view.get(key).map(|r| r.value.as_str()) == expected.as_deref();
                (matches, if matches { vec![(key.clone(), Some((value.clone(), 0)))] } else { Vec::new() })
            }
            KvOp::Txn(t) => {
                let holds = t.compare.iter().all(|c| {
                    let keys = view.keys_in(&c.scope);
                    let rows: Vec<&KvRow> = keys.iter().filter_map(|k| view.get(k)).collect();
                    c.holds(&rows)
                });
                let mut writes = Vec::new();
                // Puts earlier in the branch count against a lease's cap too.
                let mut branch = tally.clone();
                for op in if holds { &t.success } else { &t.failure } {
                    if let Some((key, value, lease)) = op.put() {
                        if let Err(r) = view.check_put(key, lease, &branch) {
                            refused.get_or_insert(r);
                        }
                        *branch.attached.entry(lease).or_default() += 1;
                        writes.push((key.to_string(), Some((value.to_string(), lease))));
                    } else if let crate::txn::TxnOp::Delete(scope) = op {
                        writes.extend(view.keys_in(scope).into_iter().map(|k| (k, None)));
                    }
                }
                if refused.is_some() {
                    writes.clear();
                }
                (holds && refused.is_none(), writes)
            }
            KvOp::Compact { revision } => {
                let moves = *revision > compact && *revision <= rev;
                if moves {
                    compact = *revision;
                    fx.compact_revision = Some(compact);
                }
                (moves, Vec::new())
            }
            KvOp::LeaseGrant { id, ttl_ms } => {
                if view.lease(*id).is_some() {
                    refused = Some(Refusal::LeaseExists);
                } else if before.lease_count as i64 + tally.count >= MAX_LEASES as i64 {
                    refused = Some(Refusal::TooManyLeases);
                } else {
                    lease_change = Some((*id, Some(LeaseRow { ttl_ms: *ttl_ms, refreshes: 1 })));
                }
                (refused.is_none(), Vec::new())
            }
            KvOp::LeaseKeepAlive { id } => match view.lease(*id) {
                Some(l) => {
                    lease_change = Some((*id, Some(LeaseRow { refreshes: l.refreshes + 1, ..l })));
                    (true, Vec::new())
                }
                None => {
                    refused = Some(Refusal::LeaseNotFound);
                    (false, Vec::new())
                }
            },
            KvOp::LeaseRevoke { id } | KvOp::LeaseExpire { id, .. } => {
                let current = match &o.op {
                    KvOp::LeaseExpire { refreshes, .. } => view.lease(*id).filter(|l| l.refreshes == *refreshes),
                    _ => view.lease(*id),
                };
                match current {
                    Some(_) => {
                        lease_change = Some((*id, None));
                        (true, view.keys_of(*id).into_iter().map(|k| (k, None)).collect())
                    }
                    None => {
                        if matches!(o.op, KvOp::LeaseRevoke { .. }) {
                            refused = Some(Refusal::LeaseNotFound);
                        }
                        (false, Vec::new())
                    }
                }
            }
        };
        if let Some((id, now)) = lease_change {
            let existed = View { before, fx: &fx }.lease(id).is_some();
            tally.count += now.is_some() as i64 - existed as i64;
            fx.leases.insert(id, now);
        }
        let wrote = !writes.is_empty();
        if wrote {
            rev += 1;
            let mut changes = Vec::new();
            for (key, new) in writes {
                let old = View { before, fx: &fx }.get(&key).cloned();
                let old_lease = old.as_ref().map_or(0, |o| o.lease);
                let new_lease = new.as_ref().map_or(0, |n| n.1);
                if old_lease != new_lease {
                    *tally.attached.entry(old_lease).or_default() -= 1;
                    *tally.attached.entry(new_lease).or_default() += 1;
                }
                let change = match (new, &old) {
                    (Some((value, lease)), _) => {
                        let row = KvRow {
                            value: value.clone(),
                            mod_revision: rev,
                            create_revision: old.as_ref().map_or(rev, |o| o.create_revision),
                            version: old.as_ref().map_or(1, |o| o.version + 1),
                            lease,
                        };
                        let c = Change {
                            revision: rev,
                            key: key.clone(),
                            kind: ChangeKind::Put,
                            value: Some(value),
                            prev_value: old.as_ref().map(|o| o.value.clone()),
                            create_revision: row.create_revision,
                            version: row.version,
                            prev_mod_revision: old.as_ref().map(|o| o.mod_revision),
                        };
                        fx.kv.insert(key, Some(row));
                        c
                    }
                    // A key deleted twice in one transaction (overlapping prefixes): once.
                    (None, None) => continue,
                    (None, Some(o)) => {
                        let c = Change {
                            revision: rev,
                            key: key.clone(),
                            kind: ChangeKind::Delete,
                            value: None,
                            prev_value: Some(o.value.clone()),
                            create_revision: o.create_revision,
                            version: o.version,
                            prev_mod_revision: Some(o.mod_revision),
                        };
                        fx.kv.insert(key, None);
                        c
                    }
                };
                changes.push(change);
            }
            changes.sort_by(|a, b| a.key.cmp(&b.key));
            fx.changes.extend(changes);
        }
        fx.requests.insert(rid, (o.id.node, rev, flag));
        results.push(ApplyResult { revision: rev, flag, duplicate: false, wrote, refused });
    }
    if rev != before.revision {
        fx.revision = Some(rev);
    }
    fx.prune_requests_below = dedup_prune_below(before.revision, rev);
    (results, fx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::RequestId;
    use crate::txn::{CmpOp, Compare, Target, Txn, TxnOp};

    fn op(index: u64, seq: u64, op: KvOp) -> OpAt {
        OpAt { id: RequestId { node: 1, nonce: 1, seq }, index, op }
    }
    fn put(k: &str, v: &str) -> KvOp {
        KvOp::Put { key: k.into(), value: v.into(), lease: 0 }
    }
    fn cas(k: &str, expected: Option<&str>, v: &str) -> KvOp {
        KvOp::Cas { key: k.into(), expected: expected.map(Into::into), value: v.into() }
    }
    fn ok(revision: u64, flag: bool) -> ApplyResult {
        ApplyResult { revision, flag, duplicate: false, wrote: false, refused: None }
    }
    /// Results, with whether each wrote left out (checked separately).
    fn res(r: Vec<ApplyResult>) -> Vec<ApplyResult> {
        r.into_iter().map(|r| ApplyResult { wrote: false, ..r }).collect()
    }
    fn row(value: &str, m: u64, c: u64, v: u64) -> KvRow {
        KvRow { value: value.into(), mod_revision: m, create_revision: c, version: v, lease: 0 }
    }

    #[test]
    fn ops_see_the_state_before_the_batch_and_each_other() {
        let mut before = Lookup { revision: 3, ..Default::default() };
        before.kv.insert("a".into(), row("old", 3, 2, 2));
        let ops = [
            op(10, 1, cas("a", Some("old"), "x")), // matches what was stored
            op(11, 2, cas("a", Some("old"), "y")), // no longer: the first CAS wrote
            op(12, 3, KvOp::Delete { key: "b".into() }),
            op(13, 4, cas("b", None, "new")), // absent: writes
            op(14, 5, KvOp::Delete { key: "a".into() }),
            op(15, 6, put("c", "1")),
        ];
        let (r, fx) = decide(&ops, &before);
        // Revisions count the ops that changed something, not log indexes.
        assert_eq!(
            res(r.clone()),
            vec![ok(4, true), ok(4, false), ok(4, false), ok(5, true), ok(6, true), ok(7, true)]
        );
        assert_eq!(r.iter().map(|r| r.wrote).collect::<Vec<_>>(), vec![true, false, false, true, true, true]);
        assert_eq!(fx.kv.get("a"), Some(&None));
        assert_eq!(fx.kv.get("b"), Some(&Some(row("new", 5, 5, 1))));
        assert_eq!(fx.kv.get("c"), Some(&Some(row("1", 7, 7, 1))));
        assert_eq!(fx.revision, Some(7));
        assert_eq!(fx.requests.len(), 6);
        assert_eq!(fx.requests[&(1, 2)], (1, 4, false), "a failed CAS is remembered with its result");
        let history: Vec<(u64, &str, ChangeKind)> =
            fx.changes.iter().map(|c| (c.revision, c.key.as_str(), c.kind)).collect();
        assert_eq!(
            history,
            vec![
                (4, "a", ChangeKind::Put),
                (5, "b", ChangeKind::Put),
                (6, "a", ChangeKind::Delete),
                (7, "c", ChangeKind::Put)
            ]
        );
        // Each record says what was there before, so older states can be rebuilt.
        assert_eq!(fx.changes[0].before(), Some(row("old", 3, 2, 2)));
        assert_eq!(fx.changes[0].version, 3);
        assert_eq!(fx.changes[2].before(), Some(row("x", 4, 2, 3)));
        assert_eq!(fx.changes[1].before(), None);
    }

    #[test]
    fn a_retried_request_changes_nothing_and_answers_the_first_result() {
        let mut before = Lookup { revision: 9, ..Default::default() };
        before.requests.insert((1, 7), (1, 5, true));
        let ops = [op(20, 7, put("k", "again")), op(21, 8, put("k", "v")), op(22, 8, put("k", "retry"))];
        let (res, fx) = decide(&ops, &before);
        assert_eq!(res[0], ApplyResult { revision: 5, flag: true, duplicate: true, wrote: false, refused: None });
        assert_eq!(
            res[2],
            ApplyResult { revision: 10, flag: true, duplicate: true, wrote: false, refused: None },
            "a retry within the batch"
        );
        assert_eq!(fx.kv.get("k"), Some(&Some(row("v", 10, 10, 1))));
        assert!(!fx.requests.contains_key(&(1, 7)));
        assert_eq!(fx.changes.len(), 1);
    }

    #[test]
    fn a_transaction_applies_one_branch_at_one_revision() {
        let mut before = Lookup { revision: 20, ..Default::default() };
        for (k, v) in [("acct/a", "10"), ("acct/b", "5"), ("other", "x")] {
            before.kv.insert(k.into(), row(v, 20, 1, 4));
        }
        let transfer = |cmp_rev: u64| Txn {
            compare: vec![
                Compare { scope: Scope::Key("acct/a".into()), target: Target::ModRevision(cmp_rev), op: CmpOp::Eq },
                Compare { scope: Scope::Prefix("acct/".into()), target: Target::Version(0), op: CmpOp::Gt },
            ],
            success: vec![
                TxnOp::Put { key: "acct/a".into(), value: "7".into() },
                TxnOp::Put { key: "acct/b".into(), value: "8".into() },
                TxnOp::Get(Scope::Prefix("acct/".into())),
            ],
            failure: vec![TxnOp::Delete(Scope::Prefix("acct/".into()))],
        };
        let (r, fx) = decide(&[op(30, 1, KvOp::Txn(transfer(20)))], &before);
        assert_eq!(res(r.clone()), vec![ok(21, true)]);
        assert!(r[0].wrote);
        assert_eq!(
            fx.changes.iter().map(|c| (c.revision, c.key.as_str())).collect::<Vec<_>>(),
            vec![(21, "acct/a"), (21, "acct/b")]
        );
        assert_eq!(fx.kv["acct/a"], Some(row("7", 21, 1, 5)));
        // A stale compare takes the failure branch: the prefix delete, at one revision.
        let (r, fx) = decide(&[op(31, 2, KvOp::Txn(transfer(19)))], &before);
        assert_eq!(res(r), vec![ok(21, false)]);
        assert_eq!(fx.kv.get("acct/a"), Some(&None));
        assert_eq!(fx.kv.get("acct/b"), Some(&None));
        assert!(!fx.kv.contains_key("other"));
        assert!(fx.changes.iter().all(|c| c.revision == 21 && c.kind == ChangeKind::Delete));
        // A transaction that writes nothing leaves the revision alone.
        let read_only =
            Txn { compare: Vec::new(), success: vec![TxnOp::Get(Scope::Key("other".into()))], failure: Vec::new() };
        let (r, fx) = decide(&[op(32, 3, KvOp::Txn(read_only))], &before);
        assert_eq!(r, vec![ok(20, true)], "wrote nothing");
        assert_eq!(fx.revision, None);
        assert!(fx.changes.is_empty());
        // A prefix compare sees keys written earlier in the batch.
        let later = Txn {
            compare: vec![Compare {
                scope: Scope::Prefix("new/".into()),
                target: Target::Value("v".into()),
                op: CmpOp::Eq,
            }],
            success: vec![TxnOp::Put { key: "seen".into(), value: "yes".into() }],
            failure: Vec::new(),
        };
        let (r, _) = decide(&[op(33, 4, put("new/1", "v")), op(34, 5, KvOp::Txn(later))], &before);
        assert_eq!(res(r), vec![ok(21, true), ok(22, true)]);
    }

    #[test]
    fn compaction_moves_forward_only_and_up_to_the_revision() {
        let before = Lookup { revision: 50, compact_revision: 10, ..Default::default() };
        let c = |seq, revision| op(seq, seq, KvOp::Compact { revision });
        let (r, fx) = decide(&[c(1, 5), c(2, 51), c(3, 30), c(4, 20)], &before);
        assert_eq!(r, vec![ok(50, false), ok(50, false), ok(50, true), ok(50, false)]);
        assert_eq!(fx.compact_revision, Some(30));
        assert_eq!(fx.revision, None);
    }

    fn leased(k: &str, v: &str, lease: u64) -> KvOp {
        KvOp::Put { key: k.into(), value: v.into(), lease }
    }

    #[test]
    fn a_lease_expires_or_is_revoked_with_its_keys_at_one_revision() {
        let before = Lookup { revision: 5, ..Default::default() };
        let ops = [
            op(1, 1, KvOp::LeaseGrant { id: 9, ttl_ms: 3_000 }),
            op(2, 2, leased("svc/a", "1", 9)),
            op(3, 3, leased("svc/b", "2", 9)),
            op(4, 4, KvOp::LeaseKeepAlive { id: 9 }),
            // Decided on the view before the keepalive: a keepalive applied since wins.
            op(5, 5, KvOp::LeaseExpire { id: 9, refreshes: 1 }),
            op(6, 6, KvOp::LeaseExpire { id: 9, refreshes: 2 }),
            op(7, 7, KvOp::LeaseKeepAlive { id: 9 }),
            op(8, 8, KvOp::LeaseRevoke { id: 9 }),
        ];
        let (r, fx) = decide(&ops, &before);
        let flags: Vec<(u64, bool, Option<Refusal>)> = r.iter().map(|r| (r.revision, r.flag, r.refused)).collect();
        assert_eq!(
            flags,
            vec![
                (5, true, None), // a grant changes no key: no new revision
                (6, true, None),
                (7, true, None),
                (7, true, None),
                (7, false, None), // stale: nothing happens
                (8, true, None),  // both keys deleted at revision 8
                (8, false, Some(Refusal::LeaseNotFound)),
                (8, false, Some(Refusal::LeaseNotFound)),
            ]
        );
        assert_eq!(fx.kv.get("svc/a"), Some(&None));
        assert_eq!(fx.kv.get("svc/b"), Some(&None));
        let deletes: Vec<(u64, &str, ChangeKind)> =
            fx.changes.iter().filter(|c| c.revision == 8).map(|c| (c.revision, c.key.as_str(), c.kind)).collect();
        assert_eq!(deletes, vec![(8, "svc/a", ChangeKind::Delete), (8, "svc/b", ChangeKind::Delete)]);
        assert_eq!(fx.leases.get(&9), Some(&None));

        // A stored lease with a key: revoking it finds the key through the lookup.
        let mut before = Lookup { revision: 20, lease_count: 1, ..Default::default() };
        before.leases.insert(4, (LeaseRow { ttl_ms: 2_000, refreshes: 7 }, 1));
        before.lease_keys.insert(4, vec!["lock/x".into()]);
        before.kv.insert("lock/x".into(), KvRow { lease: 4, ..row("me", 20, 20, 1) });
        let (r, fx) = decide(&[op(1, 1, KvOp::LeaseExpire { id: 4, refreshes: 7 })], &before);
        assert_eq!((r[0].revision, r[0].flag), (21, true));
        assert_eq!(fx.kv.get("lock/x"), Some(&None));
    }

    #[test]
    fn puts_attach_detach_and_are_refused_for_a_missing_or_full_lease() {
        let mut before = Lookup { revision: 1, lease_count: MAX_LEASES - 1, ..Default::default() };
        before.leases.insert(1, (LeaseRow { ttl_ms: 5_000, refreshes: 1 }, MAX_KEYS_PER_LEASE - 1));
        before.kv.insert("held".into(), KvRow { lease: 1, ..row("v", 1, 1, 1) });
        let txn = |lease| {
            KvOp::Txn(Txn {
                compare: Vec::new(),
                success: vec![
                    TxnOp::Put { key: "t1".into(), value: "x".into() },
                    TxnOp::PutLease { key: "t2".into(), value: "x".into(), lease },
                ],
                failure: Vec::new(),
            })
        };
        let ops = [
            op(1, 1, leased("k", "v", 2)),   // no lease 2
            op(2, 2, txn(2)),                // refused whole: t1 is not written either
            op(3, 3, leased("new", "v", 1)), // the last free place on lease 1
            op(4, 4, leased("more", "v", 1)),
            op(5, 5, leased("new", "again", 1)), // already attached: no new place needed
            op(6, 6, put("held", "detached")),   // a put without a lease detaches
            op(7, 7, leased("more", "v", 1)),    // so there is room again
            op(8, 8, KvOp::LeaseGrant { id: 1, ttl_ms: 1 }),
            op(9, 9, KvOp::LeaseGrant { id: 3, ttl_ms: 1 }),
            op(10, 10, KvOp::LeaseGrant { id: 4, ttl_ms: 1 }),
        ];
        let (r, fx) = decide(&ops, &before);
        let refused: Vec<Option<Refusal>> = r.iter().map(|r| r.refused).collect();
        use Refusal::*;
        assert_eq!(
            refused,
            vec![
                Some(LeaseNotFound),
                Some(LeaseNotFound),
                None,
                Some(LeaseFull),
                None,
                None,
                None,
                Some(LeaseExists),
                None,
                Some(TooManyLeases)
            ]
        );
        assert!(!fx.kv.contains_key("t1") && !fx.kv.contains_key("k"));
        assert_eq!(fx.kv["held"].as_ref().unwrap().lease, 0);
        assert_eq!(fx.kv["more"].as_ref().unwrap().lease, 1);
        assert!(r.iter().filter(|r| r.refused.is_some()).all(|r| !r.flag && !r.wrote));
    }

    #[test]
    fn needs_lists_each_key_prefix_and_id_once() {
        let txn =
            Txn { compare: Vec::new(), success: vec![TxnOp::Delete(Scope::Prefix("p/".into()))], failure: Vec::new() };
        let ops = [op(1, 1, put("b", "1")), op(2, 2, put("a", "1")), op(3, 1, put("b", "2")), op(4, 3, KvOp::Txn(txn))];
        let n = needs(&ops);
        assert_eq!(n.keys, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(n.prefixes, vec!["p/".to_string()]);
        assert_eq!(n.ids, vec![(1, 1), (1, 2), (1, 3)]);
    }

    #[test]
    fn request_ids_are_pruned_by_revision() {
        let every = crate::types::DEDUP_PRUNE_EVERY;
        let before = Lookup { revision: every * 100 - 1, ..Default::default() };
        let (_, fx) = decide(&[op(1, 1, put("k", "v"))], &before);
        assert_eq!(fx.prune_requests_below, Some(every * 100 - crate::types::DEDUP_WINDOW));
        let (_, fx) = decide(&[op(1, 1, KvOp::Delete { key: "k".into() })], &before);
        assert_eq!(fx.prune_requests_below, None, "no write, no new revision, no pruning point");
    }
}
