//! When a consumer hands its next flush over ([`FlushPacer`]).

use std::time::{Duration, Instant};

/// The least time between two flushes when a CDR may have crossed a usage
/// trigger (its callback should leave within a second of the CDR).
const EARLY_FLUSH_GAP: Duration = Duration::from_millis(100);

/// The most of its time the store may spend on flushes asked for early by a
/// likely trigger crossing.
const EARLY_BUSY_SHARE: f64 = 1.0;

/// The least time between two flushes when the consumer has caught up.
const IDLE_FLUSH_GAP: Duration = Duration::from_millis(200);

/// When the next flush is due.
///
/// - Every `flush.interval_ms` under load, but never sooner than the flush's
///   expected duration divided by `flush.max_busy_share` after the last one
///   started: when the store is slow (many live accounts per flush), flushes get
///   rarer instead of taking the CPU the consumer needs. Each flush writes one row
///   per live account and period whatever the CDR rate, so rarer flushes are what
///   keeps the writes per CDR small. The expected duration is the pending cells
///   times what a cell cost in the last flush: a small flush at start-up does not
///   invite a big one an interval later (draining a backlog, that second flush
///   took as long as the final one and slowed the drain by half).
/// - As soon as the consumer is idle (every assigned partition at its end), at most every
///   [`IDLE_FLUSH_GAP`], so a quiet or drained topic is stored at once rather than
///   an interval later.
#[derive(Debug)]
pub struct FlushPacer {
    interval: Duration,
    busy_share: f64,
    last_start: Instant,
    /// Cells handed to the flush in flight or last landed.
    last_cells: usize,
    /// Store time per cell of the last flush that landed.
    cost_per_cell: Duration,
}

impl FlushPacer {
    /// `interval` = `flush.interval_ms`, `busy_share` = `flush.max_busy_share`.
    pub fn new(interval: Duration, busy_share: f64, now: Instant) -> FlushPacer {
        FlushPacer {
            interval,
            busy_share: busy_share.clamp(0.01, 1.0),
            last_start: now,
            last_cells: 0,
            cost_per_cell: Duration::ZERO,
        }
    }

    /// The least time between the starts of two flushes under load, with
    /// `pending` cells to write.
    pub fn gap(&self, pending: usize) -> Duration {
        let expected = self
            .cost_per_cell
            .saturating_mul(pending.min(u32::MAX as usize) as u32);
        self.interval.max(expected.div_f64(self.busy_share))
    }

    pub fn due(&self, now: Instant, idle: bool, pending: usize) -> bool {
        let since = now.saturating_duration_since(self.last_start);
        since >= self.gap(pending) || (idle && since >= IDLE_FLUSH_GAP.min(self.interval))
    }

    /// Whether a flush may start early for a likely trigger crossing: at
    /// least [`EARLY_FLUSH_GAP`] after the last, and once the last one's
    /// expected duration has passed ([`EARLY_BUSY_SHARE`]: back to back;
    /// `flush.max_busy_share` would hold a callback back for ten flush
    /// durations; the consumer asks only while it keeps up, so it has the
    /// time to spare).
    pub fn due_early(&self, now: Instant, pending: usize) -> bool {
        let expected = self
            .cost_per_cell
            .saturating_mul(pending.min(u32::MAX as usize) as u32);
        let share = self.busy_share.max(EARLY_BUSY_SHARE);
        let gap = EARLY_FLUSH_GAP.max(expected.div_f64(share));
        now.saturating_duration_since(self.last_start) >= gap
    }

    /// A flush of `cells` cells was handed over at `now`.
    pub fn started(&mut self, now: Instant, cells: usize) {
        self.last_start = now;
        self.last_cells = cells;
    }

    /// The flush handed over last landed; the store took `took` to write it.
    pub fn finished(&mut self, took: Duration) {
        self.cost_per_cell = took / self.last_cells.clamp(1, u32::MAX as usize) as u32;
        metrics::gauge!(crate::metrics::FLUSH_GAP_SECONDS)
            .set(self.gap(self.last_cells).as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(interval_ms: u64, share: f64, t0: Instant) -> FlushPacer {
        FlushPacer::new(Duration::from_millis(interval_ms), share, t0)
    }

    #[test]
    fn slow_flushes_stretch_the_gap_and_idle_flushes_come_early() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut p = pacer(1000, 0.25, t0);
        assert!(!p.due(ms(999), false, 10));
        assert!(p.due(ms(1000), false, 10));
        // Caught up: flush after 200 ms, not a whole interval.
        assert!(!p.due(ms(150), true, 10));
        assert!(p.due(ms(200), true, 10));

        // 1000 cells took 800 ms at 25 % busy share: with as many pending, the
        // next waits 3.2 s; with ten times as many, 32 s.
        p.started(ms(1000), 1000);
        p.finished(Duration::from_millis(800));
        assert_eq!(p.gap(1000), Duration::from_millis(3200));
        assert!(!p.due(ms(4100), false, 1000));
        assert!(p.due(ms(4200), false, 1000));
        assert_eq!(p.gap(10_000), Duration::from_millis(32_000));
        // A small flush needs no more than the interval.
        assert_eq!(p.gap(100), Duration::from_millis(1000));
        // A fast flush brings the interval back.
        p.started(ms(4200), 1000);
        p.finished(Duration::from_millis(10));
        assert_eq!(p.gap(1000), Duration::from_millis(1000));
        // A likely trigger crossing flushes as soon as the last flush's
        // expected duration has passed: 1 s after a flush of 1000 cells that
        // took 1 s.
        p.started(ms(10_000), 1000);
        p.finished(Duration::from_millis(1000));
        assert!(!p.due_early(ms(10_900), 1000));
        assert!(p.due_early(ms(11_000), 1000));
        // …and never sooner than 100 ms.
        p.finished(Duration::from_millis(1));
        assert!(!p.due_early(ms(10_050), 1000));
        assert!(p.due_early(ms(10_100), 1000));
        // An idle consumer still flushes early whatever the gap.
        p.started(ms(5000), 1000);
        p.finished(Duration::from_millis(2000));
        assert!(p.due(ms(5200), true, 1_000_000));
    }
}
