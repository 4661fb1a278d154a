//! The settings the worker runs with, read once at start and validated (the rules live in
//! `raft_kv_core::config`; the certificate files are loaded here).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pgrx::pg_sys;
use raft_kv_core::config::ClusterConfig;
use raft_kv_core::node::NodeOptions;
use raft_kv_core::tls::TlsSetup;
use raft_kv_core::transport::Security;

use crate::guc;

/// Settings the worker runs with, read once at start (they are all postmaster-level).
pub struct Settings {
    pub cluster: ClusterConfig,
    pub database: String,
    pub tick: Duration,
    pub opts: NodeOptions,
    pub security: Security,
}

/// A path setting, relative to the data directory unless absolute (as Postgres's own).
fn path_setting(s: &pgrx::guc::GucSetting<Option<std::ffi::CString>>, name: &str) -> Result<PathBuf, String> {
    let p = guc::string(s).filter(|p| !p.is_empty()).ok_or_else(|| format!("{name} is not set"))?;
    // SAFETY: DataDir is set before any worker starts and never changes.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    Ok(Path::new(&data).join(p))
}

/// Mutual TLS from the certificate settings, or the development-only plain mode.
fn security(cluster: &ClusterConfig) -> Result<Security, String> {
    if !guc::PEER_TLS.get() {
        if !cluster.listen_addr.ip().is_loopback() {
            return Err(format!(
                "raft_kv.peer_tls = off is for development only and needs a loopback raft_kv.listen_addr, not {}",
                cluster.listen_addr
            ));
        }
        return Ok(Security::Plain);
    }
    let cert = path_setting(&guc::SSL_CERT_FILE, "raft_kv.ssl_cert_file")?;
    let key = path_setting(&guc::SSL_KEY_FILE, "raft_kv.ssl_key_file")?;
    let ca = path_setting(&guc::SSL_CA_FILE, "raft_kv.ssl_ca_file")?;
    let tls = TlsSetup::load(&cert, &key, &ca, cluster.node_id).map_err(|e| format!("raft_kv peer TLS: {e}"))?;
    Ok(Security::Tls(Arc::new(tls)))
}

pub fn read_settings() -> Result<Settings, String> {
    let listen = guc::string(&guc::LISTEN_ADDR);
    let advertise = guc::string(&guc::ADVERTISE_ADDR);
    let peers = guc::string(&guc::PEERS);
    let cluster = ClusterConfig::from_settings(
        guc::NODE_ID.get() as i64,
        listen.as_deref(),
        advertise.as_deref(),
        peers.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let (election, heartbeat) = (guc::ELECTION_TICKS.get(), guc::HEARTBEAT_TICKS.get());
    if heartbeat >= election {
        return Err(format!(
            "raft_kv.heartbeat_ticks ({heartbeat}) must be less than raft_kv.election_ticks ({election})"
        ));
    }
    let database = guc::string(&guc::DATABASE).filter(|d| !d.is_empty()).ok_or("raft_kv.database is empty")?;
    let mut opts = NodeOptions::new(cluster.node_id);
    opts.version = env!("CARGO_PKG_VERSION").to_string();
    opts.election_ticks = election as usize;
    opts.heartbeat_ticks = heartbeat as usize;
    let security = security(&cluster)?;
    Ok(Settings { cluster, database, tick: Duration::from_millis(guc::TICK_MS.get() as u64), opts, security })
}
