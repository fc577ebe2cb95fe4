//! Keeps a recurring error from flooding the log: while a broker is down,
//! librdkafka reports "all brokers down" to the client and to the consumer queue
//! many times a second (measured: ~40 lines a second with no broker).
//!
//! The first occurrence of an error is logged at once; repeats within the window
//! are only counted, and the next occurrence after the window is logged with that
//! count. Metrics still count every occurrence.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long repeats of one error stay quiet after it was logged.
pub const WINDOW: Duration = Duration::from_secs(30);

/// What a Kafka error is throttled by: its code, so one condition reported through
/// two paths is one entry (librdkafka reports a broker outage both to the client,
/// "Global error: AllBrokersDown", and to the consumer queue, "Message
/// consumption error: AllBrokersDown").
pub fn key_of(e: &rdkafka::error::KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => e.to_string(),
    }
}

#[derive(Default)]
pub struct LogThrottle {
    /// Error text → when it was last logged, and repeats since.
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogThrottle {
    /// [`LogThrottle::admit`] for a Kafka error now, keyed by [`key_of`].
    pub fn admit_error(&self, e: &rdkafka::error::KafkaError) -> Option<u64> {
        self.admit(&key_of(e), Instant::now())
    }

    /// Whether this occurrence of `error` should be logged; if so, `Some` of
    /// the repeats that were not, since it last was.
    pub fn admit(&self, error: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock();
        match seen.get_mut(error) {
            Some((logged, repeats)) if now.saturating_duration_since(*logged) < WINDOW => {
                *repeats += 1;
                None
            }
            Some((logged, repeats)) => {
                *logged = now;
                Some(std::mem::take(repeats))
            }
            None => {
                // Distinct errors are few (codes, broker addresses); forget the
                // quiet ones if some source ever makes many.
                if seen.len() >= 256 {
                    seen.retain(|_, (t, _)| now.saturating_duration_since(*t) < WINDOW);
                }
                seen.insert(error.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_counted_and_reported_once_a_window() {
        let t = LogThrottle::default();
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(t.admit("AllBrokersDown", s(0)), Some(0));
        assert_eq!(t.admit("AllBrokersDown", s(1)), None);
        assert_eq!(t.admit("AllBrokersDown", s(29)), None);
        // Another error is not held back by the first.
        assert_eq!(t.admit("BrokerTransportFailure", s(2)), Some(0));
        // After the window: logged again, with the two repeats it swallowed.
        assert_eq!(t.admit("AllBrokersDown", s(30)), Some(2));
        assert_eq!(t.admit("AllBrokersDown", s(31)), None);
        assert_eq!(t.admit("AllBrokersDown", s(61)), Some(1));
    }
}
