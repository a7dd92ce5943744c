//! Keeping resident memory equal to what duet uses: glibc's allocator settings and the
//! call that hands freed pages back to the operating system.

/// Large buffers (weights, key/value caches, logits) always get their own mappings, which
/// go back to the system when freed; glibc would otherwise raise this threshold after the
/// first large free and serve later ones from a heap that fragments and never shrinks.
/// Two arenas are enough for an engine thread and a few HTTP workers.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's tuning knobs; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap pages to the operating system (glibc keeps them otherwise).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
