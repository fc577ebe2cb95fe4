//! End-to-end: a real tansu broker process, the real tallyd binary, real SQLite and
//! PostgreSQL stores. Stored records must equal the ground truth computed from the
//! generated file, to the last decimal, through duplicates, malformed messages,
//! SIGKILLs, a frozen broker, a broker killed and restarted, and an instance leaving
//! its consumer group.

mod support;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::*;

const TOPIC: &str = "cdrs";
const DLQ: &str = "cdrs-dead-letter";
const PARTITIONS: i32 = 4;

fn broker() -> Tansu {
    let t = Tansu::start();
    t.create_topic(TOPIC, PARTITIONS as u32);
    t.create_topic(DLQ, 1);
    t
}

#[test]
fn sqlite_exact_with_duplicates_and_dead_letters() {
    let dir = test_dir();
    let t = broker();
    const N: u64 = 20_000;
    let lines = generate(&t.brokers(), TOPIC, N, 11, &dir.path().join("cdrs.jsonl"));
    let (truth, rejected) = ground_truth(&lines);
    assert!(rejected > 100, "the traffic must contain malformed CDRs");
    let url = format!("sqlite://{}/tallyd.db", dir.path().display());
    let log = dir.path().join("tallyd.log");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::spawn_with(
        &t.brokers(),
        &url,
        "g-sqlite",
        &log,
        &[
            ("TALLYD_KAFKA__CONSUMERS", "2"),
            ("TALLYD_HTTP__LISTEN", &listen),
        ],
    );
    wait_flushed(&url, TOPIC, N, Duration::from_secs(120), &log);
    // The instance's two consumers share the partitions: each was given some,
    // and the gauge sums them to the topic's.
    assert_eq!(
        metric(port, "tallyd_partitions_assigned"),
        Some(PARTITIONS as f64)
    );
    d.stop();
    let consumers = assigned_consumers(&log);
    assert!(
        consumers.contains("tallyd-ingest-0") && consumers.contains("tallyd-ingest-1"),
        "both consumers must be assigned partitions; assigned: {consumers:?}"
    );
    check_exact(dir.path(), &t.brokers(), TOPIC, &url, &truth, N);
    // Every rejected message is in the dead-letter topic, unchanged, with its reason.
    let dl = dead_letters(&t.brokers(), DLQ, rejected);
    assert_eq!(dl.len(), rejected);
    assert!(dl
        .iter()
        .all(|(reason, payload)| !reason.is_empty() && lines.contains(payload)));
}

#[test]
fn postgres_exact_with_duplicates() {
    let dir = test_dir();
    let pg = PgSchema::new("exact");
    let t = broker();
    const N: u64 = 20_000;
    let lines = generate(&t.brokers(), TOPIC, N, 12, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    let log = dir.path().join("tallyd.log");
    let mut d = Daemon::spawn(&t.brokers(), &pg.url, "g-pg", &log);
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(120), &log);
    d.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &pg.url, &truth, N);
}

#[test]
fn exact_across_sigkill_restarts() {
    let dir = test_dir();
    let t = broker();
    const N: u64 = 60_000;
    let lines = generate(&t.brokers(), TOPIC, N, 13, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    let url = format!("sqlite://{}/tallyd.db", dir.path().display());
    let log = dir.path().join("tallyd.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut kills = 0;
    for _ in 0..3 {
        let mut d = Daemon::spawn(&t.brokers(), &url, "g-kill", &log);
        // Kill once consumption is under way: after the first offsets land, then at
        // a random moment.
        wait_consuming(&url, TOPIC, Duration::from_secs(90));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
        d.kill9();
        kills += 1;
    }
    assert_eq!(kills, 3);
    let mut d = Daemon::spawn(&t.brokers(), &url, "g-kill", &log);
    wait_flushed(&url, TOPIC, N, Duration::from_secs(180), &log);
    d.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &url, &truth, N);
}

#[test]
fn exact_when_broker_freezes_mid_run() {
    let dir = test_dir();
    let pg = PgSchema::new("freeze");
    let t = broker();
    const N: u64 = 40_000;
    let lines = generate(&t.brokers(), TOPIC, N, 14, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    let log = dir.path().join("tallyd.log");
    let mut d = Daemon::spawn(&t.brokers(), &pg.url, "g-freeze", &log);
    // Wait for consumption to start, then stop the broker for a while.
    wait_consuming(&pg.url, TOPIC, Duration::from_secs(90));
    t.freeze();
    std::thread::sleep(Duration::from_secs(8));
    t.thaw();
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(240), &log);
    d.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &pg.url, &truth, N);
}

