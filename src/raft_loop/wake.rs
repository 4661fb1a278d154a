//! What wakes the worker's loop: its latch (a backend's request, a signal), an eventfd the
//! network threads write to, and postmaster death. The wait set is built once: a
//! `WaitLatchOrSocket` per pass would create, fill and close an epoll set every time (five
//! system calls more per pass, on every write and read).

use std::os::fd::RawFd;
use std::sync::Arc;

use pgrx::pg_sys;
use raft_kv_core::transport::Waker;

/// An eventfd the transport threads write to, so the loop also wakes for network input.
pub(super) struct EventFd(RawFd);

impl EventFd {
    pub(super) fn new() -> Self {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            pgrx::error!("raft_kv: eventfd failed: {}", std::io::Error::last_os_error());
        }
        EventFd(fd)
    }

    pub(super) fn waker(&self) -> Waker {
        let fd = self.0;
        Arc::new(move || {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to the eventfd, which outlives the
            // transport (the loop shuts the transport down before dropping this). A full
            // counter (EAGAIN) still leaves the fd readable, which is all the wake needs.
            unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
        })
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing written) is expected.
        unsafe { libc::read(self.0, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

/// The latch, the eventfd and postmaster death in one wait set, kept for the loop's life.
pub(super) struct Wake {
    efd: EventFd,
    set: *mut pg_sys::WaitEventSet,
    /// Whether the eventfd fired in the last wait, so only then is it read.
    net: bool,
}

impl Wake {
    pub(super) fn new(efd: EventFd) -> Self {
        // SAFETY: on the worker's main thread, after BackgroundWorkerInitializeConnection; the
        // set lives in TopMemoryContext and is freed in Drop. MyLatch is this process's latch.
        let set = unsafe {
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_LATCH_SET,
                pg_sys::PGINVALID_SOCKET,
                pg_sys::MyLatch,
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_SOCKET_READABLE,
                efd.0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            pg_sys::AddWaitEventToSet(
                set,
                pg_sys::WL_EXIT_ON_PM_DEATH,
                pg_sys::PGINVALID_SOCKET,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            set
        };
        Wake { efd, set, net: true }
    }

    pub(super) fn waker(&self) -> Waker {
        self.efd.waker()
    }

    /// Sleeps at most `timeout_ms` (0: only looks), until the latch is set or the eventfd
    /// readable; then resets the latch. Postmaster death exits the process.
    pub(super) fn wait(&mut self, timeout_ms: i64) {
        let mut events = [pg_sys::WaitEvent::default(); 3];
        // SAFETY: the set is live (see new); `events` has room for the 3 events it holds.
        let n = unsafe {
            let n = pg_sys::WaitEventSetWait(
                self.set,
                timeout_ms as std::ffi::c_long,
                events.as_mut_ptr(),
                events.len() as i32,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            n
        };
        self.net = events[..n.max(0) as usize].iter().any(|e| e.events & pg_sys::WL_SOCKET_READABLE != 0);
    }

    /// Empties the eventfd if the last wait saw it readable, so the next wait sleeps until the
    /// transport writes again. Called after the signals, before reading the transport's queue.
    pub(super) fn drain(&mut self) {
        if std::mem::take(&mut self.net) {
            self.efd.drain();
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        // SAFETY: the set was created in new and is freed once.
        unsafe { pg_sys::FreeWaitEventSet(self.set) };
    }
}
