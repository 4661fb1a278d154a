//! SPI helpers shared by the worker's storage and the snapshot freeze worker.

use std::panic::AssertUnwindSafe;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
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

/// Runs `f` in the current transaction, or in a new one committed at the end.
pub fn in_txn<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: reads the transaction state; no preconditions.
    if unsafe { pg_sys::IsTransactionState() } {
        f()
    } else {
        BackgroundWorker::transaction(AssertUnwindSafe(f))
    }
}
