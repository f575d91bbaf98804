//! Returning freed memory to the OS. A reconcile of a large fleet allocates tens of MiB for a moment, on
//! whichever runtime thread it runs; glibc keeps what is freed in per-thread arenas, so without this the
//! resident set climbs to the sum of every thread's largest reconcile and stays there.

/// Caps glibc at two malloc arenas (one per runtime worker on a 2-core node, instead of eight per core):
/// fewer arenas, less memory stranded in them. Call before the runtime starts its threads.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator tunable; M_ARENA_MAX takes any positive count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives the pages freed since the last release back to the OS, at most once a second: trimming walks
/// every arena under its lock, and a policy waiting for presence reconciles four times a second.
pub fn release() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if LAST.swap(now, Ordering::Relaxed) == now {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
