//! Parsing and validating the node's settings, independent of how they are read.
//!
//! The worker reads the GUCs and hands the raw strings here, so every rule about what a
//! valid cluster configuration is lives in one place and is unit-tested without Postgres.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// Highest node id accepted; ids are also used as array indexes in shared memory slots.
pub const MAX_NODE_ID: u64 = 1 << 20;

/// Most members a cluster may have (shared memory reserves a row per member).
pub const MAX_MEMBERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("raft_kv.node_id is not set (it must be a positive integer)")]
    MissingNodeId,
    #[error("raft_kv.listen_addr is not set (it must be host:port)")]
    MissingListenAddr,
    #[error("invalid address \"{0}\": expected host:port with a numeric IP address and port")]
    BadAddress(String),
    #[error("invalid raft_kv.peers entry \"{0}\": expected id=host:port")]
    BadPeerEntry(String),
    #[error("invalid node id \"{0}\" in raft_kv.peers: expected an integer between 1 and {MAX_NODE_ID}")]
    BadNodeId(String),
    #[error("node id {0} appears more than once in raft_kv.peers")]
    DuplicateId(u64),
    #[error("address {0} is used by more than one node in raft_kv.peers")]
    DuplicateAddress(SocketAddr),
    #[error("this node's advertised address {advertised} (raft_kv.advertise_addr, or raft_kv.listen_addr when that is unset) differs from the address {listed} given for node {id} in raft_kv.peers")]
    ListenMismatch { id: u64, advertised: SocketAddr, listed: SocketAddr },
    #[error(
        "raft_kv.listen_addr {0} is a wildcard address; set raft_kv.advertise_addr to the address the other nodes dial"
    )]
    WildcardNeedsAdvertise(SocketAddr),
    #[error("raft_kv.advertise_addr {0} is a wildcard address; other nodes cannot dial it")]
    WildcardAdvertised(SocketAddr),
    #[error("raft_kv.peers lists {0} members; at most {MAX_MEMBERS} are supported")]
    TooManyPeers(usize),
}

