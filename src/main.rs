//! The `tallyd` binary: `run` (the daemon), `demo` (everything in one process),
//! `generate` (synthetic CDR traffic), `check-config` (validate a config file
//! without starting).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rdkafka::config::ClientConfig;

use tallyd::calendar::Day;
use tallyd::config::Config;
use tallyd::generate::{produce, Generator, GeneratorSettings};

#[derive(Parser)]
#[command(
    name = "tallyd",
    version,
    about = "Real-time telephony usage rating: Kafka CDRs in, exact UsageRecords out"
)]
struct Cli {
    /// Log lines on stderr: `text` (coloured only when stderr is a terminal and
    /// NO_COLOR is unset) or `json` (one object per line: timestamp, level,
    /// target, message and the event's fields). RUST_LOG sets what is logged.
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        global = true,
        default_value_t = LogFormat::Text,
        env = "TALLYD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: consume CDRs, rate, flush UsageRecords, serve HTTP.
    Run {
        /// Config file (every key documented in it; TALLYD_SECTION__KEY
        /// environment variables override keys).
        #[arg(long, default_value = "config/tallyd.toml")]
        config: PathBuf,
    },
    /// Run the whole main job in one process: in-process Kafka, generated traffic,
    /// a SQLite store of its own, HTTP metrics and APIs. Never touches the
    /// configured store, accounts or admin token.
    Demo {
        /// Config file [default: config/tallyd.toml if there is one here, else
        /// the shipped one built into the binary].
        #[arg(long)]
        config: Option<PathBuf>,
        /// CDRs per second to generate.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Stop after this many seconds (0 = run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        duration: u64,
        /// Number of distinct accounts in the generated traffic.
        #[arg(long, default_value_t = 200)]
        accounts: usize,
        /// Seed of the generated traffic (the same seed, the same CDRs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory of the demo's own SQLite store (made if missing). A store
        /// an earlier demo made there is replaced; any other file is refused.
        #[arg(long, default_value = "tallyd-demo")]
        dir: PathBuf,
    },
    /// Check a config file and the TALLYD_SECTION__KEY overrides in the
    /// environment without starting anything: keys, values, tariffs, accounts,
    /// store URL and addresses (nothing is connected to). Exits 0 if `run` would
    /// accept it, else 1 with the key and the reason.
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = "config/tallyd.toml")]
        config: PathBuf,
    },
    /// Produce deterministic synthetic CDRs to a topic and/or a JSON-lines file.
    Generate {
        /// Bootstrap servers (omit with --no-kafka).
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Topic to produce to.
        #[arg(long, default_value = "cdrs")]
        topic: String,
        /// Number of messages.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Seed (the same seed, the same messages).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of distinct accounts.
        #[arg(long, default_value_t = 1000)]
        accounts: usize,
        /// Share of messages that re-send an earlier CDR (0–1).
        #[arg(long, default_value_t = 0.01)]
        duplicate_rate: f64,
        /// Share of malformed messages (0–1).
        #[arg(long, default_value_t = 0.001)]
        malformed_rate: f64,
        /// Share of late CDRs (0–1): their event day is one of the --days days
        /// ending at --last-day; the others happen on --last-day.
        #[arg(long, default_value_t = 0.02)]
        late_rate: f64,
        /// How many days back late CDRs reach.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Last event day, YYYY-MM-DD (default today, UTC).
        #[arg(long)]
        last_day: Option<String>,
        /// Messages per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Also write every payload as one line of this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Only write the file; produce nothing.
        #[arg(long)]
        no_kafka: bool,
    },
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The rdkafka crate warns of every error event its producer poll
                // skips; the producer's context logs those errors itself.
                "info,librdkafka=warn,postgres=warn,tokio_postgres=warn,rdkafka::producer::base_producer=error".into()
            }),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            // Colour codes only for a person at a terminal, not in files or
            // log collectors (https://no-color.org: NO_COLOR set and not empty).
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty());
            logs.with_ansi(colour).init()
        }
        LogFormat::Json => logs
            .with_ansi(false)
            .with_thread_names(true)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run { config } => {
            let shutdown = Arc::new(AtomicBool::new(false));
            tallyd::daemon::stop_on_signals(shutdown.clone());
            let (cfg, tariff) = Config::load(&config)?;
            tallyd::daemon::run(cfg, tariff, shutdown)
        }
        Command::Demo {
            config,
            rate,
            duration,
            accounts,
            seed,
            dir,
        } => {
            let default = Path::new("config/tallyd.toml");
            let (cfg, tariff) = match config {
                Some(path) => Config::load(&path)?,
                None if default.exists() => Config::load(default)?,
                None => {
                    println!("tallyd demo: no config/tallyd.toml here; using the shipped one built into the binary");
                    Config::shipped()?
                }
            };
            tallyd::demo::run(
                cfg,
                tariff,
                tallyd::demo::DemoOptions {
                    rate,
                    duration,
                    accounts,
                    seed,
                    dir,
                },
            )
        }
        Command::CheckConfig { config } => {
            let (cfg, tariff) = Config::load(&config)?;
            let store = if tallyd::store::is_sqlite_url(&cfg.store.url) {
                "SQLite"
            } else {
                "PostgreSQL"
            };
            println!(
                "{}: ok ({} rating plans, {} configured accounts, {store} store, HTTP on {}, CDRs from topic {} at {})",
                config.display(),
                tariff.plans().len(),
                cfg.api.accounts.len(),
                cfg.http.listen,
                cfg.kafka.topic,
                cfg.kafka.brokers,
            );
            Ok(())
        }
        Command::Generate {
            brokers,
            topic,
            count,
            seed,
            accounts,
            duplicate_rate,
            malformed_rate,
            late_rate,
            days,
            last_day,
            rate,
            file,
            no_kafka,
        } => {
            let last_day = match last_day {
                Some(d) => {
                    Day::parse(&d).with_context(|| format!("--last-day {d:?} is not YYYY-MM-DD"))?
                }
                None => Day::today(),
            };
            for (name, v) in [
                ("--duplicate-rate", duplicate_rate),
                ("--malformed-rate", malformed_rate),
                ("--late-rate", late_rate),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&v),
                    "{name} {v} is not between 0 and 1"
                );
            }
            let gen = Generator::new(GeneratorSettings {
                seed,
                accounts,
                duplicate_rate,
                malformed_rate,
                late_rate,
                days,
                last_day,
            });
            let mut out = match &file {
                Some(p) => Some(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => None,
            };
            if no_kafka {
                let out = out.as_mut().context("--no-kafka needs --file")?;
                for g in gen.take(count as usize) {
                    std::io::Write::write_all(out, &g.payload)?;
                    std::io::Write::write_all(out, b"\n")?;
                }
                std::io::Write::flush(out)?;
                return Ok(());
            }
            let mut client = ClientConfig::new();
            client.set("bootstrap.servers", &brokers);
            let stop = AtomicBool::new(false);
            let sent = produce(
                &client,
                &topic,
                gen,
                count,
                rate,
                out.as_mut().map(|w| w as &mut dyn std::io::Write),
                &stop,
            )?;
            if let Some(mut w) = out {
                std::io::Write::flush(&mut w)?;
            }
            eprintln!("produced {sent} messages to {topic}");
            Ok(())
        }
    }
}
