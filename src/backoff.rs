//! Full-jitter exponential backoff (sans-IO: the caller supplies the random number). A uniform pick in
//! `0..=min(max, initial * 2^attempt)` spreads agents that lost a server over the whole window.

use std::time::Duration;

/// The first retry after a success is spread over this window (at most `max`): a fleet whose
/// server just fell over would otherwise all retry within `initial` (docs/scaling.md).
pub const FIRST_WINDOW: Duration = Duration::from_secs(10);

/// Backoff state for one kind of retried work.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max: max.max(initial), attempt: 0 }
    }

    /// New bounds (a live `retry.*` change); the count of failures is kept.
    pub fn set_limits(&mut self, initial: Duration, max: Duration) {
        (self.initial, self.max) = (initial, max.max(initial));
    }

    /// The upper bound of the next delay: `min(max, initial * 2^attempt)`, or [`FIRST_WINDOW`] first.
    pub fn ceiling(&self) -> Duration {
        if self.attempt == 0 {
            return self.max.min(FIRST_WINDOW).max(self.initial);
        }
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Records a failure and returns how long to wait, given `random` uniform in `0..=u64::MAX`.
    pub fn next_delay_with(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = ceiling.as_millis().min(u64::MAX as u128) as u64;
        // Map random onto 0..=ceiling_ms without modulo bias worth caring about here.
        let pick = ((random as u128 * (ceiling_ms as u128 + 1)) >> 64) as u64;
        Duration::from_millis(pick)
    }

    /// As [`next_delay_with`](Self::next_delay_with), with a process-local random source.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(fastrand::u64(..))
    }

    /// Records a success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay_with(0);
        }
        // The first retry after a success is spread wide; later ones double from `initial`.
        assert_eq!(ceilings, vec![10, 2, 4, 8, 16, 32, 60, 60, 60]);
        for _ in 0..100 {
            b.next_delay_with(0);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60), "no overflow after many attempts");
    }

    #[test]
    fn jitter_spans_zero_to_ceiling() {
        let table: &[(u64, u64)] = &[(0, 0), (u64::MAX, 4_000), (u64::MAX / 2, 2_000)];
        for (random, want_ms) in table {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            b.next_delay_with(0);
            b.next_delay_with(0);
            assert_eq!(b.next_delay_with(*random).as_millis() as u64, *want_ms);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..5 {
            b.next_delay_with(1);
        }
        assert_eq!(b.attempt, 5);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1), "a first retry again: the whole window");
        b.next_delay_with(0);
        assert_eq!(b.ceiling(), Duration::from_millis(200));
    }

    #[test]
    fn the_first_window_is_bounded_by_max_and_initial() {
        let table = [(100, 1_000, 1_000), (100, 60_000, 10_000), (20_000, 60_000, 20_000), (5, 5, 5)];
        for (initial, max, want) in table {
            let b = Backoff::new(Duration::from_millis(initial), Duration::from_millis(max));
            assert_eq!(b.ceiling(), Duration::from_millis(want), "initial {initial} max {max}");
        }
    }
}
