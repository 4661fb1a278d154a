//! The snapshot freeze worker: a short-lived background worker that copies the state machine
//! into the snapshot tables, so the Raft worker keeps ticking, replicating and applying while
//! a large table is copied (a long pause there would cost the leadership, and again on the
//! next leader). Its REPEATABLE READ transaction sees one committed state: the tables as of
//! one applied index, which it records in `raft_kv.snapshot_meta` with that index's
//! configuration and member addresses.

use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, DynamicBackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::SHARED;
use crate::storage::{freeze_tables, pin_search_path, write_frozen};

/// Starts a freeze in `database`; `None` when no worker slot is free.
pub fn launch(database: &str) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new("raft_kv snapshot freeze")
        .set_type("raft_kv snapshot freeze")
        .set_library("raft_kv")
        .set_function("raft_kv_freeze_main")
        .enable_spi_access()
        .set_extra(database)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn raft_kv_freeze_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    // The guard triggers let this process write the snapshot tables.
    SHARED.exclusive().status.freeze_pid = unsafe { pg_sys::MyProcPid };
    BackgroundWorker::connect_worker_to_spi(Some(BackgroundWorker::get_extra()), None);
    pin_search_path();
    // One snapshot for every statement of the copy (SPI takes one before any statement, so
    // SET TRANSACTION would come too late).
    unsafe { pg_sys::DefaultXactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32 };
    let result = BackgroundWorker::transaction(AssertUnwindSafe(|| {
        Spi::connect_mut(|c| {
            let frozen = freeze_tables(c, &|sql| sql.to_string())?;
            write_frozen(c, &frozen)
        })
    }));
    SHARED.exclusive().status.freeze_pid = 0;
    if let Err(e) = result {
        pgrx::error!("raft_kv: freezing the state machine for a snapshot failed: {e}");
    }
}
