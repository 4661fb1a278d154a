//! A linearizability checker for histories of single-key registers (Wing & Gong's search with
//! Lowe's memoisation, one key at a time, as Knossos and Porcupine do).
//!
//! Operations: `Write(v)` (raft_set), `Cas { expected, new }` (raft_cas; `expected = None`
//! means "absent"), `Read` (raft_get). An operation whose outcome is unknown may take effect
//! at any point after its invocation, or never; its result is unconstrained. Operations that
//! certainly failed must be left out of the history.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Write(String),
    Cas { expected: Option<String>, new: String },
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A write that returned.
    Written,
    Cas(bool),
    Read(Option<String>),
    /// May or may not have happened.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub kind: Kind,
    pub outcome: Outcome,
    /// Nanoseconds since the start of the run.
    pub invoke: u64,
    /// `None` for unknown outcomes (the operation never certainly completed).
    pub complete: Option<u64>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.complete.map(|c| format!("{:.3}", c as f64 / 1e9)).unwrap_or_else(|| "?".into());
        write!(
            f,
            "[{:>8.3}s .. {:>8}s] client {} {} {:?} -> {:?}",
            self.invoke as f64 / 1e9,
            end,
            self.client,
            self.key,
            self.kind,
            self.outcome
        )
    }
}

/// Why a key's history is not linearizable.
#[derive(Debug)]
pub struct Violation {
    pub key: String,
    /// The operations around the point where no linearization could continue.
    pub sub_history: Vec<Op>,
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {:?} is not linearizable: {}", self.key, self.explanation)?;
        for op in &self.sub_history {
            writeln!(f, "  {op}")?;
        }
        Ok(())
    }
}

/// Applies `op` to a register holding `state`; `None` when the recorded outcome is impossible.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    match (&op.kind, &op.outcome) {
        (Kind::Write(v), Outcome::Written | Outcome::Unknown) => Some(Some(v.clone())),
        (Kind::Cas { expected, new }, out) => {
            let applies = state == expected;
            match out {
                Outcome::Cas(b) if *b != applies => None,
                Outcome::Cas(_) | Outcome::Unknown => Some(if applies { Some(new.clone()) } else { state.clone() }),
                _ => None,
            }
        }
        (Kind::Read, Outcome::Read(v)) => (v == state).then(|| state.clone()),
        (Kind::Read, Outcome::Unknown) => Some(state.clone()),
        _ => None,
    }
}

/// Checks one key's operations (all with the same key).
pub fn check_key(key: &str, ops: &[Op]) -> Result<(), Violation> {
    let mut ops: Vec<Op> = ops.to_vec();
    ops.sort_by_key(|o| o.invoke);
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let end = |o: &Op| o.complete.unwrap_or(u64::MAX);
    let known: Vec<usize> = (0..n).filter(|&i| ops[i].complete.is_some()).collect();

    // Depth-first search over (set of linearized ops, register value).
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<String>, usize)> = vec![(vec![0; words], None, 0)];
    let mut deepest = 0usize;
    let mut deepest_state: (Vec<u64>, Option<String>) = (vec![0; words], None);
    let is_done = |d: &[u64], i: usize| d[i / 64] >> (i % 64) & 1 == 1;
    while let Some((done, state, depth)) = stack.pop() {
        if known.iter().all(|&i| is_done(&done, i)) {
            return Ok(());
        }
        if !seen.insert((done.clone(), state.clone())) {
            continue;
        }
        if depth >= deepest {
            deepest = depth;
            deepest_state = (done.clone(), state.clone());
        }
        // An op may go next only if it was invoked before every remaining op returned.
        let min_end = (0..n).filter(|&i| !is_done(&done, i)).map(|i| end(&ops[i])).min().unwrap_or(u64::MAX);
        for i in (0..n).filter(|&i| !is_done(&done, i) && ops[i].invoke < min_end) {
            if let Some(next) = step(&state, &ops[i]) {
                let mut d = done.clone();
                d[i / 64] |= 1 << (i % 64);
                stack.push((d, next, depth + 1));
            }
        }
    }
    // Report the ops still pending where the search got furthest.
    let (done, state) = deepest_state;
    let min_end = (0..n).filter(|&i| !is_done(&done, i)).map(|i| end(&ops[i])).min().unwrap_or(u64::MAX);
    let frontier: Vec<Op> =
        (0..n).filter(|&i| !is_done(&done, i) && ops[i].invoke <= min_end).map(|i| ops[i].clone()).collect();
    let last_done: Vec<Op> = (0..n).filter(|&i| is_done(&done, i)).map(|i| ops[i].clone()).rev().take(5).collect();
    let mut sub: Vec<Op> = last_done.into_iter().rev().chain(frontier).collect();
    sub.sort_by_key(|o| o.invoke);
    Err(Violation {
        key: key.to_string(),
        sub_history: sub,
        explanation: format!(
            "after {deepest} operations (register = {state:?}) none of the pending operations can take effect"
        ),
    })
}

