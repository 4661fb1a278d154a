//! Multi-key transactions, etcd's `Txn`: if every compare holds, the success ops run, else
//! the failure ops. The whole transaction is one log entry decided when it applies (in
//! `apply`), so it is atomic and isolated cluster-wide, and all its writes share one revision.
//!
//! The SQL form is JSON (`raft_txn`); [`Txn::from_json`] turns it into this typed form and
//! names the offending element when it cannot.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::command::{check_key, check_value};
use crate::types::KvRow;

/// Most compares, and most ops in each branch, one transaction may hold (etcd's default).
pub const MAX_TXN_OPS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// One key, or every key starting with a prefix ("" is every key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    Key(String),
    Prefix(String),
}

impl Scope {
    pub fn contains(&self, key: &str) -> bool {
        match self {
            Scope::Key(k) => k == key,
            Scope::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
}

/// What a compare looks at, with the operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Value(String),
    Version(u64),
    CreateRevision(u64),
    ModRevision(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub scope: Scope,
    pub target: Target,
    pub op: CmpOp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put {
        key: String,
        value: String,
    },
    Delete(Scope),
    /// Answered from the state the compares saw (before this transaction's own writes).
    Get(Scope),
    /// A put attached to a lease (a later variant: the encoding numbers them in order).
    PutLease {
        key: String,
        value: String,
        lease: u64,
    },
}

impl TxnOp {
    /// A put's key, value and lease (0: none).
    pub fn put(&self) -> Option<(&str, &str, u64)> {
        match self {
            TxnOp::Put { key, value } => Some((key, value, 0)),
            TxnOp::PutLease { key, value, lease } => Some((key, value, *lease)),
            TxnOp::Delete(_) | TxnOp::Get(_) => None,
        }
    }
}

fn cmp<T: Ord>(a: T, op: CmpOp, b: T) -> bool {
    match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Gt => a > b,
    }
}

impl Compare {
    /// etcd's rules: every key in scope must satisfy the compare. With no key in scope, a
    /// value compare fails, and the others compare against zero (an absent key has version,
    /// create and mod revision 0).
    pub fn holds(&self, rows: &[&KvRow]) -> bool {
        if rows.is_empty() {
            return match &self.target {
                Target::Value(_) => false,
                Target::Version(n) | Target::CreateRevision(n) | Target::ModRevision(n) => cmp(0, self.op, *n),
            };
        }
        rows.iter().all(|r| match &self.target {
            Target::Value(v) => cmp(r.value.as_str(), self.op, v.as_str()),
            Target::Version(n) => cmp(r.version, self.op, *n),
            Target::CreateRevision(n) => cmp(r.create_revision, self.op, *n),
            Target::ModRevision(n) => cmp(r.mod_revision, self.op, *n),
        })
    }
}

impl Txn {
    fn scopes(&self) -> impl Iterator<Item = &Scope> {
        let ops = self.success.iter().chain(&self.failure).filter_map(|o| match o {
            TxnOp::Put { .. } | TxnOp::PutLease { .. } => None,
            TxnOp::Delete(s) | TxnOp::Get(s) => Some(s),
        });
        self.compare.iter().map(|c| &c.scope).chain(ops)
    }

    /// Single keys whose state deciding the transaction reads.
    pub fn keys(&self) -> Vec<&str> {
        let puts = self.success.iter().chain(&self.failure).filter_map(|o| o.put().map(|p| p.0));
        let scoped = self.scopes().filter_map(|s| match s {
            Scope::Key(k) => Some(k.as_str()),
            Scope::Prefix(_) => None,
        });
        puts.chain(scoped).collect()
    }

    /// Prefixes whose keys deciding the transaction reads.
    pub fn prefixes(&self) -> Vec<&str> {
        self.scopes()
            .filter_map(|s| match s {
                Scope::Prefix(p) => Some(p.as_str()),
                Scope::Key(_) => None,
            })
            .collect()
    }

