//! The background worker: registration, settings, start-up and exit; the loop itself is in
//! `raft_loop.rs`.
//!
//! Only this process's main thread calls into Postgres. The transport's tokio threads hand
//! messages over a channel and write to an eventfd; backends set the worker's latch. One wait
//! set, kept for the loop's life (`raft_loop/wake.rs`), waits for both, or for the next tick.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::guc;
use crate::raft_loop::{pause, RaftLoop};
use crate::requests;
use crate::settings::read_settings;
use crate::shmem::{set_state, SHARED};
use crate::spi::{in_txn, pin_search_path};

pub fn register() {
    BackgroundWorkerBuilder::new("raft_kv worker")
        .set_type("raft_kv worker")
        .set_function("raft_kv_worker_main")
        .set_library("raft_kv")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// The extension version this library implements (its SQL must be installed at this version).
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

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
    crate::spi::worker_session();
    // Wait for the extension, and for its SQL to match this library (after a package upgrade
    // the new library runs on the old SQL until ALTER EXTENSION raft_kv UPDATE).
    let mut announced = String::new();
    loop {
        let installed = in_txn(|| {
            Spi::get_one::<String>("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'raft_kv'")
                .ok()
                .flatten()
        });
        let state = match installed.as_deref() {
            Some(LIBRARY_VERSION) => break,
            Some(v) => format!(
                "version mismatch: the loaded raft_kv library is version {LIBRARY_VERSION} but the extension installed \
                 in database \"{}\" is version {v}; run ALTER EXTENSION raft_kv UPDATE there",
                settings.database
            ),
            None => format!("waiting for CREATE EXTENSION raft_kv in database \"{}\"", settings.database),
        };
        if announced != state {
            pgrx::log!("raft_kv: {state}");
            set_state(false, &state);
            announced = state;
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
