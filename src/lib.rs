//! tallyd prices telephony usage in real time.
//!
//! The modules follow one CDR from Kafka to a UsageRecord:
//!
//! - [`cdr`] decodes and validates a message (docs/contract.md §1); bad input becomes a
//!   [`cdr::Rejection`] with a machine-readable reason.
//! - [`calendar`] buckets the event time into its UTC day, month and year.
//! - [`category`] maps a CDR to its Twilio leaf category and knows the rollup tree.
//! - [`rating`] compiles the tariff from config and prices a CDR exactly.
//! - [`counters`] holds the deltas since the last flush: one cell of the 15 leaf
//!   tallies (plus by-number/by-agent breakdowns) per account and UTC day, added
//!   into day, month, year and all-time rows at flush time. Rollups are sums of
//!   leaves, computed when read.
//! - [`pipeline`] is the hot path that strings the above together for a batch of
//!   messages, debiting each rated CDR from its account's [`wallet`] (prepaid
//!   balances and per-call holds in atomics, lock-free).
//! - [`dedup`] remembers CDR ids per partition for the dedup window.
//! - [`triggers`] keeps the usage triggers in memory: the consumer watches
//!   which CDRs may cross one (an early flush), the flush fires them.
//! - [`ingest`] is a Kafka consumer thread running the hot path (the daemon runs
//!   `kafka.consumers` of them; the first is the instance's group member and
//!   deals its partitions out to the others), taking messages in batches from a
//!   [`fetch_queue`]; the rebalance callback only posts the event, and stored
//!   offsets (and the partition's wallets, claimed with an epoch) are loaded
//!   off the callback; [`partitioner`] checks each CDR is on its account's
//!   partition; rejected messages go to [`dead_letter`]. Recurring client
//!   errors (a broker that is down) are logged once a [`log_throttle`] window.
//! - [`flush`] turns consistent snapshots (deltas, offsets, dedup ids, wallet
//!   debits, likely trigger crossings) into usage pages ([`flush::expand`],
//!   pure) and writes each partition's cut in one transaction
//!   ([`flush::worker`]), usage triggers fired and their callbacks in the
//!   outbox included.
//! - [`store`] is the one store layer (SQLite or PostgreSQL): a handle with
//!   pooled connections, one error type that says what retrying can do, and the
//!   flush transaction written once for both databases.
//! - [`webhooks`] sends the outbox's callbacks (trigger firings, wallet
//!   events), signed, at least once, off the hot path.
//! - [`api`] serves the stored records over HTTP: Twilio Usage Records and Usage
//!   Triggers, AgentPhone `/v1/usage`, wallets and holds (forwarded to the
//!   partition's owner), and the accounts that may read them; [`http`] adds `/metrics`,
//!   `/healthz`, `/readyz`; [`metrics`] is the catalogue of everything
//!   `/metrics` shows, with the latency summaries.
//! - [`daemon`] wires it all into `tallyd run`; [`demo`] runs everything in one
//!   process; [`generate`] makes synthetic CDR traffic; [`config`] loads
//!   `config/tallyd.toml`.

/// The allocator of every program built on the library (the daemon, its
/// tests, benchmarks and examples): mimalloc. With glibc's, a flush firing
/// 10,000 usage triggers spent a third of its time in malloc and free; it
/// is 25% faster with mimalloc, a plain flush 9% (`cargo bench --bench
/// flush`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod calendar;
pub mod category;
pub mod cdr;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod dead_letter;
pub mod dedup;
pub mod demo;
pub mod fetch_queue;
pub mod flush;
pub mod generate;
pub mod http;
pub mod ingest;
pub mod log_throttle;
pub mod metrics;
pub mod partitioner;
pub mod pipeline;
pub mod rating;
pub mod store;
pub mod triggers;
pub mod wallet;
pub mod webhooks;

pub mod api;