    /// The rules every transaction obeys, checked when it is built and again when it applies:
    /// valid keys and values, at most [`MAX_TXN_OPS`] compares and ops per branch, and no key
    /// written twice in one branch (etcd refuses those too).
    pub fn validate(&self) -> Result<(), String> {
        for (name, n) in
            [("compare", self.compare.len()), ("success", self.success.len()), ("failure", self.failure.len())]
        {
            if n > MAX_TXN_OPS {
                return Err(format!("{name} has {n} elements, the limit is {MAX_TXN_OPS}"));
            }
        }
        let scope_ok = |s: &Scope| match s {
            Scope::Key(k) => check_key(k),
            Scope::Prefix(p) if p.contains('\0') => Err("a NUL character in a prefix"),
            Scope::Prefix(p) if p.len() > crate::command::MAX_KEY_BYTES => Err("a prefix over the key size limit"),
            Scope::Prefix(_) => Ok(()),
        };
        for (i, c) in self.compare.iter().enumerate() {
            scope_ok(&c.scope).map_err(|e| format!("compare[{i}]: {e}"))?;
            if let Target::Value(v) = &c.target {
                check_value(v).map_err(|e| format!("compare[{i}]: {e}"))?;
            }
        }
        for (name, ops) in [("success", &self.success), ("failure", &self.failure)] {
            for (i, o) in ops.iter().enumerate() {
                let at = |e: &str| format!("{name}[{i}]: {e}");
                match o {
                    TxnOp::Put { key, value } | TxnOp::PutLease { key, value, .. } => {
                        check_key(key).map_err(at)?;
                        check_value(value).map_err(at)?;
                        if matches!(o, TxnOp::PutLease { lease: 0, .. }) {
                            return Err(at("lease 0 is no lease"));
                        }
                        for (j, other) in ops.iter().enumerate().filter(|(j, _)| *j != i) {
                            let clash = match other {
                                TxnOp::Put { key: k, .. } | TxnOp::PutLease { key: k, .. } => k == key && j < i,
                                TxnOp::Delete(s) => s.contains(key),
                                TxnOp::Get(_) => false,
                            };
                            if clash {
                                return Err(at(&format!("the key is also written by {name}[{j}]")));
                            }
                        }
                    }
                    TxnOp::Delete(s) | TxnOp::Get(s) => scope_ok(s).map_err(at)?,
                }
            }
        }
        Ok(())
    }

    /// Parses the SQL form: `compare`, `success` and `failure` are JSON arrays (see the README's
    /// "Transactions"); the error names the offending element.
    pub fn from_json(compare: &Json, success: &Json, failure: &Json) -> Result<Txn, String> {
        let array = |name: &str, v: &'_ Json| -> Result<Vec<Json>, String> {
            match v {
                Json::Array(a) => Ok(a.clone()),
                Json::Null => Ok(Vec::new()),
                _ => Err(format!("{name} must be a JSON array")),
            }
        };
        let mut t = Txn { compare: Vec::new(), success: Vec::new(), failure: Vec::new() };
        for (i, c) in array("compare", compare)?.iter().enumerate() {
            t.compare.push(parse_compare(c).map_err(|e| format!("compare[{i}]: {e}"))?);
        }
        for (name, v, out) in [("success", success, &mut t.success), ("failure", failure, &mut t.failure)] {
            for (i, o) in array(name, v)?.iter().enumerate() {
                out.push(parse_op(o).map_err(|e| format!("{name}[{i}]: {e}"))?);
            }
        }
        t.validate()?;
        Ok(t)
    }
}

type Obj = serde_json::Map<String, Json>;

fn object<'a>(v: &'a Json, allowed: &[&str]) -> Result<&'a Obj, String> {
    let Json::Object(o) = v else { return Err("must be a JSON object".into()) };
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field \"{k}\""));
    }
    Ok(o)
}

fn text<'a>(o: &'a Obj, field: &str) -> Result<Option<&'a str>, String> {
    match o.get(field) {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("\"{field}\" must be a string")),
    }
}

fn scope(o: &Obj) -> Result<Scope, String> {
    match (text(o, "key")?, text(o, "prefix")?) {
        (Some(k), None) => Ok(Scope::Key(k.to_string())),
        (None, Some(p)) => Ok(Scope::Prefix(p.to_string())),
        _ => Err("needs exactly one of \"key\" and \"prefix\"".into()),
    }
}

fn parse_compare(v: &Json) -> Result<Compare, String> {
    let o = object(v, &["key", "prefix", "target", "op", "value"])?;
    let op = match text(o, "op")? {
        Some("=") => CmpOp::Eq,
        Some("!=") => CmpOp::Ne,
        Some("<") => CmpOp::Lt,
        Some(">") => CmpOp::Gt,
        Some(other) => return Err(format!("unknown op \"{other}\" (=, !=, < or >)")),
        None => return Err("missing \"op\"".into()),
    };
    let number = || match o.get("value") {
        Some(Json::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap()),
        _ => Err("\"value\" must be a non-negative integer for this target".to_string()),
    };
    let target = match text(o, "target")? {
        Some("value") => Target::Value(text(o, "value")?.ok_or("\"value\" must be a string for target value")?.into()),
        Some("version") => Target::Version(number()?),
        Some("create_revision") => Target::CreateRevision(number()?),
        Some("mod_revision") => Target::ModRevision(number()?),
        Some(other) => {
            return Err(format!("unknown target \"{other}\" (value, version, create_revision or mod_revision)"))
        }
        None => return Err("missing \"target\"".into()),
    };
    Ok(Compare { scope: scope(o)?, target, op })
}

