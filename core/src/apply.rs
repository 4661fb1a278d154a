//! The state machine's rules, decided once for every backend: what each operation of a batch
//! does, given the state before the batch, and what must be persisted as a result.
//!
//! A backend only looks up the keys and request ids a batch touches ([`needs`]) and stores
//! the [`Effects`] as they are, so the in-memory backend and the tables cannot disagree on
//! what a put, a delete, a compare-and-set or a retried request means.

use std::collections::{BTreeMap, HashMap};

use crate::command::ApplyResult;
use crate::types::{KvOp, OpAt};

/// What a batch's decisions depend on: the stored value and revision of each key it touches,
/// and which of its request ids were applied before, as (node, revision, flag).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Lookup {
    pub kv: HashMap<String, (String, u64)>,
    pub requests: HashMap<(u64, u64), (u64, u64, bool)>,
}

/// What applying a batch changes, for a backend to persist as it is.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// The final value and revision of every key the batch changed; `None`: deleted.
    pub kv: BTreeMap<String, Option<(String, u64)>>,
    /// Request ids the batch applied: (nonce, seq) → (node, revision, flag).
    pub requests: BTreeMap<(u64, u64), (u64, u64, bool)>,
    /// Forget request ids applied below this revision (see `types::dedup_prune_below`).
    pub prune_requests_below: Option<u64>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty() && self.requests.is_empty() && self.prune_requests_below.is_none()
    }
}

/// The keys and request ids whose stored state the batch's decisions read.
pub fn needs(ops: &[OpAt]) -> (Vec<String>, Vec<(u64, u64)>) {
    let mut keys: Vec<String> = ops.iter().map(|o| o.op.key().to_string()).collect();
    keys.sort();
    keys.dedup();
    let mut ids: Vec<(u64, u64)> = ops.iter().map(|o| (o.id.nonce, o.id.seq)).collect();
    ids.sort();
    ids.dedup();
    (keys, ids)
}

/// Applies `ops` in order to the state `before` (and to what earlier ops of the batch did):
/// each op's result for its client, and the batch's effects.
///
/// - A request id applied before (in the window, or earlier in this batch) is a retry: it
///   changes nothing and answers with the first result.
/// - Put writes the value at the op's log index (its revision); its flag is true.
/// - Delete removes the key; its flag says whether the key existed.
/// - Cas writes only if the current value equals `expected` (`None`: the key is absent); its
///   flag says whether it wrote.
pub fn decide(ops: &[OpAt], before: &Lookup) -> (Vec<ApplyResult>, Effects) {
    let mut fx = Effects::default();
    let mut results = Vec::with_capacity(ops.len());
    for o in ops {
        let rid = (o.id.nonce, o.id.seq);
        if let Some(&(_, revision, flag)) = fx.requests.get(&rid).or_else(|| before.requests.get(&rid)) {
            results.push(ApplyResult { revision, flag, duplicate: true });
            continue;
        }
        let key = o.op.key();
        let current: Option<&str> = match fx.kv.get(key) {
            Some(now) => now.as_ref().map(|(v, _)| v.as_str()),
            None => before.kv.get(key).map(|(v, _)| v.as_str()),
        };
        let (flag, write) = match &o.op {
            KvOp::Put { value, .. } => (true, Some(Some(value))),
            KvOp::Delete { .. } => (current.is_some(), current.is_some().then_some(None)),
            KvOp::Cas { expected, value, .. } => {
                let matches = current == expected.as_deref();
                (matches, matches.then_some(Some(value)))
            }
        };
        if let Some(new) = write {
            fx.kv.insert(key.to_string(), new.map(|v| (v.clone(), o.index)));
        }
        fx.requests.insert(rid, (o.id.node, o.index, flag));
        results.push(ApplyResult { revision: o.index, flag, duplicate: false });
    }
    (results, fx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::RequestId;

    fn op(index: u64, seq: u64, op: KvOp) -> OpAt {
        OpAt { id: RequestId { node: 1, nonce: 1, seq }, index, op }
    }
    fn put(k: &str, v: &str) -> KvOp {
        KvOp::Put { key: k.into(), value: v.into() }
    }
    fn cas(k: &str, expected: Option<&str>, v: &str) -> KvOp {
        KvOp::Cas { key: k.into(), expected: expected.map(Into::into), value: v.into() }
    }
    fn ok(revision: u64, flag: bool) -> ApplyResult {
        ApplyResult { revision, flag, duplicate: false }
    }

    #[test]
    fn ops_see_the_state_before_the_batch_and_each_other() {
        let mut before = Lookup::default();
        before.kv.insert("a".into(), ("old".into(), 3));
        let ops = [
            op(10, 1, cas("a", Some("old"), "x")), // matches what was stored
            op(11, 2, cas("a", Some("old"), "y")), // no longer: the first CAS wrote
            op(12, 3, KvOp::Delete { key: "b".into() }),
            op(13, 4, cas("b", None, "new")), // absent: writes
            op(14, 5, KvOp::Delete { key: "a".into() }),
            op(15, 6, put("c", "1")),
        ];
        let (res, fx) = decide(&ops, &before);
        assert_eq!(res, vec![ok(10, true), ok(11, false), ok(12, false), ok(13, true), ok(14, true), ok(15, true)]);
        assert_eq!(fx.kv.get("a"), Some(&None));
        assert_eq!(fx.kv.get("b"), Some(&Some(("new".into(), 13))));
        assert_eq!(fx.kv.get("c"), Some(&Some(("1".into(), 15))));
        assert_eq!(fx.requests.len(), 6);
        assert_eq!(fx.requests[&(1, 2)], (1, 11, false), "a failed CAS is remembered with its result");
    }

    #[test]
    fn a_retried_request_changes_nothing_and_answers_the_first_result() {
        let mut before = Lookup::default();
        before.requests.insert((1, 7), (1, 5, true));
        let ops = [op(20, 7, put("k", "again")), op(21, 8, put("k", "v")), op(22, 8, put("k", "retry"))];
        let (res, fx) = decide(&ops, &before);
        assert_eq!(res[0], ApplyResult { revision: 5, flag: true, duplicate: true });
        assert_eq!(res[2], ApplyResult { revision: 21, flag: true, duplicate: true }, "a retry within the batch");
        assert_eq!(fx.kv.get("k"), Some(&Some(("v".into(), 21))));
        assert!(!fx.requests.contains_key(&(1, 7)));
    }

    #[test]
    fn needs_lists_each_key_and_id_once() {
        let ops = [op(1, 1, put("b", "1")), op(2, 2, put("a", "1")), op(3, 1, put("b", "2"))];
        assert_eq!(needs(&ops), (vec!["a".to_string(), "b".to_string()], vec![(1, 1), (1, 2)]));
    }
}
