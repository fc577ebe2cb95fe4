//! Webhooks: callback URLs that may be used ([`url`]), how callbacks are
//! signed ([`sign`]), and the dispatcher that sends the outbox's callbacks
//! ([`dispatch`], rows in [`crate::store::outbox`]).

pub mod dispatch;
pub mod sign;
pub mod url;

pub use dispatch::{DispatchError, Dispatcher, DispatcherHandle};

use serde::Deserialize;

/// `[webhooks]`: where callbacks may go and how they are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Allow callback URLs on loopback addresses (tests, a receiver beside
    /// the daemon).
    #[serde(default)]
    pub allow_loopback: bool,
    /// Allow callback URLs on private, link-local and other internal addresses.
    #[serde(default)]
    pub allow_private: bool,
    /// Milliseconds one delivery attempt may take (connect to last byte).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Seconds a callback is retried for (exponential backoff with jitter)
    /// before it is marked failed.
    #[serde(default = "default_retry_for_secs")]
    pub retry_for_secs: u64,
    /// Callbacks in flight at once, over all accounts.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Callbacks in flight at once for one account.
    #[serde(default = "default_per_account")]
    pub per_account_in_flight: usize,
    /// Seconds a finished (delivered or failed) callback is kept in the
    /// outbox before it is removed, its counts kept for the delivery stats;
    /// 0 keeps them all.
    #[serde(default = "default_keep_finished_secs")]
    pub keep_finished_secs: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_retry_for_secs() -> u64 {
    86_400
}
fn default_max_in_flight() -> usize {
    64
}
fn default_per_account() -> usize {
    4
}
fn default_keep_finished_secs() -> u64 {
    30 * 86_400
}

impl Default for WebhooksConfig {
    fn default() -> WebhooksConfig {
        WebhooksConfig {
            allow_loopback: false,
            allow_private: false,
            timeout_ms: default_timeout_ms(),
            retry_for_secs: default_retry_for_secs(),
            max_in_flight: default_max_in_flight(),
            per_account_in_flight: default_per_account(),
            keep_finished_secs: default_keep_finished_secs(),
        }
    }
}

impl WebhooksConfig {
    pub fn url_policy(&self) -> url::UrlPolicy {
        url::UrlPolicy {
            allow_loopback: self.allow_loopback,
            allow_private: self.allow_private,
        }
    }
}
