//! `tallyd demo`: the whole main job on one machine with nothing installed — an
//! in-process Kafka (librdkafka's mock cluster) fed with generated CDR traffic,
//! the daemon consuming it into SQLite under `./data`, and the HTTP endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;

use crate::config::Config;
use crate::generate::{produce, Generator, GeneratorSettings};
use crate::rating::{price_to_decimal, Tariff};
use crate::store::Store;

const DEMO_SID: &str = "AC00000000000000000000000000000c11";
const DEMO_TOKEN: &str = "demo-auth-token";
const DEMO_API_KEY: &str = "demo-api-key";

pub struct DemoOptions {
    /// CDRs per second produced into the mock broker.
    pub rate: u64,
    /// Stop after this many seconds (0 = until Ctrl-C).
    pub duration: u64,
    pub accounts: usize,
    pub seed: u64,
}

pub fn run(mut cfg: Config, tariff: Tariff, opts: DemoOptions) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
    mock.create_topic(&cfg.kafka.topic, 4, 1)?;
    mock.create_topic(&cfg.kafka.dead_letter_topic, 1, 1)?;
    cfg.kafka.brokers = mock.bootstrap_servers();
    // The mock cluster lives in this process only: start from an empty store so the
    // stored offsets match the fresh topic.
    if let Some(path) = cfg.store.url.strip_prefix("sqlite://") {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    // A readable demo account: the generator's first account (on the CallingBox plan).
    cfg.api.accounts.push(crate::config::AccountConfig {
        sid: DEMO_SID.into(),
        auth_token: crate::config::Secret::new(DEMO_TOKEN),
        parent_sid: None,
        friendly_name: Some("demo".into()),
        plan: None,
        limits: None,
        api_keys: vec![crate::config::Secret::new(DEMO_API_KEY)],
    });
    let shutdown = Arc::new(AtomicBool::new(false));
    crate::daemon::stop_on_signals(shutdown.clone());

    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.kafka.brokers);
    let topic = cfg.kafka.topic.clone();
    let gen = Generator::new(GeneratorSettings {
        seed: opts.seed,
        accounts: opts.accounts,
        ..Default::default()
    });
    let stop = shutdown.clone();
    let producer =
        std::thread::spawn(move || produce(&client, &topic, gen, u64::MAX, opts.rate, None, &stop));

    let http = cfg.http.listen.clone();
    let store_url = cfg.store.url.clone();
    println!(
        "tallyd demo: {} CDRs/s into an in-process Kafka, store {store_url}",
        opts.rate
    );
    println!("  metrics:  http://{http}/metrics");
    println!("  health:   http://{http}/healthz   http://{http}/readyz");
    println!("  Twilio:   curl -u {DEMO_SID}:{DEMO_TOKEN} 'http://{http}/2010-04-01/Accounts/{DEMO_SID}/Usage/Records/Daily.json?Category=calls'");
    println!("  AgentPhone: curl -H 'Authorization: Bearer {DEMO_API_KEY}' http://{http}/v1/usage/daily?days=7");
    println!("  OpenAPI:  http://{http}/openapi.yaml");
    println!("  Ctrl-C stops it (final flush, then exit).");

    let report_stop = shutdown.clone();
    let summary_url = store_url.clone();
    let reporter = std::thread::spawn(move || report(&store_url, &report_stop));
    if opts.duration > 0 {
        let s = shutdown.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(opts.duration));
            s.store(true, Ordering::Relaxed);
        });
    }
    let result = crate::daemon::run(cfg, tariff, shutdown.clone());
    shutdown.store(true, Ordering::Relaxed);
    let _ = producer.join();
    let _ = reporter.join();
    result?;
    // Final summary from the store, after the last flush.
    let mut store = Store::open(&summary_url)?;
    print_summary(&mut store)?;
    Ok(())
}

fn report(url: &str, stop: &AtomicBool) {
    let mut ticks = 0u32;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        ticks += 1;
        if ticks % 10 != 0 {
            continue;
        }
        if let Ok(mut s) = Store::open(url) {
            let _ = print_summary(&mut s);
        }
    }
}

/// Prints the all-time rollups summed over every account.
fn print_summary(store: &mut Store) -> anyhow::Result<()> {
    let rows = store.read_records("all")?;
    let mut totals: std::collections::BTreeMap<String, (i64, i64, i64)> = Default::default();
    for r in &rows {
        let t = totals.entry(r.category.clone()).or_default();
        t.0 += r.count;
        t.1 += r.usage;
        t.2 += r.price;
    }
    let accounts: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.account_sid.as_str()).collect();
    println!(
        "-- all-time usage, {} accounts, as of {} --",
        accounts.len(),
        store.last_flush()?.unwrap_or_default()
    );
    for cat in [
        "calls",
        "calls-sip",
        "calls-client",
        "sms",
        "mms",
        "totalprice",
    ] {
        if let Some((count, usage, price)) = totals.get(cat) {
            let usage = if cat.starts_with("calls") {
                format!("{:.2} minutes", *usage as f64 / 60.0)
            } else if cat == "totalprice" {
                String::new()
            } else {
                format!("{usage} messages")
            };
            println!(
                "  {cat:<14} count {count:>9}  {usage:<20} price {}",
                price_to_decimal(*price)
            );
        }
    }
    Ok(())
}
