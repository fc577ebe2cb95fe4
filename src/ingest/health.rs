//! The consumers' live state shared with `/readyz` and the metrics.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Live state shared with `/readyz` and the metrics: sums over the instance's
/// consumers (`kafka.consumers`), each of which moves them by its own changes.
#[derive(Default)]
pub struct IngestHealth {
    assigned_partitions: AtomicUsize,
    paused_consumers: AtomicUsize,
    pending_cells: AtomicUsize,
    /// Messages between where the consumers are and the partitions' ends.
    lag: AtomicUsize,
    /// Consumers whose flush in flight writes CDRs counted while far behind.
    flushing_backlog: AtomicUsize,
    /// Held while a sum is moved and its gauge set: two consumers assigned
    /// at once otherwise could set the gauge in the other order than they
    /// moved the sum (the gauge then showed one consumer's share).
    publishing: parking_lot::Mutex<()>,
}

impl IngestHealth {
    pub fn assigned_partitions(&self) -> usize {
        self.assigned_partitions.load(Ordering::Relaxed)
    }

    /// Whether any consumer is paused (backpressure).
    pub fn paused(&self) -> bool {
        self.paused_consumers.load(Ordering::Relaxed) > 0
    }

    /// Whether the consumers are far behind the partitions' ends (more than
    /// [`super::EARLY_FLUSH_MAX_LAG`] messages: draining a backlog), or a
    /// flush of CDRs counted then is still being written: at the end of a
    /// drain the consumers have caught up while the flush that writes the
    /// rest of the backlog, its largest, is yet to land.
    pub fn behind(&self) -> bool {
        self.lag.load(Ordering::Relaxed) > super::EARLY_FLUSH_MAX_LAG as usize
            || self.flushing_backlog.load(Ordering::Relaxed) > 0
    }

    /// Sets one consumer's lag (`mine` holds its share).
    pub(super) fn set_lag(&self, mine: &IngestHealth, lag: usize) {
        move_sum(&self.lag, &mine.lag, lag);
    }

    /// Sets whether one consumer's flush in flight writes CDRs counted while
    /// far behind (`mine` holds its share).
    pub(super) fn set_flushing_backlog(&self, mine: &IngestHealth, backlog: bool) {
        move_sum(
            &self.flushing_backlog,
            &mine.flushing_backlog,
            backlog as usize,
        );
    }

    /// Sets one consumer's assigned partitions (`mine` holds its share) and
    /// publishes the instance's sum.
    pub(super) fn set_assigned(&self, mine: &IngestHealth, n: usize) {
        let _order = self.publishing.lock();
        let sum = move_sum(&self.assigned_partitions, &mine.assigned_partitions, n);
        metrics::gauge!(crate::metrics::PARTITIONS_ASSIGNED).set(sum as f64);
    }

    pub(super) fn set_paused(&self, mine: &IngestHealth, paused: bool) {
        let _order = self.publishing.lock();
        let sum = move_sum(
            &self.paused_consumers,
            &mine.paused_consumers,
            paused as usize,
        );
        metrics::gauge!(crate::metrics::CONSUMER_PAUSED).set(if sum > 0 { 1.0 } else { 0.0 });
    }

    pub(super) fn set_pending(&self, mine: &IngestHealth, cells: usize) {
        let _order = self.publishing.lock();
        let sum = move_sum(&self.pending_cells, &mine.pending_cells, cells);
        metrics::gauge!(crate::metrics::PENDING_CELLS).set(sum as f64);
    }
}

/// Sets `mine` to `now` and moves `sum` by the difference; returns the new sum.
fn move_sum(sum: &AtomicUsize, mine: &AtomicUsize, now: usize) -> usize {
    let before = mine.swap(now, Ordering::Relaxed);
    if now >= before {
        sum.fetch_add(now - before, Ordering::Relaxed) + (now - before)
    } else {
        sum.fetch_sub(before - now, Ordering::Relaxed) - (before - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind while far from the partitions' ends, and then until the
    /// flushes of what was counted meanwhile have landed.
    #[test]
    fn behind_until_the_backlog_is_flushed() {
        let all = IngestHealth::default();
        let (a, b) = (IngestHealth::default(), IngestHealth::default());
        all.set_lag(&a, super::super::EARLY_FLUSH_MAX_LAG as usize + 1);
        assert!(all.behind());
        all.set_flushing_backlog(&a, true);
        all.set_flushing_backlog(&b, true);
        all.set_lag(&a, 0);
        assert!(all.behind(), "caught up, the backlog's flushes still out");
        all.set_flushing_backlog(&a, false);
        assert!(all.behind(), "one consumer's backlog flush still out");
        all.set_flushing_backlog(&b, false);
        assert!(!all.behind());
    }
}
