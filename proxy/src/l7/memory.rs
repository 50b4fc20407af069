//! Giving the memory of buffered request bodies back to the system (OPS-4): glibc keeps what
//! the program frees in its arenas, so without this a burst of bodies leaves the proxy large.
//!
//! Measured with 200 clients each holding an unfinished 1 MB body on a retried route (budget
//! 16 MiB, `waypoint_hardening::buffered_bodies_are_capped_and_memory_returns`), RSS before →
//! after the clients left: 26 → 70-78 MiB as is; 26 → 62 MiB with a fixed
//! `M_MMAP_THRESHOLD` of 128 KiB (large buffers are then unmapped when freed, but the small
//! allocations of 200 connections fragment the arenas); 26 → 28 MiB with `malloc_trim(0)` once
//! the bodies are gone, with or without the threshold. The trim alone is kept: it took 6-12 ms
//! (debug build) once per burst, where a fixed threshold would map and unmap every large
//! buffer on the data path.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// How long after the last buffered body is freed the heap is trimmed: the connections that
/// carried the bodies usually end just after them, and their memory is then free too.
const TRIM_DELAY: Duration = Duration::from_secs(1);
/// A second trim this long after the first, for connections (and exchanges finished in the
/// background) that ended later: on a loaded box one full test run in several kept 16 MiB
/// that the first trim came too early for.
const SECOND_TRIM_DELAY: Duration = Duration::from_secs(2);

/// A trim is pending; later calls until it runs change nothing.
static TRIM_SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Returns free heap memory to the system shortly, once. Called when no request body is
/// buffered any more.
pub fn release_free_memory() {
    if TRIM_SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        TRIM_SCHEDULED.store(false, Ordering::Release);
        return;
    };
    runtime.spawn(async {
        tokio::time::sleep(TRIM_DELAY).await;
        TRIM_SCHEDULED.store(false, Ordering::Release);
        // Walking the arenas takes milliseconds: not on a worker that serves connections.
        let _ = tokio::task::spawn_blocking(trim).await;
        tokio::time::sleep(SECOND_TRIM_DELAY).await;
        let _ = tokio::task::spawn_blocking(trim).await;
    });
}

fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
