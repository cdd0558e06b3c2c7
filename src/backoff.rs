//! Full-jitter exponential backoff (sans-IO: the caller supplies the random number). A uniform pick in
//! `0..=ceiling` spreads agents that lost a server over the whole window; see [`Backoff::ceiling`].

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

    /// The upper bound of the next delay: the window `min(max, FIRST_WINDOW)` (at least `initial`), doubled per
    /// failure since the last success, up to ⅔ `max` (10, 20, 40, 40 … s by default). From the window, so that a
    /// returning server meets a spread-out fleet; ⅔, so that all are back within `max` with a third as margin
    /// (docs/scaling.md, What the whole fleet does at once).
    pub fn ceiling(&self) -> Duration {
        let window = self.max.min(FIRST_WINDOW).max(self.initial);
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        window.saturating_mul(factor).min((self.max - self.max / 3).max(window))
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

    /// Records a success: the next failure starts from the window again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ceilings of the first failures after a success, for (initial, max) in ms.
    #[test]
    fn ceilings_double_from_the_window_up_to_two_thirds_of_max() {
        let table: &[(u64, u64, &[u64])] = &[
            // The defaults: every agent is back within 40 s of a server's return.
            (1_000, 60_000, &[10_000, 20_000, 40_000, 40_000, 40_000]),
            // The tests' short settings: the window is `max`, and stays so.
            (100, 1_000, &[1_000, 1_000, 1_000]),
            (500, 2_000, &[2_000, 2_000, 2_000]),
            // A long `max` lets the ceilings grow further.
            (1_000, 300_000, &[10_000, 20_000, 40_000, 80_000, 160_000, 200_000, 200_000]),
            // `max` between the window and 1.5 × the window: the window.
            (1_000, 12_000, &[10_000, 10_000]),
            (1_000, 16_000, &[10_000, 10_666, 10_666]),
            (1_000, 5_000, &[5_000, 5_000]),
            // `initial` stays the floor, above the window too.
            (20_000, 60_000, &[20_000, 40_000, 40_000]),
            (30_000, 30_000, &[30_000, 30_000]),
            (5, 5, &[5, 5]),
            (0, 0, &[0, 0]),
        ];
        for &(initial, max, want) in table {
            let mut b = Backoff::new(Duration::from_millis(initial), Duration::from_millis(max));
            let mut ceilings = Vec::new();
            for _ in want {
                ceilings.push(b.ceiling().as_millis() as u64);
                b.next_delay_with(0);
            }
            assert_eq!(ceilings, want, "initial {initial} max {max}");
        }
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..100 {
            b.next_delay_with(0);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(40), "no overflow after many attempts");
    }

    #[test]
    fn jitter_spans_zero_to_ceiling() {
        let table: &[(u64, u64)] = &[(0, 0), (u64::MAX, 40_000), (u64::MAX / 2, 20_000)];
        for (random, want_ms) in table {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            b.next_delay_with(0);
            b.next_delay_with(0);
            assert_eq!(b.next_delay_with(*random).as_millis() as u64, *want_ms);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..5 {
            b.next_delay_with(1);
        }
        assert_eq!(b.attempt, 5);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(10), "a first retry again: the window");
        b.next_delay_with(0);
        assert_eq!(b.ceiling(), Duration::from_secs(20));
    }
}