/// Checks a whole history, key by key.
pub fn check(history: &[Op]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        check_key(key, &ops)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, kind: Kind, outcome: Outcome, invoke: u64, complete: Option<u64>) -> Op {
        Op { client, key: "x".into(), kind, outcome, invoke, complete }
    }
    fn w(c: usize, v: &str, a: u64, b: u64) -> Op {
        op(c, Kind::Write(v.into()), Outcome::Written, a, Some(b))
    }
    fn r(c: usize, v: Option<&str>, a: u64, b: u64) -> Op {
        op(c, Kind::Read, Outcome::Read(v.map(Into::into)), a, Some(b))
    }
    fn cas(c: usize, e: Option<&str>, n: &str, ok: bool, a: u64, b: u64) -> Op {
        op(c, Kind::Cas { expected: e.map(Into::into), new: n.into() }, Outcome::Cas(ok), a, Some(b))
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![r(0, None, 0, 1), w(0, "a", 2, 3), r(1, Some("a"), 4, 5), w(1, "b", 6, 7), r(0, Some("b"), 8, 9)];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        let h = vec![
            w(0, "a", 0, 1),
            w(0, "b", 2, 10),
            r(1, Some("a"), 3, 4),
            r(2, Some("b"), 5, 6),
            r(1, Some("b"), 11, 12),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn stale_read_is_flagged() {
        // b was written (and acknowledged) before the read began; the read returned a.
        let h = vec![w(0, "a", 0, 1), w(0, "b", 2, 3), r(1, Some("a"), 4, 5)];
        let v = check(&h).unwrap_err();
        assert!(v.sub_history.iter().any(|o| o.outcome == Outcome::Read(Some("a".into()))), "{v}");
    }

    #[test]
    fn lost_write_is_flagged() {
        let h = vec![w(0, "a", 0, 1), r(1, None, 2, 3)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn read_going_back_in_time_is_flagged() {
        // Two sequential reads by the same client: new value, then old value.
        let h = vec![w(0, "a", 0, 1), w(0, "b", 2, 20), r(1, Some("b"), 3, 4), r(1, Some("a"), 5, 6)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_write_may_or_may_not_happen() {
        let unknown = op(0, Kind::Write("u".into()), Outcome::Unknown, 2, None);
        let happened = vec![w(0, "a", 0, 1), unknown.clone(), r(1, Some("u"), 10, 11)];
        assert!(check(&happened).is_ok());
        let did_not = vec![w(0, "a", 0, 1), unknown.clone(), r(1, Some("a"), 10, 11)];
        assert!(check(&did_not).is_ok());
        // But once seen, it cannot be un-seen.
        let flip = vec![w(0, "a", 0, 1), unknown, r(1, Some("u"), 10, 11), r(1, Some("a"), 12, 13)];
        assert!(check(&flip).is_err());
    }

    #[test]
    fn two_winning_cas_from_the_same_value_are_flagged() {
        let h = vec![cas(0, None, "p", true, 0, 10), cas(1, None, "q", true, 1, 11)];
        assert!(check(&h).is_err());
        let ok = vec![cas(0, None, "p", true, 0, 10), cas(1, None, "q", false, 1, 11), r(2, Some("p"), 12, 13)];
        assert!(check(&ok).is_ok());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![w(0, "a", 0, 1)];
        let mut other = r(1, None, 2, 3);
        other.key = "y".into();
        h.push(other);
        assert!(check(&h).is_ok());
    }

    #[test]
    fn larger_concurrent_history_stays_fast() {
        // 4 clients, 400 overlapping writes and reads on one key, all consistent with a
        // sequential order: the memoised search must finish quickly.
        let mut h = Vec::new();
        let mut t = 0;
        let mut last = None::<String>;
        for i in 0..100 {
            let v = format!("v{i}");
            h.push(w(i % 4, &v, t, t + 5));
            h.push(r((i + 1) % 4, last.as_deref(), t + 1, t + 2));
            h.push(r((i + 2) % 4, Some(&v), t + 6, t + 7));
            h.push(op((i + 3) % 4, Kind::Write(format!("u{i}")), Outcome::Unknown, t + 8, None));
            last = Some(v);
            t += 10;
        }
        let start = std::time::Instant::now();
        // Unknown writes that never show up are allowed.
        let reads_after_unknown_ok = check(&h);
        assert!(reads_after_unknown_ok.is_ok(), "{}", reads_after_unknown_ok.unwrap_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
}