fn parse_op(v: &Json) -> Result<TxnOp, String> {
    let o = object(v, &["op", "key", "prefix", "value", "lease"])?;
    match text(o, "op")? {
        Some("put") => {
            if o.contains_key("prefix") {
                return Err("a put takes \"key\", not \"prefix\"".into());
            }
            let key = text(o, "key")?.ok_or("a put needs \"key\"")?;
            let value = text(o, "value")?.ok_or("a put needs \"value\"")?;
            match o.get("lease") {
                None | Some(Json::Null) => Ok(TxnOp::Put { key: key.into(), value: value.into() }),
                Some(l) => match l.as_i64() {
                    Some(lease) if lease > 0 => {
                        Ok(TxnOp::PutLease { key: key.into(), value: value.into(), lease: lease as u64 })
                    }
                    _ => Err("\"lease\" must be a lease id (a positive integer)".into()),
                },
            }
        }
        Some(kind @ ("delete" | "get")) => {
            if o.contains_key("lease") {
                return Err(format!("a {kind} takes no \"lease\""));
            }
            if o.contains_key("value") {
                return Err(format!("a {kind} takes no \"value\""));
            }
            let s = scope(o)?;
            Ok(if kind == "delete" { TxnOp::Delete(s) } else { TxnOp::Get(s) })
        }
        Some(other) => Err(format!("unknown op \"{other}\" (put, delete or get)")),
        None => Err("missing \"op\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: &str, m: u64, c: u64, v: u64) -> KvRow {
        KvRow { value: value.into(), mod_revision: m, create_revision: c, version: v, lease: 0 }
    }

    #[test]
    fn compares_follow_etcd() {
        let c = |target, op| Compare { scope: Scope::Key("k".into()), target, op };
        let r = row("b", 7, 3, 2);
        assert!(c(Target::Value("b".into()), CmpOp::Eq).holds(&[&r]));
        assert!(c(Target::Value("a".into()), CmpOp::Gt).holds(&[&r]), "bytewise");
        assert!(c(Target::Value("c".into()), CmpOp::Lt).holds(&[&r]));
        assert!(c(Target::Value("c".into()), CmpOp::Ne).holds(&[&r]));
        assert!(c(Target::Version(2), CmpOp::Eq).holds(&[&r]));
        assert!(c(Target::CreateRevision(4), CmpOp::Lt).holds(&[&r]));
        assert!(c(Target::ModRevision(6), CmpOp::Gt).holds(&[&r]));
        assert!(!c(Target::ModRevision(7), CmpOp::Ne).holds(&[&r]));
        // An absent key: value compares fail whatever the op; the rest compare with 0.
        assert!(!c(Target::Value("x".into()), CmpOp::Ne).holds(&[]));
        assert!(c(Target::Version(0), CmpOp::Eq).holds(&[]));
        assert!(c(Target::CreateRevision(0), CmpOp::Eq).holds(&[]));
        assert!(!c(Target::ModRevision(0), CmpOp::Gt).holds(&[]));
        // A prefix: every key must hold.
        let p = Compare { scope: Scope::Prefix("k".into()), target: Target::Version(1), op: CmpOp::Gt };
        assert!(p.holds(&[&r, &row("x", 9, 9, 5)]));
        assert!(!p.holds(&[&r, &row("x", 9, 9, 1)]));
    }

    #[test]
    fn json_round_trip_and_errors_name_the_element() {
        let t = Txn::from_json(
            &json!([{"key": "a", "target": "mod_revision", "op": "<", "value": 5},
                    {"prefix": "p/", "target": "value", "op": "=", "value": "x"}]),
            &json!([{"op": "put", "key": "a", "value": "1"}, {"op": "delete", "prefix": "p/"}, {"op": "get", "key": "a"}]),
            &json!([]),
        )
        .unwrap();
        assert_eq!(t.compare[0].target, Target::ModRevision(5));
        assert_eq!(t.success[1], TxnOp::Delete(Scope::Prefix("p/".into())));
        assert_eq!(t.keys(), vec!["a", "a", "a"]);
        assert_eq!(t.prefixes(), vec!["p/", "p/"]);
        let err = |c: Json, s: Json| Txn::from_json(&c, &s, &json!([])).unwrap_err();
        assert_eq!(
            err(json!([]), json!([{"op": "putt", "key": "a"}])),
            "success[0]: unknown op \"putt\" (put, delete or get)"
        );
        assert!(err(json!([{"key": "a", "target": "version", "op": "=", "value": "x"}]), json!([]))
            .starts_with("compare[0]:"));
        assert!(err(json!([{"key": "a", "prefix": "b", "target": "version", "op": "=", "value": 1}]), json!([]))
            .contains("exactly one"));
        assert!(err(json!({}), json!([])).contains("compare must be a JSON array"));
        assert!(err(json!([]), json!([{"op": "put", "key": "", "value": "v"}])).starts_with("success[0]: an empty key"));
        assert!(
            err(json!([]), json!([{"op": "put", "key": "a", "value": "v", "x": 1}])).contains("unknown field \"x\"")
        );
        assert!(err(
            json!([]),
            json!([{"op": "put", "key": "a", "value": "1"}, {"op": "put", "key": "a", "value": "2"}])
        )
        .starts_with("success[1]: the key is also written by success[0]"));
        assert!(err(json!([]), json!([{"op": "put", "key": "p/1", "value": "1"}, {"op": "delete", "prefix": "p/"}]))
            .starts_with("success[0]:"));
        let many: Vec<Json> = (0..=MAX_TXN_OPS).map(|i| json!({"op": "get", "key": format!("k{i}")})).collect();
        assert!(err(json!([]), Json::Array(many)).contains("the limit is 128"));
    }
}
