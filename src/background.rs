//! Threads that work beside request handling (the SQLite ledger's writer, the access log's
//! writer) run at a lower priority: they use what requests leave idle.

/// Their niceness (Linux).
pub const NICE: i32 = 10;

/// Lowers the calling thread's priority. A ledger commit takes a core for a few hundred µs
/// every window; at normal priority it preempted request handling, and on a 2-core machine
/// that cost ~20 µs of every request's p50 at concurrency 1 (same-run A/B; a thread spinning as
/// long did the same). At nice 10 such a thread runs on a core that requests leave idle, and
/// under saturation it still gets the few percent of a core it needs: a late batch is only a
/// larger one.
pub fn yield_to_requests(thread: &'static str) {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
        tracing::debug!(error = %e, thread, "a background thread keeps its priority");
    }
}
