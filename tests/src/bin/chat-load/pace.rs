//! Open-loop rate pacing: send `i` is due at `start + i / rate`.
//!
//! A driver asks how many sends are due by now, sends them, and sleeps
//! until the next one is due. If it falls behind (a slow wakeup) it catches
//! up in a burst, but never by more than `max_burst` at once, so a stalled
//! driver does not dump a huge batch; the lost sends are counted as
//! `skipped` (they show up as "offered rate not reached").

use std::time::Duration;

use tokio::time::Instant;

/// Paces sends at a fixed rate from a start instant.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    interval: Duration,
    /// Sends issued or skipped so far (the index of the next send).
    next: u64,
    max_burst: u64,
    /// Sends skipped to stay within `max_burst`.
    pub skipped: u64,
}

impl Pacer {
    /// `rate` sends per second from `start`; at most `max_burst` at once.
    pub fn new(start: Instant, rate: f64, max_burst: u64) -> Self {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        Pacer {
            start,
            interval: Duration::from_secs_f64(1.0 / rate),
            next: 0,
            max_burst: max_burst.max(1),
            skipped: 0,
        }
    }

    /// When send `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        self.start + self.interval.mul_f64(i as f64)
    }

    /// How many sends are due by `now` (indexes `0..n`).
    pub fn due_by(&self, now: Instant) -> u64 {
        if now < self.start {
            return 0;
        }
        let elapsed = now - self.start;
        (elapsed.as_secs_f64() / self.interval.as_secs_f64()).floor() as u64 + 1
    }

    /// How many sends to issue now (at most `max_burst`); advances the pacer.
    pub fn take(&mut self, now: Instant) -> u64 {
        let due = self.due_by(now);
        if due <= self.next {
            return 0;
        }
        let mut n = due - self.next;
        if n > self.max_burst {
            self.skipped += n - self.max_burst;
            n = self.max_burst;
        }
        self.next = due;
        n
    }

    /// When the next send is due.
    pub fn next_due(&self) -> Instant {
        self.due(self.next)
    }
}

/// The per-driver rate when `total` is spread over `drivers`.
pub fn per_driver(total: f64, drivers: usize) -> f64 {
    total / drivers.max(1) as f64
}

/// When driver `i` of a step starts: drivers are staggered by one interval
/// of the total rate, so their merged sends are evenly spaced at `total`
/// per second instead of `drivers` sends at once every `drivers / total`
/// seconds (which made a "2 msg/s" fan-out step four messages at once
/// every 2 s with four senders).
pub fn driver_start(start: Instant, total: f64, i: usize) -> Instant {
    if total <= 0.0 {
        return start;
    }
    start + Duration::from_secs_f64(i as f64 / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_are_evenly_spaced() {
        let t0 = Instant::now();
        let p = Pacer::new(t0, 1_000.0, 100);
        assert_eq!(p.due(0), t0);
        assert_eq!(p.due(1000), t0 + Duration::from_secs(1));
        assert_eq!(p.due_by(t0), 1);
        assert_eq!(p.due_by(t0 + Duration::from_micros(999)), 1);
        assert_eq!(p.due_by(t0 + Duration::from_millis(1)), 2);
        assert_eq!(p.due_by(t0 + Duration::from_millis(500)), 501);
    }

    #[test]
    fn take_issues_each_send_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 100.0, 1_000);
        assert_eq!(p.take(t0), 1);
        assert_eq!(p.take(t0), 0);
        assert_eq!(p.next_due(), t0 + Duration::from_millis(10));
        // 1 s later: 100 more are due (indexes 1..=100).
        assert_eq!(p.take(t0 + Duration::from_secs(1)), 100);
        assert_eq!(p.take(t0 + Duration::from_secs(1)), 0);
        assert_eq!(p.skipped, 0);
        // Over 10 s exactly 1001 sends in total, however the wakeups fall.
        let mut total = 101;
        let mut t = t0 + Duration::from_secs(1);
        while t < t0 + Duration::from_secs(10) {
            t += Duration::from_micros(3_700);
            if t > t0 + Duration::from_secs(10) {
                t = t0 + Duration::from_secs(10);
            }
            total += p.take(t);
        }
        assert_eq!(total, 1_001);
    }

    #[test]
    fn bursts_are_capped_and_counted() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 1_000.0, 50);
        assert_eq!(p.take(t0 + Duration::from_secs(1)), 50);
        assert_eq!(p.skipped, 951);
        // Back on schedule afterwards.
        assert_eq!(p.take(t0 + Duration::from_millis(1_010)), 10);
    }

    #[test]
    fn staggered_drivers_merge_into_one_even_stream() {
        let start = Instant::now();
        let (total, drivers) = (8.0, 4);
        let per = per_driver(total, drivers);
        let mut due: Vec<Instant> = (0..drivers)
            .flat_map(|d| {
                let p = Pacer::new(driver_start(start, total, d), per, 1);
                (0..5).map(move |i| p.due(i))
            })
            .collect();
        due.sort();
        for pair in due.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            assert!((gap - 1.0 / total).abs() < 1e-6, "gap {gap}");
        }
        assert_eq!(due.len(), 20);
        assert_eq!(driver_start(start, 0.0, 3), start);
    }

    #[test]
    fn not_before_start() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut p = Pacer::new(t0, 10.0, 10);
        assert_eq!(p.take(Instant::now()), 0);
        assert_eq!(per_driver(1_000.0, 4), 250.0);
        assert_eq!(per_driver(1_000.0, 0), 1_000.0);
    }
}