/// Parses `host:port` where host is a literal IP (v4, or v6 in brackets).
///
/// Hostnames are refused rather than resolved: resolution would block the worker and
/// make a node's identity depend on DNS.
pub fn parse_addr(s: &str) -> Result<SocketAddr, ConfigError> {
    let t = s.trim();
    let a: SocketAddr = t.parse().map_err(|_| ConfigError::BadAddress(t.to_string()))?;
    if a.port() == 0 {
        return Err(ConfigError::BadAddress(t.to_string()));
    }
    Ok(a)
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`; an empty string is an empty map.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, SocketAddr>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| ConfigError::BadPeerEntry(part.to_string()))?;
        let id_s = id.trim();
        let id: u64 = id_s.parse().map_err(|_| ConfigError::BadNodeId(id_s.to_string()))?;
        if id == 0 || id > MAX_NODE_ID {
            return Err(ConfigError::BadNodeId(id_s.to_string()));
        }
        let addr = parse_addr(addr)?;
        if peers.values().any(|a| *a == addr) {
            return Err(ConfigError::DuplicateAddress(addr));
        }
        if peers.insert(id, addr).is_some() {
            return Err(ConfigError::DuplicateId(id));
        }
    }
    if peers.len() > MAX_MEMBERS {
        return Err(ConfigError::TooManyPeers(peers.len()));
    }
    Ok(peers)
}

/// The validated identity of this node and the initial membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_id: u64,
    /// Where the worker binds (may be a wildcard such as `0.0.0.0:7001`).
    pub listen_addr: SocketAddr,
    /// Where the other nodes reach this one (behind NAT or a container port mapping it differs
    /// from `listen_addr`); this node's entry in `peers` and in `raft_join` is this address.
    pub advertise_addr: SocketAddr,
    /// The initial members, including this node when it bootstraps. A node not listed (or
    /// with no peers at all) waits to be added to an existing cluster with `raft_join`; the
    /// peers it does list only tell it addresses.
    pub peers: BTreeMap<u64, SocketAddr>,
}

impl ClusterConfig {
    /// Validates the raw settings. `node_id <= 0` means unset; an unset or empty
    /// `advertise_addr` means the listen address.
    pub fn from_settings(
        node_id: i64,
        listen_addr: Option<&str>,
        advertise_addr: Option<&str>,
        peers: Option<&str>,
    ) -> Result<Self, ConfigError> {
        if node_id <= 0 {
            return Err(ConfigError::MissingNodeId);
        }
        let node_id = node_id as u64;
        if node_id > MAX_NODE_ID {
            return Err(ConfigError::BadNodeId(node_id.to_string()));
        }
        let listen = match listen_addr.map(str::trim) {
            None | Some("") => return Err(ConfigError::MissingListenAddr),
            Some(s) => parse_addr(s)?,
        };
        let advertised = match advertise_addr.map(str::trim) {
            None | Some("") if listen.ip().is_unspecified() => return Err(ConfigError::WildcardNeedsAdvertise(listen)),
            None | Some("") => listen,
            Some(s) => parse_addr(s)?,
        };
        if advertised.ip().is_unspecified() {
            return Err(ConfigError::WildcardAdvertised(advertised));
        }
        let peers = parse_peers(peers.unwrap_or(""))?;
        if let Some(listed) = peers.get(&node_id) {
            if *listed != advertised {
                return Err(ConfigError::ListenMismatch { id: node_id, advertised, listed: *listed });
            }
        }
        Ok(ClusterConfig { node_id, listen_addr: listen, advertise_addr: advertised, peers })
    }

    /// A node bootstraps a new cluster only when it is one of the configured initial members.
    pub fn bootstraps(&self) -> bool {
        self.peers.contains_key(&self.node_id)
    }
}

impl fmt::Display for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", format_peers(&self.peers))
    }
}

pub fn format_peers(peers: &BTreeMap<u64, SocketAddr>) -> String {
    peers.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEERS: &str = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003";

    #[test]
    fn valid_three_nodes() {
        let c = ClusterConfig::from_settings(2, Some("127.0.0.1:7002"), None, Some(PEERS)).unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.peers.len(), 3);
        assert!(c.bootstraps());
        assert_eq!(c.to_string(), PEERS);
    }

    #[test]
    fn tolerates_spaces_and_trailing_comma() {
        let p = parse_peers(" 1 = 127.0.0.1:7001 , 2=[::1]:7002, ").unwrap();
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn empty_peers_means_joining() {
        let c = ClusterConfig::from_settings(4, Some("127.0.0.1:7004"), None, Some("")).unwrap();
        assert!(!c.bootstraps());
    }

    #[test]
    fn errors() {
        use ConfigError::*;
        let e = |id, l: &str, p: &str| ClusterConfig::from_settings(id, Some(l), None, Some(p)).unwrap_err();
        assert_eq!(e(0, "127.0.0.1:7001", PEERS), MissingNodeId);
        assert_eq!(ClusterConfig::from_settings(1, None, None, Some(PEERS)).unwrap_err(), MissingListenAddr);
        assert_eq!(e(1, "127.0.0.1:7001", "1=127.0.0.1:7001,1=127.0.0.1:7002"), DuplicateId(1));
        assert!(matches!(e(1, "127.0.0.1:7001", "1=127.0.0.1:7001,2=127.0.0.1:7001"), DuplicateAddress(_)));
        assert_eq!(e(1, "127.0.0.1:7001", "1=127.0.0.1:7001,garbage"), BadPeerEntry("garbage".into()));
        assert_eq!(e(1, "127.0.0.1:7001", "x=127.0.0.1:7001"), BadNodeId("x".into()));
        assert_eq!(e(1, "127.0.0.1:7001", "0=127.0.0.1:7001"), BadNodeId("0".into()));
        assert_eq!(e(1, "127.0.0.1:7001", "1=localhost:7001"), BadAddress("localhost:7001".into()));
        assert_eq!(e(1, "127.0.0.1:99999", ""), BadAddress("127.0.0.1:99999".into()));
        assert_eq!(e(1, "127.0.0.1:0", ""), BadAddress("127.0.0.1:0".into()));
        assert!(matches!(e(1, "127.0.0.1:7009", PEERS), ListenMismatch { id: 1, .. }));
        let many = (1..=17).map(|i| format!("{i}=127.0.0.1:{}", 7000 + i)).collect::<Vec<_>>().join(",");
        assert_eq!(e(1, "127.0.0.1:7001", &many), TooManyPeers(17));
    }

    #[test]
    fn a_node_outside_the_peers_joins_instead_of_bootstrapping() {
        let c = ClusterConfig::from_settings(4, Some("127.0.0.1:7004"), None, Some(PEERS)).unwrap();
        assert!(!c.bootstraps());
        assert_eq!(c.peers.len(), 3);
    }

    #[test]
    fn a_wildcard_bind_advertises_another_address() {
        let c = ClusterConfig::from_settings(
            3,
            Some("0.0.0.0:7003"),
            Some("127.0.0.3:7003"),
            Some("1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.3:7003"),
        )
        .unwrap();
        assert!(c.listen_addr.ip().is_unspecified());
        assert_eq!(c.advertise_addr, "127.0.0.3:7003".parse().unwrap());
        assert!(c.bootstraps());
        // Behind a port mapping the advertised port differs from the bound one.
        let c = ClusterConfig::from_settings(1, Some("0.0.0.0:7001"), Some("10.0.0.5:17001"), Some("1=10.0.0.5:17001"))
            .unwrap();
        assert_eq!(c.listen_addr.port(), 7001);
        use ConfigError::*;
        let e = |l: &str, a: Option<&str>, p: &str| ClusterConfig::from_settings(1, Some(l), a, Some(p)).unwrap_err();
        assert!(matches!(e("0.0.0.0:7001", None, ""), WildcardNeedsAdvertise(_)));
        assert!(matches!(e("[::]:7001", Some(""), ""), WildcardNeedsAdvertise(_)));
        assert!(matches!(e("127.0.0.1:7001", Some("0.0.0.0:7001"), ""), WildcardAdvertised(_)));
        assert!(matches!(e("0.0.0.0:7001", Some("127.0.0.1:7001"), "1=127.0.0.2:7001"), ListenMismatch { .. }));
        assert!(matches!(e("0.0.0.0:7001", Some("host:7001"), ""), BadAddress(_)));
    }

    #[test]
    fn messages_are_readable() {
        assert_eq!(ConfigError::DuplicateId(4).to_string(), "node id 4 appears more than once in raft_kv.peers");
    }
}
