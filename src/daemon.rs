//! `tallyd run`: wires ingest, flusher, dead letters and the HTTP server together,
//! and shuts down gracefully (stop consuming, final flush, exit 0).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;

use crate::config::Config;
use crate::dead_letter::DeadLetters;
use crate::flush::{FlushHealth, Flusher};
use crate::http::{self, Probes};
use crate::ingest::{Crew, Ingest, IngestHealth, IngestSettings};
use crate::rating::Tariff;
use crate::store::{ErrorKind, Store};

/// The librdkafka client settings shared by the consumer and producers.
pub fn kafka_client(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", &cfg.kafka.group_id)
        .set("client.id", "tallyd");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// Runs the daemon until `shutdown` is set, then drains and returns.
pub fn run(cfg: Config, tariff: Tariff, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
    let metrics = crate::metrics::install();
    for plan in tariff.plans() {
        if !plan.unpriced.is_empty() {
            let names: Vec<&str> = plan.unpriced.iter().map(|c| c.name()).collect();
            tracing::warn!(plan = %plan.name, categories = ?names, "categories without a rate are priced at zero");
        }
    }
    // A store URL that can never work stops the start; a store that is merely
    // down is waited for (below), with the HTTP server already answering.
    let store = Store::new(&cfg.store.url, cfg.api.pool_size).context("store.url")?;
    // Each wallet is answered by the instance that consumes its account's
    // partition; the others forward to it (docs/design.md, wallets).
    let ownership = Arc::new(crate::wallet::owners::Ownership::routed(
        &cfg.kafka.topic,
        cfg.kafka.partitioner,
        &cfg.http.advertised(),
    ));
    let api = crate::api::ApiState::new(&cfg, &tariff, store.clone())
        .context("starting the usage API")?
        .with_ownership(ownership.clone());
    let started = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listen = cfg.http.listen.clone();
    let limits = http::ServerLimits::from(&cfg.http);
    let flush_health = Arc::new(FlushHealth::default());
    let ingest_health = Arc::new(IngestHealth::default());
    let app = http::router(Probes {
        metrics,
        ingest: ingest_health.clone(),
        flush: flush_health.clone(),
        store: store.health().clone(),
        started: started.clone(),
    });
    let app = app.merge(crate::api::router(api.clone()));
    let stop = shutdown.clone();
    let http_cfg = cfg.http.clone();
    let bound_ownership = ownership.clone();
    let server = rt.block_on(async move {
        let ownership = bound_ownership;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding http.listen {listen}"))?;
        tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
        ownership.set_me(&http_cfg.advertised_at(&listener.local_addr()?.to_string()));
        tracing::info!(advertise_url = %ownership.me(), partitioner = ownership.partitioner.as_str(),
            "wallets routed by CDR partition: this instance is reached at advertise_url");
        let handle = tokio::spawn(async move {
            http::serve(listener, app, limits, async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
        });
        anyhow::Ok(handle)
    })?;
    if !prepare_store(&store, &api, &cfg, &shutdown)? {
        let _ = rt.block_on(server);
        return Ok(());
    }
    // Wallets are loaded before any CDR is consumed: the replay from the
    // stored offsets then debits exactly what the stored balances lack.
    let wallets = api
        .load_wallets()
        .context("loading wallets from the store")?;
    tracing::info!(wallets, "wallets loaded");
    // Triggers likewise: the replay's crossings are evaluated against them.
    let triggers = store
        .with_conn(|c| c.all_triggers())
        .context("loading usage triggers from the store")?;
    tracing::info!(triggers = triggers.len(), "usage triggers loaded");
    api.triggers().replace_all(triggers);
    rt.spawn(
        api.triggers()
            .clone()
            .keep_loaded(store.clone(), shutdown.clone()),
    );
    rt.spawn(crate::api::wallet::expire_holds(
        api.clone(),
        shutdown.clone(),
    ));
    // Callbacks (trigger firings, wallet events) go out from the store's
    // outbox through the dispatcher, on threads of their own at a lower CPU
    // priority than ingestion; a flusher that committed outbox rows hands
    // them over (or wakes it) so they leave at once, not at the next poll.
    // While the consumers are far behind it paces itself.
    let webhook_rt = crate::webhooks::dispatch::runtime()?;
    let dispatcher = {
        let _in_runtime = webhook_rt.enter();
        let health = ingest_health.clone();
        crate::webhooks::Dispatcher::start_paced(
            store.clone(),
            cfg.webhooks.clone(),
            shutdown.clone(),
            Some(Arc::new(move || health.behind())),
        )
        .context("starting the webhook dispatcher")?
    };
    started.store(true, Ordering::Relaxed);
    let tariff = Arc::new(tariff);
    let client = kafka_client(&cfg);
    watch_partition_count(
        &client,
        &cfg.kafka.topic,
        ownership.clone(),
        shutdown.clone(),
    )
    .context("creating the Kafka metadata client")?;
    let dead_letters = Arc::new(
        DeadLetters::new(&client, &cfg.kafka.dead_letter_topic)
            .context("creating the dead-letter producer")?,
    );
    // SQLite has one writer: one flusher serves every consumer. With
    // PostgreSQL each consumer has a flusher of its own (each spreading a flush
    // over `flush.parallel_writers` connections): consumers reach the end of a
    // backlog together, and one consumer's final flush no longer waits behind the
    // other's. A consumer has at most one job out at a time, so a flusher's
    // queue holds at most one job per consumer it serves, and a consumer's jobs
    // are done in the order it sent them.
    let consumers = cfg.kafka.consumers;
    let flushers = if store.is_sqlite() { 1 } else { consumers };
    let mut job_queues = Vec::with_capacity(flushers);
    let mut flush_threads = Vec::with_capacity(flushers);
    for i in 0..flushers {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel(consumers.div_ceil(flushers));
        let flusher = Flusher {
            store: store.clone(),
            tariff: tariff.clone(),
            dead_letters: Some(dead_letters.clone()),
            health: flush_health.clone(),
            writers: cfg.flush.parallel_writers,
            triggers: api.triggers().clone(),
            dispatcher: Some(dispatcher.clone()),
        };
        job_queues.push(jobs_tx);
        flush_threads.push(
            std::thread::Builder::new()
                .name(format!("tallyd-flush-{i}"))
                .spawn(move || flusher.run(jobs_rx))?,
        );
    }
    let settings = IngestSettings {
        topic: cfg.kafka.topic.clone(),
        store: store.clone(),
        instance_id: crate::ingest::instance_id(cfg.kafka.instance_id.as_deref(), &cfg.http.listen),
        flush_interval: Duration::from_millis(cfg.flush.interval_ms.max(10)),
        max_busy_share: cfg.flush.max_busy_share,
        max_pending_cells: cfg.flush.max_pending_cells,
        dedup_window_days: cfg.dedup.window_days,
        revoke_timeout: Duration::from_secs(30),
        wallets: api.wallets().clone(),
        triggers: api.triggers().clone(),
        ownership: ownership.clone(),
    };
    // `kafka.consumers` consumers, each on its own thread: librdkafka keeps one
    // fetch in flight per broker connection, so a single consumer and the broker
    // take turns; several overlap their fetches. The first is the instance's
    // member of the group and shares its partitions with the others.
    let crew = Arc::new(Crew::default());
    let mut ingest_threads = Vec::with_capacity(consumers);
    for (i, seat) in Crew::seats(consumers).into_iter().enumerate() {
        let ingest = Ingest::new(
            &client,
            settings.clone(),
            tariff.clone(),
            dead_letters.clone(),
            job_queues[i % flushers].clone(),
            ingest_health.clone(),
            shutdown.clone(),
            crew.clone(),
            seat,
        )
        .context("creating the Kafka consumer")?;
        ingest_threads.push(
            std::thread::Builder::new()
                .name(format!("tallyd-ingest-{i}"))
                .spawn(move || ingest.run())?,
        );
    }
    drop(job_queues);
    // A consumer thread ends at shutdown, or early if it panicked: then the whole
    // daemon stops (gracefully) rather than run with part of its partitions.
    while !ingest_threads.iter().any(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    shutdown.store(true, Ordering::Relaxed);
    let mut panicked = false;
    for t in ingest_threads {
        panicked |= t.join().is_err();
    }
    for t in flush_threads {
        let _ = t.join();
    }
    webhook_rt.block_on(dispatcher.join());
    let _ = rt.block_on(server);
    if panicked {
        anyhow::bail!("an ingest thread panicked");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Keeps `ownership`'s partition count of `topic` current: asks the brokers
/// every second until it is known, then every 10 s (partitions may be added),
/// on a thread of its own until shutdown. Which partition an account maps to,
/// hence which instance owns its wallet, depends on it.
fn watch_partition_count(
    client: &ClientConfig,
    topic: &str,
    ownership: Arc<crate::wallet::owners::Ownership>,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut cfg = client.clone();
    cfg.set("client.id", "tallyd-metadata");
    let consumer: BaseConsumer = cfg.create()?;
    let topic = topic.to_owned();
    std::thread::Builder::new()
        .name("tallyd-partitions".into())
        .spawn(move || {
            let mut last_error = String::new();
            while !shutdown.load(Ordering::Relaxed) {
                let known = match consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                    Ok(md) => {
                        let n = md
                            .topics()
                            .iter()
                            .find(|t| t.name() == topic && t.error().is_none())
                            .map_or(0, |t| t.partitions().len() as u32);
                        let before = ownership.partitions();
                        if n > 0 && n != before {
                            tracing::info!(topic, partitions = n, before, "CDR topic's partition count");
                            ownership.set_partitions(n);
                        }
                        n > 0
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if e != last_error {
                            tracing::warn!(error = %e, topic, "cannot read the CDR topic's partition count");
                            last_error = e;
                        }
                        false
                    }
                };
                let wait = if known { 10 } else { 1 };
                let until = std::time::Instant::now() + Duration::from_secs(wait);
                while std::time::Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?;
    Ok(())
}

/// Creates or upgrades the store's tables and writes the config's accounts,
/// waiting for the store while it is down (retrying with backoff; `/readyz`
/// says why meanwhile). Returns false if shutdown came first; fails on what
/// retrying cannot mend (a config the store contradicts, data it cannot take).
fn prepare_store(
    store: &Store,
    api: &crate::api::ApiState,
    cfg: &Config,
    shutdown: &AtomicBool,
) -> anyhow::Result<bool> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let err = match store.migrate() {
            Err(e) => e,
            Ok(()) => match api.seed(cfg) {
                Ok(()) => return Ok(true),
                Err(crate::api::ApiInitError::Store(e)) => e,
                Err(e) => return Err(e).context("writing [[api.accounts]] into the store"),
            },
        };
        if err.kind() != ErrorKind::Retryable {
            return Err(err).context("preparing the store");
        }
        tracing::warn!(error = %err, url = %store.url(), retry_in_ms = backoff.as_millis() as u64,
            "store not reachable; waiting for it before consuming");
        let until = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < until {
            if shutdown.load(Ordering::Relaxed) {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Sets `flag` on SIGINT or SIGTERM.
pub fn stop_on_signals(flag: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    // The handlers are installed here, before this returns: a SIGTERM that comes
    // while tallyd is still starting (an orchestrator changing its mind) stops it
    // cleanly instead of killing it with the default action.
    let (mut term, mut int) = rt.block_on(async {
        (
            signal(SignalKind::terminate()).expect("SIGTERM handler"),
            signal(SignalKind::interrupt()).expect("SIGINT handler"),
        )
    });
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        tracing::info!("signal received; stopping");
        flag.store(true, Ordering::Relaxed);
    });
}
