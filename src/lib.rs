//! raft_kv: a PostgreSQL extension that makes the server a Raft node of a replicated,
//! strongly consistent key-value store.
//!
//! Postgres-specific glue lives here (settings, shared memory, the worker, SPI storage, SQL
//! functions); the Raft logic itself is in the `raft_kv_core` crate.

// Protobuf entries are built field by field (as raft-rs does); pgrx spells table-returning
// functions' row types out in their signatures.
#![allow(clippy::field_reassign_with_default, clippy::type_complexity)]

use pgrx::prelude::*;

mod batch_rows;
mod cluster_api;
mod concurrency_api;
mod freeze;
mod guc;
mod heap_write;
mod history_api;
mod index_probe;
mod kv_api;
mod kv_probe;
mod lease_api;
mod peers;
mod raft_log;
mod raft_loop;
mod recovery_api;
mod requests;
mod scan_api;
mod settings;
mod shmem;
mod snapshot_tables;
mod spi;
mod sql_boundary;
mod stat_api;
mod storage;
mod txn_api;
mod worker;

::pgrx::pg_module_magic!();

// The tables, roles and grants; after every function, which the grants name.
extension_sql_file!("../sql/schema.sql", name = "create_tables", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reads a postmaster global that is set while libraries are preloaded.
    if !unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    guc::register();
    shmem::init();
    worker::register();
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'raft_kv'",
            "raft_kv.database = 'pgrx_tests'",
            "raft_kv.node_id = 1",
            "raft_kv.listen_addr = '127.0.0.1:57931'",
            "raft_kv.peers = '1=127.0.0.1:57931'",
            // A single-node test server: no peers to authenticate.
            "raft_kv.peer_tls = off",
        ]
    }
}
