//! raft-rs's own log lines, gathered while the node runs and written to the Postgres log by
//! the worker's loop (only the main thread may call into Postgres).

use std::sync::{Arc, Mutex};

/// raft-rs's own log, collected as it is written (on this thread, inside the node's calls)
/// and written to the Postgres log once per loop pass, at levels that keep normal operation
/// quiet: errors as WARNING, warnings as LOG, information as DEBUG1; debug output is dropped.
#[derive(Clone, Default)]
pub struct RaftLog(Arc<Mutex<Vec<(slog::Level, String)>>>);

/// Lines kept between two flushes; more are dropped (counted in the next line).
const RAFT_LOG_LINES: usize = 256;

impl RaftLog {
    pub fn logger(&self) -> slog::Logger {
        slog::Logger::root(self.clone(), slog::o!())
    }

    pub fn flush(&self) {
        let lines = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for (level, line) in lines {
            match level {
                slog::Level::Critical | slog::Level::Error => pgrx::warning!("raft_kv: raft: {line}"),
                slog::Level::Warning => pgrx::log!("raft_kv: raft: {line}"),
                _ => pgrx::debug1!("raft_kv: raft: {line}"),
            }
        }
    }
}

impl slog::Drain for RaftLog {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        if !record.level().is_at_least(slog::Level::Info) {
            return Ok(());
        }
        let mut line = record.msg().to_string();
        let mut kv = KvLine(&mut line);
        // Writing into a String cannot fail.
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() < RAFT_LOG_LINES {
            lines.push((record.level(), line));
        }
        Ok(())
    }
}

/// Appends `, key: value` pairs to a log line.
struct KvLine<'a>(&'a mut String);

impl slog::Serializer for KvLine<'_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, ", {key}: {val}");
        Ok(())
    }
}
