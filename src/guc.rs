//! The `raft_kv.*` settings. Read them on a Postgres thread only (pgrx enforces it).

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

pub static NODE_ID: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static LISTEN_ADDR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ADVERTISE_ADDR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PEERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static TICK_MS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static ELECTION_TICKS: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static HEARTBEAT_TICKS: GucSetting<i32> = GucSetting::<i32>::new(2);
/// A user may make a call wait at most this long (a waiting call holds its session's slot).
const MAX_APPLY_TIMEOUT_MS: i32 = 60_000;
pub static APPLY_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static MAX_VALUE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1 << 20);
pub static SNAPSHOT_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static PROMOTE_LAG: GucSetting<i32> = GucSetting::<i32>::new(64);
pub static HISTORY_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(100_000);

pub static PEER_TLS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static SSL_CERT_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SSL_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SSL_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn register() {
    GucRegistry::define_bool_guc(
        c"raft_kv.peer_tls",
        c"Authenticate and encrypt Raft traffic with mutual TLS.",
        c"Off is for development only, and allowed only when raft_kv.listen_addr is a loopback address.",
        &PEER_TLS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    for (name, short, setting) in [
        (
            c"raft_kv.ssl_cert_file",
            c"PEM certificate (chain) naming this node as raft-kv://<cluster>/node/<id>.",
            &SSL_CERT_FILE,
        ),
        (c"raft_kv.ssl_key_file", c"PEM private key of raft_kv.ssl_cert_file.", &SSL_KEY_FILE),
        (c"raft_kv.ssl_ca_file", c"PEM certificate(s) of the CA that signs every node's certificate.", &SSL_CA_FILE),
    ] {
        GucRegistry::define_string_guc(
            name,
            short,
            c"A relative path is relative to the data directory.",
            setting,
            GucContext::Postmaster,
            GucFlags::SUPERUSER_ONLY,
        );
    }
    GucRegistry::define_int_guc(
        c"raft_kv.node_id",
        c"This node's Raft id (a positive integer, unique in the cluster).",
        c"Required. Must appear in raft_kv.peers when this node is one of the initial members.",
        &NODE_ID,
        0,
        raft_kv_core::config::MAX_NODE_ID as i32,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"raft_kv.listen_addr",
        c"IP:port the worker listens on for Raft traffic from the other nodes.",
        c"",
        &LISTEN_ADDR,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"raft_kv.advertise_addr",
        c"IP:port the other nodes dial to reach this one, when it differs from raft_kv.listen_addr.",
        c"Needed when listen_addr is a wildcard (0.0.0.0) or the node sits behind NAT or a port mapping; this node's entry in raft_kv.peers must equal it. Empty means listen_addr.",
        &ADVERTISE_ADDR,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"raft_kv.peers",
        c"Initial members as id=IP:port, comma-separated, including this node.",
        c"Used to bootstrap the cluster on first start; afterwards only to learn addresses.",
        &PEERS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"raft_kv.database",
        c"Database in which the extension's tables live and the worker connects.",
        c"",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"raft_kv.tick_ms",
        c"Length of one Raft tick.",
        c"Election and heartbeat timeouts are counted in ticks.",
        &TICK_MS,
        10,
        10_000,
        GucContext::Postmaster,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"raft_kv.election_ticks",
        c"Ticks without hearing from a leader before a follower campaigns.",
        c"The election timeout is randomised between this and twice this.",
        &ELECTION_TICKS,
        2,
        1000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"raft_kv.heartbeat_ticks",
        c"Ticks between leader heartbeats; must be less than raft_kv.election_ticks.",
        c"",
        &HEARTBEAT_TICKS,
        1,
        1000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"raft_kv.apply_timeout",
        c"How long a raft_kv call waits for its write to commit and apply before failing.",
        c"",
        &APPLY_TIMEOUT_MS,
        100,
        MAX_APPLY_TIMEOUT_MS,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"raft_kv.max_value_bytes",
        c"Largest value raft_set accepts, in bytes.",
        c"",
        &MAX_VALUE_BYTES,
        1,
        64 << 20,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"raft_kv.snapshot_threshold",
        c"Log entries kept past the last snapshot point before the log is compacted.",
        c"Compaction keeps a tenth of this as a margin for slightly lagging followers.",
        &SNAPSHOT_THRESHOLD,
        10,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"raft_kv.history_retention",
        c"How many revisions of history (raft_changes, reads at a revision) are kept; 0 keeps all.",
        c"The leader compacts older history through the log, in steps of a tenth of this, so every node keeps the same history.",
        &HISTORY_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"raft_kv.promote_lag",
        c"A joining learner becomes a voter once its log is within this many entries of the leader's.",
        c"",
        &PROMOTE_LAG,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: called from _PG_init in the postmaster with a static C string.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"raft_kv".as_ptr()) };
}

pub fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get().map(|c| c.to_string_lossy().into_owned())
}
