//! The Kafka consumer's client settings: the defaults tallyd sets, those it
//! does not let `[kafka.properties]` change, and the static membership id.

use rdkafka::config::ClientConfig;

/// Consumer properties tallyd sets unless `[kafka.properties]` does: large
/// prefetches; a short pause (librdkafka's default is 1 s) before fetching
/// again once the prefetch queue was full — the ingest thread empties a full
/// queue in well under a second, and then sat idle waiting for the next fetch;
/// and a broker-side fetch wait of 100 ms instead of 500: a caught-up consumer
/// learns it is at the end (and flushes) when an empty fetch returns, which
/// after a backlog drain took 0.2–0.6 s with the default (ten fetches a second
/// per idle broker connection instead of two is no load).
///
/// And a short group session (librdkafka's default is 45 s) with a heartbeat
/// every second: a dead instance's partitions move to the survivors about 10 s
/// after its death instead of a minute, and a restarted one is back in about
/// 11 s (6 s as a static member, `kafka.instance_id`); 6 s is the least a
/// Kafka broker accepts by default (`group.min.session.timeout.ms`). Heartbeats
/// come from librdkafka's own thread, so a busy consumer does not miss them; a
/// broker or network stall longer than 6 s does cost a rebalance.
pub(super) const CONSUMER_DEFAULTS: [(&str, &str); 7] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
    ("max.partition.fetch.bytes", "16777216"),
    ("queued.min.messages", "1000000"),
    ("queued.max.messages.kbytes", "131072"),
    ("fetch.queue.backoff.ms", "20"),
    ("fetch.wait.max.ms", "100"),
];

/// The group member's static membership id (`kafka.instance_id`): none when
/// unset or empty; for `auto`, the host name and the port of the HTTP listen
/// address — unique on a host (two instances cannot listen on one port) and the
/// same after a restart (none when the port is 0: chosen by the system, two
/// instances would share the id and fence each other); else the id as given.
pub fn instance_id(configured: Option<&str>, listen: &str) -> Option<String> {
    match configured {
        None | Some("") => None,
        Some("auto") => {
            let port: u16 = listen.rsplit(':').next()?.parse().ok()?;
            if port == 0 {
                return None;
            }
            Some(format!("{}:{port}", hostname()?))
        }
        Some(id) => Some(id.to_string()),
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; the name is NUL-terminated
    // unless truncated, which the search for NUL below tolerates.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// Consumer settings tallyd does not let `[kafka.properties]` change.
pub(super) fn fixed_settings(cfg: &mut ClientConfig) {
    // Offsets come from the store, never from Kafka (commits are for lag tools
    // only). No end-of-partition events: librdkafka's batch consume counts one
    // as consumed up to one past the end, and a pause (backpressure) then
    // resumes from there, skipping the next message (see the test
    // `a_pause_after_the_partition_end_skips_no_message`). The loop tells it
    // has caught up from the partitions' high watermarks instead.
    cfg.set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range,roundrobin");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_member_id_is_off_given_or_host_and_port() {
        assert_eq!(instance_id(None, "0.0.0.0:8080"), None);
        assert_eq!(instance_id(Some(""), "0.0.0.0:8080"), None);
        assert_eq!(
            instance_id(Some("a-1"), "0.0.0.0:8080").as_deref(),
            Some("a-1")
        );
        assert_eq!(instance_id(Some("auto"), "127.0.0.1:0"), None);
        assert_eq!(instance_id(Some("auto"), "nonsense"), None);
        let id = instance_id(Some("auto"), "[::]:8081").expect("this host has a name");
        assert!(id.ends_with(":8081") && id.len() > 5, "{id}");
        assert_eq!(instance_id(Some("auto"), "[::]:8081"), Some(id), "stable");
    }
}
