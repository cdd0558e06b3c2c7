//! Heap footprint on glibc: fewer arenas, large buffers in mmap'd memory, free memory handed
//! back after a burst. No-ops on other C libraries (musl returns freed memory by itself).

/// glibc gives every allocating thread its own arena, each keeping freed memory. One arena: events are allocated by
/// ingest threads and freed by the uploaders, and with two the freed space of one was not reusable by the other
/// (`make bench`, 400 000 events: peaks 14.7–18.2 MiB with two, 12.3–13.8 MiB with one, for ~10 % less stateless
/// throughput; per-thread caches keep the lock mostly uncontended). Call before any thread exists.
pub fn tune_allocator() {
    // A fixed mmap threshold (glibc's dynamic one climbs to 32 MiB after the first large free)
    // keeps request bodies and queue segments in mmap'd memory, returned as soon as it is freed.
    crate::sys::tune_malloc(1, 256 * 1024);
}

/// Returns free heap pages of every arena to the system. glibc only shrinks an arena from its
/// top: after a burst of small allocations freed out of order, the resident size stays at the peak.
pub fn release_free() {
    crate::sys::malloc_trim();
}

/// When to call [`release_free`]: once after each busy period, when the pipeline has gone
/// quiet (pure; the supervisor asks every few seconds).
#[derive(Debug, Default)]
pub struct Trim {
    /// The activity count when memory was last released.
    released_at: u64,
}

impl Trim {
    /// `activity` only grows (events received + sent); `quiet`: nothing is buffered.
    pub fn due(&mut self, activity: u64, quiet: bool) -> bool {
        if activity == self.released_at || !quiet {
            return false;
        }
        self.released_at = activity;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_busy_period_and_only_when_quiet() {
        let mut t = Trim::default();
        // (activity, quiet, expected)
        let steps = [
            (0, true, false),
            (10, false, false),
            (20, false, false),
            (20, true, true),
            (20, true, false),
            (21, true, true),
            (30, false, false),
            (30, true, true),
        ];
        for (i, (activity, quiet, want)) in steps.into_iter().enumerate() {
            assert_eq!(t.due(activity, quiet), want, "step {i}");
        }
    }
}
