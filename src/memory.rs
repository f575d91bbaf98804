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

/// Gives the pages freed since the last call back to the OS.
pub fn release() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
