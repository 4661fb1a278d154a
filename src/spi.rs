//! SPI helpers shared by the worker's storage and the snapshot freeze worker.

use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use raft_kv_core::storage::StoreError;

pub fn spi_err(e: SpiError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Pins this worker session's search_path, so no object a SQL role creates (an operator in
/// `public`, say) is ever resolved by the worker's superuser SQL. Call right after connecting.
pub fn pin_search_path() {
    // SAFETY: called on the main thread of a connected worker; both strings are static.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
}

/// The workers' own session settings, beyond the pinned search_path:
/// - kept statements (see `storage::Plans`) always run their generic plan, instead of being
///   planned again for each call whenever Postgres guesses a custom plan might be cheaper;
/// - the guard triggers on raft_kv's tables, which stop everyone but the workers from writing
///   them, do not fire for the workers at all (`session_replication_role = replica` skips
///   ordinary triggers), instead of calling `is_worker()` for every statement they run.
pub fn worker_session() {
    for (name, value) in [(c"plan_cache_mode", c"force_generic_plan"), (c"session_replication_role", c"replica")] {
        // SAFETY: as in `pin_search_path`.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
}

/// `SET LOCAL synchronous_commit = off`, without parsing and planning a statement.
pub fn local_async_commit() {
    // SAFETY: inside a transaction on the main thread; both strings are static. With elevel 0
    // nothing is raised, and the value is valid.
    unsafe {
        pg_sys::set_config_option(
            c"synchronous_commit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Runs `f` in the current transaction, or in a new one committed at the end.
pub fn in_txn<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: reads the transaction state; no preconditions.
    if unsafe { pg_sys::IsTransactionState() } {
        f()
    } else {
        BackgroundWorker::transaction(AssertUnwindSafe(f))
    }
}

/// `NOTIFY channel, payload` in a transaction of its own (not WAL-logged, so committed
/// asynchronously), outside any other: an error (a full notification queue) is logged and
/// rolled back, never raised.
pub fn notify(channel: &str, payload: &str) {
    let sent = pgrx::PgTryBuilder::new(|| {
        // SAFETY: on the worker's main thread, outside any transaction (every pass ends
        // committed). pg_notify is called directly (no statement to parse and plan) with two
        // text values made in the transaction's memory.
        unsafe {
            pg_sys::StartTransactionCommand();
            local_async_commit();
            pgrx::fcinfo::direct_function_call::<()>(pg_sys::pg_notify, &[channel.into_datum(), payload.into_datum()]);
            pg_sys::CommitTransactionCommand();
        }
        true
    })
    .catch_others(|e| {
        // SAFETY: the error left the transaction started above in an aborted state.
        unsafe { pg_sys::AbortCurrentTransaction() };
        let msg = match &e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
            | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
        };
        pgrx::warning!("raft_kv: NOTIFY {channel} failed: {msg}; watchers polling raft_changes() are unaffected");
        false
    })
    .execute();
    let _ = sent;
}
