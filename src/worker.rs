//! The background worker: registration, settings, start-up and exit; the loop itself is in
//! `raft_loop.rs`.
//!
//! Only this process's main thread calls into Postgres. The transport's tokio threads hand
//! messages over a channel and write to an eventfd; backends set the worker's latch. One
//! `WaitLatchOrSocket` waits for both, or for the next tick.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use raft_kv_core::config::ClusterConfig;
use raft_kv_core::node::NodeOptions;
use raft_kv_core::tls::TlsSetup;
use raft_kv_core::transport::Security;

use crate::guc;
use crate::raft_loop::RaftLoop;
use crate::requests;
use crate::shmem::SHARED;
use crate::storage::{in_txn, pin_search_path};

pub fn register() {
    BackgroundWorkerBuilder::new("raft_kv worker")
        .set_type("raft_kv worker")
        .set_function("raft_kv_worker_main")
        .set_library("raft_kv")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

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

fn read_settings() -> Result<Settings, String> {
    let listen = guc::string(&guc::LISTEN_ADDR);
    let peers = guc::string(&guc::PEERS);
    let cluster = ClusterConfig::from_settings(guc::NODE_ID.get() as i64, listen.as_deref(), peers.as_deref())
        .map_err(|e| e.to_string())?;
    let (election, heartbeat) = (guc::ELECTION_TICKS.get(), guc::HEARTBEAT_TICKS.get());
    if heartbeat >= election {
        return Err(format!(
            "raft_kv.heartbeat_ticks ({heartbeat}) must be less than raft_kv.election_ticks ({election})"
        ));
    }
    let database = guc::string(&guc::DATABASE).filter(|d| !d.is_empty()).ok_or("raft_kv.database is empty")?;
    let mut opts = NodeOptions::new(cluster.node_id);
    opts.election_ticks = election as usize;
    opts.heartbeat_ticks = heartbeat as usize;
    let security = security(&cluster)?;
    Ok(Settings { cluster, database, tick: Duration::from_millis(guc::TICK_MS.get() as u64), opts, security })
}

pub fn set_state(running: bool, state: &str) {
    let mut sh = SHARED.exclusive();
    sh.status.running = running;
    sh.status.state.set(state);
}

/// Waits on the latch for `d`; false when the worker must exit.
pub fn pause(d: Duration) -> bool {
    let alive = BackgroundWorker::wait_latch(Some(d));
    if BackgroundWorker::sighup_received() {
        // SAFETY: on the worker's main thread, outside any transaction.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    alive
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn raft_kv_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let epoch = {
        let mut sh = SHARED.exclusive();
        sh.status.epoch += 1;
        // SAFETY: reads this process's pid global.
        sh.status.worker_pid = unsafe { pg_sys::MyProcPid };
        sh.status.worker_procno = crate::shmem::my_procno();
        sh.status.running = false;
        sh.status.state.set("starting");
        sh.status.node_id = guc::NODE_ID.get().max(0) as u64;
        sh.status.listen_addr.set(&guc::string(&guc::LISTEN_ADDR).unwrap_or_default());
        sh.status.peers.set(&guc::string(&guc::PEERS).unwrap_or_default());
        requests::resolve_all(&mut sh, "the raft_kv worker restarted while the request was in flight");
        sh.status.epoch
    };

    let settings = match read_settings() {
        Ok(s) => s,
        Err(e) => {
            let state = format!("configuration error: {e}");
            pgrx::warning!("raft_kv: {state}; the node stays down until the setting is fixed and the server restarted");
            set_state(false, &state);
            while pause(Duration::from_secs(60)) {}
            return exit_cleanly();
        }
    };

    BackgroundWorker::connect_worker_to_spi(Some(&settings.database), None);
    pin_search_path();
    let mut announced = false;
    loop {
        let present = in_txn(|| {
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'raft_kv')")
                .ok()
                .flatten()
                .unwrap_or(false)
        });
        if present {
            break;
        }
        if !announced {
            announced = true;
            let state = format!("waiting for CREATE EXTENSION raft_kv in database \"{}\"", settings.database);
            pgrx::log!("raft_kv: {state}");
            set_state(false, &state);
        }
        if !pause(Duration::from_millis(500)) {
            return exit_cleanly();
        }
    }

    if let Some(raft) = RaftLoop::start(&settings, epoch) {
        raft.run();
    }
    exit_cleanly();
}

/// Fails every waiting request and exits with code 1, so the postmaster starts the worker
/// again (after `pg_terminate_backend`, say) unless the whole server is shutting down.
fn exit_cleanly() {
    {
        let mut sh = SHARED.exclusive();
        sh.status.running = false;
        sh.status.worker_procno = -1;
        sh.status.worker_pid = 0;
        sh.status.state.set("stopped");
        requests::resolve_all(&mut sh, "the raft_kv worker stopped while the request was in flight");
    }
    // SAFETY: the worker's last act; nothing of it is used afterwards.
    unsafe { pg_sys::proc_exit(1) };
}