#[test]
fn exact_when_broker_stops_and_restarts_mid_run() {
    let dir = test_dir();
    let pg = PgSchema::new("restart");
    // Topics and messages live in S3 (a moto server of the broker's own), so a
    // killed broker comes back with everything it had acknowledged.
    let mut t = Tansu::start_persistent(dir.path());
    t.create_topic(TOPIC, PARTITIONS as u32);
    t.create_topic(DLQ, 1);
    const N: u64 = 40_000;
    let lines = generate(&t.brokers(), TOPIC, N, 17, &dir.path().join("cdrs.jsonl"));
    let (truth, rejected) = ground_truth(&lines);
    assert!(rejected > 100, "the traffic must contain malformed CDRs");
    let log = dir.path().join("tallyd.log");
    let mut d = Daemon::spawn(&t.brokers(), &pg.url, "g-restart", &log);
    // Kill the broker once consumption is under way; the daemon must keep running
    // and retrying while it is gone, then catch up exactly.
    wait_consuming(&pg.url, TOPIC, Duration::from_secs(90));
    t.stop();
    std::thread::sleep(Duration::from_secs(6));
    if let Some(st) = d.child.try_wait().unwrap() {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "tallyd exited with {st} while the broker was down; log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    t.restart();
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(240), &log);
    d.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &pg.url, &truth, N);
    // Dead letters queued while the broker was down were delivered after all (a
    // retried one may be there twice: at least once is the promise).
    let dl = dead_letters(&t.brokers(), DLQ, rejected);
    eprintln!("{} dead letters for {rejected} rejected messages", dl.len());
    let got: std::collections::HashSet<&str> = dl.iter().map(|(_, p)| p.as_str()).collect();
    let want: std::collections::HashSet<&str> = lines
        .iter()
        .filter(|l| tallyd::cdr::decode(l.as_bytes()).is_err())
        .map(String::as_str)
        .collect();
    assert_eq!(
        got, want,
        "every rejected message is in the dead-letter topic"
    );
}

#[test]
fn two_instances_share_partitions_and_take_over() {
    let dir = test_dir();
    let pg = PgSchema::new("group");
    let t = broker();
    const N: u64 = 60_000;
    let lines = generate(&t.brokers(), TOPIC, N, 15, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    let log_a = dir.path().join("a.log");
    let log_b = dir.path().join("b.log");
    // Dynamic members: tansu never drops a static member that died.
    let mut a = Daemon::spawn(&t.brokers(), &pg.url, "g-two", &log_a);
    let mut b = Daemon::spawn(&t.brokers(), &pg.url, "g-two", &log_b);
    wait_consuming(&pg.url, TOPIC, Duration::from_secs(120));
    wait_assigned(&log_b, 0, 1, Duration::from_secs(60));
    // One instance dies without a goodbye; the other must take its partitions
    // over within 15 s (its session times out, the group rebalances).
    let assigned_before = log_lines(&log_b, "partition assigned").len();
    let killed = Instant::now();
    a.kill9();
    wait_assigned(
        &log_b,
        assigned_before,
        PARTITIONS as usize,
        Duration::from_secs(120),
    );
    let took = killed.elapsed();
    eprintln!("the survivor held every partition {took:?} after the kill");
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(240), &log_b);
    b.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &pg.url, &truth, N);
    assert!(
        took <= Duration::from_secs(15),
        "the survivor took {took:?} to own every partition"
    );
}

