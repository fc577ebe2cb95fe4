//! tallyd prices telephony usage in real time.
//!
//! The modules follow one CDR from Kafka to a UsageRecord:
//!
//! - [`cdr`] decodes and validates a message (CONTRACT §1); bad input becomes a
//!   [`cdr::Rejection`] with a machine-readable reason.
//! - [`calendar`] buckets the event time into its UTC day, month and year.
//! - [`category`] maps a CDR to its Twilio leaf category and knows the rollup tree.
//! - [`rating`] compiles the tariff from config and prices a CDR exactly.
//! - [`counters`] holds the sharded per-account, per-day, per-leaf deltas since the
//!   last flush and expands them into every rollup and period at flush time.
//! - [`pipeline`] is the hot path that strings the above together for one message.
//! - [`store`] holds the tables UsageRecords are flushed into.
//! - [`api`] serves them over HTTP: Twilio Usage Records, AgentPhone `/v1/usage`,
//!   and the accounts that may read them.
//! - [`config`] loads `config/tallyd.toml`.

pub mod calendar;
pub mod category;
pub mod cdr;
pub mod config;
pub mod counters;
pub mod pipeline;
pub mod rating;

pub mod api;

/// The store's schema (the flush writer lands beside it).
pub mod store {
    pub mod schema;
}
