//! raft_kv's core: everything that does not need Postgres.
//!
//! The extension crate wires these pieces to SPI, shared memory and the background worker;
//! here they run in plain `cargo test` with in-memory storage and a simulated network.

// raft's protobuf messages are built by setting fields on a default value, as raft-rs does.
#![allow(clippy::field_reassign_with_default)]

pub mod admission;
pub mod apply;
pub mod backup;
pub mod codec;
pub mod command;
/// Version-1 layouts of what version 2 extended (reading and writing older builds' snapshots).
mod compat_v1;
pub mod config;
/// Test support (the `test-support` feature): never in the extension's library.
#[cfg(any(test, feature = "test-support"))]
pub mod contract;
pub mod lease;
#[cfg(any(test, feature = "test-support"))]
pub mod mem_backend;
pub mod node;
pub mod pending;
#[cfg(any(test, feature = "test-support"))]
pub mod sim;
pub mod snapshot;
pub mod state_machine;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod txn;
pub mod types;

pub use raft;
pub use raft::eraftpb;