/// An instance SIGKILLed and restarted at once (same `kafka.instance_id`)
/// consumes again within 10 s of its start: as a static member it gets its
/// partitions back without waiting for its old session to time out.
#[test]
fn restart_after_kill_resumes_within_10_s() {
    let dir = test_dir();
    let t = broker();
    const N: u64 = 60_000;
    let lines = generate(&t.brokers(), TOPIC, N, 19, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    let url = format!("sqlite://{}/tallyd.db", dir.path().display());
    let log = dir.path().join("tallyd.log");
    let id = [("TALLYD_KAFKA__INSTANCE_ID", "restarted")];
    let mut d = Daemon::spawn_with(&t.brokers(), &url, "g-restart-fast", &log, &id);
    wait_consuming(&url, TOPIC, Duration::from_secs(90));
    d.kill9();
    let assigned_before = log_lines(&log, "partition assigned").len();
    let started = Instant::now();
    let mut d = Daemon::spawn_with(&t.brokers(), &url, "g-restart-fast", &log, &id);
    wait_assigned(
        &log,
        assigned_before,
        PARTITIONS as usize,
        Duration::from_secs(120),
    );
    let took = started.elapsed();
    eprintln!("the restarted instance took its partitions {took:?} after its start");
    wait_flushed(&url, TOPIC, N, Duration::from_secs(180), &log);
    d.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &url, &truth, N);
    assert!(
        took <= Duration::from_secs(10),
        "the restarted instance took {took:?} to consume again"
    );
}

