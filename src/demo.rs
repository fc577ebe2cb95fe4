//! `tallyd demo`: the whole main job on one machine with nothing installed — an
//! in-process Kafka (librdkafka's mock cluster) fed with generated CDR traffic,
//! the daemon consuming it into a SQLite store of its own, and the HTTP
//! endpoints.
//!
//! The demo never touches real data: it ignores `store.url` and the configured
//! accounts and admin token, and keeps its store in its own directory
//! (`--dir`, default `./tallyd-demo`). The store is marked as the demo's when it
//! is made; a later demo replaces only a store with that mark, and refuses any
//! other file in its place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;

use std::path::{Path, PathBuf};

use crate::config::{Config, Secret};
use crate::generate::{produce, Generator, GeneratorSettings};
use crate::rating::{price_to_decimal, Tariff};
use crate::store::Store;

const DEMO_SID: &str = "AC00000000000000000000000000000c11";
const DEMO_TOKEN: &str = "demo-auth-token";
const DEMO_API_KEY: &str = "demo-api-key";
const DEMO_ADMIN_TOKEN: &str = "demo-admin-token";
/// The `tallyd_meta` key marking a store as made by the demo.
const DEMO_MARK: &str = "demo_store";

/// The demo store's file in `dir`.
pub fn store_path(dir: &Path) -> PathBuf {
    dir.join("tallyd.db")
}

/// Makes a fresh demo store at `path`: replaces one the demo made before,
/// refuses anything else there.
fn fresh_store(path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        // Read as immutable: no lock, journal or shared-memory file is made
        // beside a store that may not be ours.
        const IN_URI: &percent_encoding::AsciiSet =
            &percent_encoding::CONTROLS.add(b'?').add(b'#').add(b'%');
        let uri = format!(
            "file:{}?immutable=1",
            percent_encoding::utf8_percent_encode(&path.to_string_lossy(), IN_URI)
        );
        let ours = rusqlite::Connection::open_with_flags(
            uri,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )
        .and_then(|c| {
            c.query_row(
                "SELECT value FROM tallyd_meta WHERE key = ?1",
                [DEMO_MARK],
                |r| r.get::<_, String>(0),
            )
        })
        .is_ok();
        anyhow::ensure!(
            ours,
            "{} exists and was not made by tallyd demo; the demo will not touch it: \
             remove it yourself or give the demo another --dir",
            path.display()
        );
        // The mock cluster lives in this process only: the stored offsets of a
        // previous demo would not match its fresh topic.
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let url = format!("sqlite://{}", path.display());
    drop(Store::open(&url)?);
    rusqlite::Connection::open(path)?.execute(
        "INSERT INTO tallyd_meta (key, value) VALUES (?1, 'made by tallyd demo')",
        [DEMO_MARK],
    )?;
    Ok(url)
}

pub struct DemoOptions {
    /// CDRs per second produced into the mock broker.
    pub rate: u64,
    /// Stop after this many seconds (0 = until Ctrl-C).
    pub duration: u64,
    pub accounts: usize,
    pub seed: u64,
    /// Directory of the demo's own store.
    pub dir: PathBuf,
}

pub fn run(mut cfg: Config, tariff: Tariff, opts: DemoOptions) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
    mock.create_topic(&cfg.kafka.topic, 4, 1)?;
    mock.create_topic(&cfg.kafka.dead_letter_topic, 1, 1)?;
    cfg.kafka.brokers = mock.bootstrap_servers();
    // Real data stays out of reach: the demo's own store, its own account
    // and admin token, nothing of the configured ones.
    cfg.store.url = fresh_store(&store_path(&opts.dir))?;
    cfg.api.admin_token = Some(Secret::new(DEMO_ADMIN_TOKEN));
    // A readable demo account: the generator's first account (on the CallingBox plan).
    cfg.api.accounts = vec![crate::config::AccountConfig {
        sid: DEMO_SID.into(),
        auth_token: Secret::new(DEMO_TOKEN),
        parent_sid: None,
        friendly_name: Some("demo".into()),
        plan: None,
        limits: None,
        api_keys: vec![Secret::new(DEMO_API_KEY)],
    }];
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
        "tallyd demo: {} CDRs/s into an in-process Kafka, store {store_url} (the demo's own)",
        opts.rate
    );
    println!("  metrics:  http://{http}/metrics");
    println!("  health:   http://{http}/healthz   http://{http}/readyz");
    println!("  Twilio:   curl -u {DEMO_SID}:{DEMO_TOKEN} 'http://{http}/2010-04-01/Accounts/{DEMO_SID}/Usage/Records/Daily.json?Category=calls'");
    println!("  AgentPhone: curl -H 'Authorization: Bearer {DEMO_API_KEY}' http://{http}/v1/usage/daily?days=7");
    println!("  admin:    curl -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://{http}/admin/accounts");
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
    print_summary(&Store::new(&summary_url, 1)?)?;
    Ok(())
}

fn report(url: &str, stop: &AtomicBool) {
    // Opened, not migrated: the daemon migrates the store once it is up.
    let Ok(store) = Store::new(url, 1) else {
        return;
    };
    let mut ticks = 0u32;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        ticks += 1;
        if ticks % 10 != 0 {
            continue;
        }
        let _ = print_summary(&store);
    }
}

/// Prints the all-time rollups summed over every account.
fn print_summary(store: &Store) -> anyhow::Result<()> {
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
    // Latency quantiles over the last 5 minutes (the summaries of crate::metrics).
    let latency = crate::metrics::latency_report();
    println!(
        "  {}",
        latency.as_deref().unwrap_or("latency: none recorded yet")
    );
    Ok(())
}
