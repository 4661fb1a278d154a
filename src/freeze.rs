//! The snapshot freeze worker: a short-lived background worker that copies the state machine
//! into the snapshot tables, so the Raft worker keeps ticking, replicating and applying while
//! a large table is copied (a long pause there would cost the leadership, and again on the
//! next leader). Its REPEATABLE READ transaction sees one committed state: the tables as of
//! one applied index, which it records in `raft_kv.snapshot_meta` with that index's
//! configuration and member addresses.

use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::SHARED;
use raft_kv_core::snapshot::Frozen;
use raft_kv_core::storage::StoreResult;

use crate::snapshot_tables::{freeze_tables, read_frozen, write_frozen};
use crate::spi::{in_txn, pin_search_path, spi_err};
use crate::storage::Freezer;

/// The Raft worker's [`Freezer`]: starts a freeze worker, and picks up its copy once done.
pub struct BackgroundFreeze {
    database: String,
    running: Option<(DynamicBackgroundWorker, std::time::Instant)>,
    /// When the last freeze failed: the next waits a little.
    failed_at: Option<std::time::Instant>,
}

/// Pause after a failed freeze before the next attempt.
const FREEZE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl BackgroundFreeze {
    pub fn new(database: &str) -> Self {
        BackgroundFreeze { database: database.to_string(), running: None, failed_at: None }
    }
}

impl Freezer for BackgroundFreeze {
    fn freeze(&mut self) -> StoreResult<Option<Frozen>> {
        let bg = self;
        if let Some((worker, started)) = bg.running.take() {
            match worker.pid() {
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => {
                    bg.running = Some((worker, started));
                    return Ok(None);
                }
                Err(_) => {}
            }
            // It may have died before clearing its pid (which would then let a later process
            // with that pid past the guard triggers).
            SHARED.exclusive().status.freeze_pid = 0;
            match in_txn(|| Spi::connect(read_frozen))? {
                Some(f) => {
                    pgrx::log!(
                        "raft_kv: froze the state machine at index {} for snapshots ({} rows, {} request ids) in {} ms, \
                         in the background",
                        f.index,
                        f.kv_rows,
                        f.request_rows,
                        started.elapsed().as_millis()
                    );
                    return Ok(Some(f));
                }
                None => {
                    pgrx::warning!("raft_kv: the snapshot freeze worker ended without a result; trying again");
                    bg.failed_at = Some(std::time::Instant::now());
                }
            }
        }
        if bg.failed_at.is_some_and(|at| at.elapsed() < FREEZE_RETRY) {
            return Ok(None);
        }
        in_txn(|| Spi::connect_mut(|c| c.update("TRUNCATE raft_kv.snapshot_meta", None, &[]).map(|_| ())))
            .map_err(spi_err)?;
        match launch(&bg.database) {
            Some(worker) => bg.running = Some((worker, std::time::Instant::now())),
            None => {
                pgrx::warning!("raft_kv: cannot start the snapshot freeze worker (max_worker_processes?); will retry")
            }
        }
        Ok(None)
    }

    fn cancel(&mut self) {
        if let Some((worker, _)) = self.running.take() {
            if let Err(e) = worker.terminate().wait_for_shutdown() {
                pgrx::log!("raft_kv: stopping the snapshot freeze worker: {e:?}");
            }
            SHARED.exclusive().status.freeze_pid = 0;
        }
    }
}

/// Starts a freeze in `database`; `None` when no worker slot is free.
fn launch(database: &str) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new("raft_kv snapshot freeze")
        .set_type("raft_kv snapshot freeze")
        .set_library("raft_kv")
        .set_function("raft_kv_freeze_main")
        .enable_spi_access()
        .set_extra(database)
        // SAFETY: reads this process's pid global.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn raft_kv_freeze_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    // The guard triggers let this process write the snapshot tables.
    // SAFETY: reads this process's pid global.
    SHARED.exclusive().status.freeze_pid = unsafe { pg_sys::MyProcPid };
    BackgroundWorker::connect_worker_to_spi(Some(BackgroundWorker::get_extra()), None);
    pin_search_path();
    crate::spi::worker_session();
    // One snapshot for every statement of the copy (SPI takes one before any statement, so
    // SET TRANSACTION would come too late).
    // SAFETY: this process's own default, set before its only transaction starts.
    unsafe { pg_sys::DefaultXactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32 };
    let result = BackgroundWorker::transaction(AssertUnwindSafe(|| {
        Spi::connect_mut(|c| {
            let frozen = freeze_tables(c, &|sql| sql.to_string())?;
            write_frozen(c, &frozen)
        })
    }));
    SHARED.exclusive().status.freeze_pid = 0;
    // SAFETY: the transaction has ended; the process exits next, so this is the last flush.
    unsafe { pg_sys::pgstat_report_stat(true) };
    if let Err(e) = result {
        pgrx::error!("raft_kv: freezing the state machine for a snapshot failed: {e}");
    }
}