/// Waits until `log` shows `count` more partitions assigned than the `before`
/// it had.
fn wait_assigned(log: &std::path::Path, before: usize, count: usize, timeout: Duration) {
    let started = Instant::now();
    while log_lines(log, "partition assigned").len() < before + count {
        assert!(
            started.elapsed() < timeout,
            "{count} partitions not assigned within {timeout:?} ({})",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn store_stall_pauses_consumption_then_catches_up_exactly() {
    let dir = test_dir();
    let pg = PgSchema::new("stall");
    // Stall the store: hold the row every flush updates last, so flushes block.
    tallyd::store::Store::open(&pg.url).unwrap();
    let mut blocker = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    blocker
        .batch_execute("INSERT INTO tallyd_meta (key, value) VALUES ('last_flush', '')")
        .unwrap();
    let mut stall = blocker.transaction().unwrap();
    stall
        .batch_execute("SELECT * FROM tallyd_meta WHERE key = 'last_flush' FOR UPDATE")
        .unwrap();

    let t = broker();
    let port = free_port();
    let log = dir.path().join("tallyd.log");
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::spawn_with(
        &t.brokers(),
        &pg.url,
        "g-stall",
        &log,
        &[
            ("TALLYD_FLUSH__MAX_PENDING_CELLS", "300"),
            ("TALLYD_HTTP__LISTEN", &listen),
        ],
    );
    const N: u64 = 20_000;
    let lines = generate(&t.brokers(), TOPIC, N, 16, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    // Over the bound with a flush stuck, the consumer must pause, not grow.
    wait_metric(
        port,
        "tallyd_consumer_paused",
        1.0,
        Duration::from_secs(120),
        "consumer never paused while the store stalled",
    );
    // Paused means no growth: unflushed state stays where it was.
    std::thread::sleep(Duration::from_millis(1500));
    let before = metric(port, "tallyd_pending_cells");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        metric(port, "tallyd_pending_cells"),
        before,
        "unflushed state grew while paused"
    );
    assert_eq!(metric(port, "tallyd_consumer_paused"), Some(1.0));
    // A paused consumer has unread messages: the lag says so.
    let lag = || -> f64 {
        (0..PARTITIONS)
            .filter_map(|p| metric(port, &format!("tallyd_consumer_lag{{partition=\"{p}\"}}")))
            .sum()
    };
    let paused_lag = lag();
    eprintln!("consumer lag while paused: {paused_lag} of {N} messages");
    assert!(
        paused_lag >= 1.0,
        "no consumer lag reported while paused (sum over partitions: {paused_lag})"
    );
    assert_eq!(
        metric(port, "tallyd_last_flush_timestamp_seconds"),
        None,
        "no flush can have landed while the store is stalled"
    );
    let released = chrono::Utc::now().timestamp() as f64;
    stall.rollback().unwrap();
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(180), &log);
    // The consumer sees that the last flush landed a poll after the store has
    // it, and resumes then.
    wait_metric(
        port,
        "tallyd_consumer_paused",
        0.0,
        Duration::from_secs(10),
        "consumption did not resume by itself",
    );
    for p in 0..PARTITIONS {
        wait_metric(
            port,
            &format!("tallyd_consumer_lag{{partition=\"{p}\"}}"),
            0.0,
            Duration::from_secs(10),
            "the consumer caught up but still reports lag",
        );
    }
    let last_flush = metric(port, "tallyd_last_flush_timestamp_seconds");
    assert!(
        last_flush.is_some_and(|t| t >= released),
        "last flush at {last_flush:?}, store released at {released}"
    );
    d.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &pg.url, &truth, N);
}

/// Two instances consume; the store goes down; one instance dies: the
/// survivor's rebalance must not wait for the store inside librdkafka's poll
/// (which would exceed `max.poll.interval.ms` and drop it from the group). It
/// stays a member while the store is down, takes every partition once the
/// store is back, and the totals are exact.
#[test]
fn rebalance_while_the_store_is_down_keeps_the_group() {
    let dir = test_dir();
    let pg = PgSchema::new("storedown");
    let t = broker();
    const N: u64 = 30_000;
    let lines = generate(&t.brokers(), TOPIC, N, 18, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);
    // Short group timeouts, so that the store stays down for longer than the
    // poll interval.
    const POLL_INTERVAL_MS: u64 = 10_000;
    let config = config_with_kafka(
        dir.path(),
        &[
            ("max.poll.interval.ms", &POLL_INTERVAL_MS.to_string()),
            ("session.timeout.ms", "6000"),
        ],
    );
    let (gate, url) = Gate::before(&pg.url);
    let log_a = dir.path().join("a.log");
    let log_b = dir.path().join("b.log");
    let mut a = Daemon::spawn_config(&config, &t.brokers(), &url, "g-down", &log_a, &[]);
    let mut b = Daemon::spawn_config(&config, &t.brokers(), &url, "g-down", &log_b, &[]);
    wait_consuming(&pg.url, TOPIC, Duration::from_secs(90));
    // Both hold partitions before the store goes down.
    wait_assigned(&log_a, 0, 1, Duration::from_secs(60));
    wait_assigned(&log_b, 0, 1, Duration::from_secs(60));
    gate.shut();
    let given_before = log_lines(&log_a, "partitions given").len();
    b.kill9();
    // Down for twice the poll interval, through the rebalance B's death causes
    // (once its session times out).
    std::thread::sleep(Duration::from_millis(2 * POLL_INTERVAL_MS));
    let given_while_down = log_lines(&log_a, "partitions given").len() - given_before;
    gate.open();
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(180), &log_a);
    a.stop();
    check_exact(dir.path(), &t.brokers(), TOPIC, &pg.url, &truth, N);
    let exceeded = log_lines(&log_a, "maximum poll interval");
    assert!(
        exceeded.is_empty(),
        "the survivor exceeded max.poll.interval.ms: {exceeded:?}"
    );
    assert!(
        given_while_down > 0,
        "the survivor was given no partitions while the store was down"
    );
}
