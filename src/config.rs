//! The daemon's configuration: one TOML file (`config/tallyd.toml`), every key
//! documented there, `TALLYD_SECTION__KEY` environment overrides, unknown keys
//! rejected by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::rating::{RatingConfig, Tariff, TariffError};

/// The shipped config file's text.
pub const SHIPPED: &str = include_str!("../config/tallyd.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub flush: FlushConfig,
    #[serde(default)]
    pub dedup: DedupConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub api: ApiConfig,
    pub rating: RatingConfig,
    #[serde(default)]
    pub wallet: crate::wallet::WalletConfig,
    #[serde(default)]
    pub webhooks: crate::webhooks::WebhooksConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Topic the switch writes CDRs to.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Consumer group; instances in one group share the partitions.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Topic rejected messages are produced to, unchanged, with reason headers.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Extra librdkafka properties (security.protocol, sasl.*, ssl.*, …), passed through.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Consumers this instance runs, each on its own thread with its own broker
    /// connection; the first is the instance's group member and deals the
    /// partitions the group gives it out among them.
    #[serde(default = "default_consumers")]
    pub consumers: usize,
    /// The instance's static group membership id (`group.instance.id`): a
    /// restarted instance that comes back with the same id gets its partitions
    /// back without a rebalance. Unset or empty: dynamic membership. `auto`:
    /// the host name and the HTTP listen port. Must be unique per instance.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The switch's producer partitioner: which partition an account SID (the
    /// CDR key) goes to, hence which instance owns the account's wallet.
    #[serde(default)]
    pub partitioner: crate::partitioner::Partitioner,
}

fn default_consumers() -> usize {
    2
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_topic() -> String {
    "cdrs".into()
}
fn default_group() -> String {
    "tallyd".into()
}
fn default_dead_letter_topic() -> String {
    "cdrs-dead-letter".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            topic: default_topic(),
            group_id: default_group(),
            dead_letter_topic: default_dead_letter_topic(),
            properties: BTreeMap::new(),
            consumers: default_consumers(),
            instance_id: None,
            partitioner: Default::default(),
        }
    }
}

/// A credential from the config: deserialized as a plain string, never shown
/// by `Debug` (so a logged config or account does not leak it).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The credential itself, for comparing, hashing or storing it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `url` with its password replaced by `***` — the `user:password@` of a
/// URL and any `password=` parameter — for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let auth_end = out[auth_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| auth_start + i);
        if let Some(at) = out[auth_start..auth_end].rfind('@') {
            let userinfo = auth_start..auth_start + at;
            if let Some(colon) = out[userinfo.clone()].find(':') {
                out.replace_range(auth_start + colon + 1..userinfo.end, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(i) = out[from..].find("password=") {
        let start = from + i + "password=".len();
        let before = out[..from + i].chars().last();
        let end = out[start..]
            .find(['&', ' ', '#'])
            .map_or(out.len(), |j| start + j);
        if matches!(before, None | Some('?' | '&' | ' ')) {
            out.replace_range(start..end, "***");
            from = start + 3;
        } else {
            from = start;
        }
    }
    out
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` or `postgres://…`.
    #[serde(default = "default_store_url")]
    pub url: String,
}

fn default_store_url() -> String {
    "sqlite://data/tallyd.db".into()
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: default_store_url(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushConfig {
    /// Milliseconds between flushes of counter deltas + offsets to the store.
    #[serde(default = "default_flush_interval")]
    pub interval_ms: u64,
    /// Longest share of time the flusher spends writing; a flush that took D is
    /// followed by the next no sooner than D / share after it started.
    #[serde(default = "default_busy_share")]
    pub max_busy_share: f64,
    /// Unflushed counter cells above which consumption pauses until a flush lands.
    #[serde(default = "default_max_pending")]
    pub max_pending_cells: usize,
    /// PostgreSQL connections a flush is written over in parallel, each a
    /// transaction holding whole partitions; SQLite always writes with one.
    #[serde(default = "default_parallel_writers")]
    pub parallel_writers: usize,
}

fn default_flush_interval() -> u64 {
    2000
}
fn default_busy_share() -> f64 {
    0.1
}
fn default_max_pending() -> usize {
    1_000_000
}
fn default_parallel_writers() -> usize {
    2
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            interval_ms: default_flush_interval(),
            max_busy_share: default_busy_share(),
            max_pending_cells: default_max_pending(),
            parallel_writers: default_parallel_writers(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Days a CDR id is remembered after it is first seen.
    #[serde(default = "default_window_days")]
    pub window_days: u32,
}

fn default_window_days() -> u32 {
    7
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window_days: default_window_days(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the HTTP API, /metrics and /healthz listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Open client connections at most; past it, the longest-idle one is
    /// closed for a new one. Lowered to fit the open-file limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, counted from when the
    /// connection opens or the previous response was sent (so also the idle
    /// keep-alive timeout).
    #[serde(default = "default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds to read a request's body and answer it before a 408.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Base URL the other instances reach this one at (wallet requests are
    /// forwarded to a wallet's owner); empty: `http://` + `listen`, with an
    /// unspecified address (0.0.0.0, [::]) replaced by the loopback.
    #[serde(default)]
    pub advertise_url: String,
    /// Seconds a forwarded wallet request may take at its owner.
    #[serde(default = "default_forward_timeout_secs")]
    pub forward_timeout_secs: u64,
}

fn default_forward_timeout_secs() -> u64 {
    5
}

impl HttpConfig {
    /// The base URL this instance is reached at (`advertise_url`, else
    /// derived from `listen`), without a trailing slash.
    pub fn advertised(&self) -> String {
        self.advertised_at(self.listen.trim())
    }

    /// [`HttpConfig::advertised`] for a listener bound at `bound` (the port
    /// the system chose for `listen`'s port 0).
    pub fn advertised_at(&self, bound: &str) -> String {
        if !self.advertise_url.trim().is_empty() {
            return self.advertise_url.trim().trim_end_matches('/').to_owned();
        }
        let listen = bound;
        let addr = if let Some(port) = listen.strip_prefix("0.0.0.0:") {
            format!("127.0.0.1:{port}")
        } else if let Some(port) = listen.strip_prefix("[::]:") {
            format!("[::1]:{port}")
        } else {
            listen.to_owned()
        };
        format!("http://{addr}")
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_connections() -> usize {
    4096
}
fn default_header_read_timeout_secs() -> u64 {
    10
}
fn default_request_timeout_secs() -> u64 {
    30
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            max_connections: default_max_connections(),
            header_read_timeout_secs: default_header_read_timeout_secs(),
            request_timeout_secs: default_request_timeout_secs(),
            advertise_url: String::new(),
            forward_timeout_secs: default_forward_timeout_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer token for `/admin/…`; the admin API is disabled while it is unset.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// Store connections the API keeps for reads (and the most it uses at once).
    #[serde(default = "default_api_pool_size")]
    pub pool_size: usize,
    /// Limits given to accounts that do not set their own.
    #[serde(default)]
    pub default_limits: PlanLimits,
    /// Failed authentications a client address may make per minute (a burst of
    /// as many); past them it is answered 429 until the quota refills.
    #[serde(default = "default_auth_failures_per_minute")]
    pub auth_failures_per_minute: u32,
    /// Accounts written to the store at start (config wins over the admin API for
    /// the fields it sets).
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
}

fn default_api_pool_size() -> usize {
    8
}
fn default_auth_failures_per_minute() -> u32 {
    30
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            admin_token: None,
            pool_size: default_api_pool_size(),
            default_limits: PlanLimits::default(),
            auth_failures_per_minute: default_auth_failures_per_minute(),
            accounts: Vec::new(),
        }
    }
}

/// An account (or subaccount) declared in config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// `AC` + 32 lowercase hex digits.
    pub sid: String,
    /// Password of HTTP Basic auth on the Twilio paths.
    pub auth_token: Secret,
    /// The parent account's SID, for a subaccount.
    #[serde(default)]
    pub parent_sid: Option<String>,
    /// Human-readable name.
    #[serde(default)]
    pub friendly_name: Option<String>,
    /// Plan name shown by `/v1/usage`; defaults to the account's rating plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// Plan limits shown by `/v1/usage`; defaults to `api.default_limits`.
    #[serde(default)]
    pub limits: Option<PlanLimits>,
    /// AgentPhone API keys (Bearer tokens) of this account.
    #[serde(default)]
    pub api_keys: Vec<Secret>,
}

/// AgentPhone plan limits (`plan.limits` of `GET /v1/usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanLimits {
    /// Phone numbers the account may hold.
    #[serde(default = "default_numbers_limit")]
    pub numbers: i64,
    /// Messages per calendar month.
    #[serde(default = "default_messages_per_month")]
    pub messages_per_month: i64,
    /// Voice minutes per calendar month.
    #[serde(default = "default_voice_minutes_per_month")]
    pub voice_minutes_per_month: i64,
    /// Longest call, in minutes.
    #[serde(default = "default_max_call_duration_minutes")]
    pub max_call_duration_minutes: i64,
    /// Calls at the same time.
    #[serde(default = "default_concurrent_calls")]
    pub concurrent_calls: i64,
}

fn default_numbers_limit() -> i64 {
    10
}
fn default_messages_per_month() -> i64 {
    10_000
}
fn default_voice_minutes_per_month() -> i64 {
    10_000
}
fn default_max_call_duration_minutes() -> i64 {
    60
}
fn default_concurrent_calls() -> i64 {
    5
}

impl PlanLimits {
    /// The first limit below zero, by its key name.
    pub fn negative(&self) -> Option<(&'static str, i64)> {
        [
            ("numbers", self.numbers),
            ("messages_per_month", self.messages_per_month),
            ("voice_minutes_per_month", self.voice_minutes_per_month),
            ("max_call_duration_minutes", self.max_call_duration_minutes),
            ("concurrent_calls", self.concurrent_calls),
        ]
        .into_iter()
        .find(|(_, v)| *v < 0)
    }
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            numbers: default_numbers_limit(),
            messages_per_month: default_messages_per_month(),
            voice_minutes_per_month: default_voice_minutes_per_month(),
            max_call_duration_minutes: default_max_call_duration_minutes(),
            concurrent_calls: default_concurrent_calls(),
        }
    }
}

/// A config that cannot be used: the file, and what is wrong with which key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config file {path}: {source}")]
    Tariff { path: PathBuf, source: TariffError },
}

impl Config {
    /// The shipped `config/tallyd.toml`, built into the binary, with `TALLYD_*`
    /// overrides: what `tallyd demo` runs on outside a checkout.
    pub fn shipped() -> Result<(Config, Tariff), ConfigError> {
        Self::from_toml(
            SHIPPED,
            Path::new("(built-in) config/tallyd.toml"),
            std::env::vars(),
        )
    }

    /// Reads the file, applies `TALLYD_SECTION__KEY` overrides from the process
    /// environment, and checks the tariff.
    pub fn load(path: &Path) -> Result<(Config, Tariff), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text, path, std::env::vars())
    }

    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Tariff), ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.into(),
            message,
        };
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        for (var, value) in env {
            // Only TALLYD_SECTION__KEY is an override; other TALLYD_* variables
            // (test and bench knobs) are not config.
            let Some(rest) = var.strip_prefix("TALLYD_").filter(|r| r.contains("__")) else {
                continue;
            };
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
                return Err(ConfigError::Env {
                    var,
                    message: "expected TALLYD_SECTION__KEY".into(),
                });
            }
            set_path(&mut doc, &keys, parse_env_value(&value))
                .map_err(|message| ConfigError::Env { var, message })?;
        }
        let cfg: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        if !(1..=64).contains(&cfg.flush.parallel_writers) {
            return Err(parse_err(format!(
                "flush.parallel_writers = {}: must be 1 to 64 connections",
                cfg.flush.parallel_writers
            )));
        }
        for (key, v) in [
            ("http.max_connections", cfg.http.max_connections as u64),
            (
                "http.header_read_timeout_secs",
                cfg.http.header_read_timeout_secs,
            ),
            ("http.request_timeout_secs", cfg.http.request_timeout_secs),
            (
                "api.auth_failures_per_minute",
                u64::from(cfg.api.auth_failures_per_minute),
            ),
        ] {
            if v == 0 {
                return Err(parse_err(format!("{key} = 0: must be at least 1")));
            }
        }
        if !(1..=64).contains(&cfg.kafka.consumers) {
            return Err(parse_err(format!(
                "kafka.consumers = {}: must be 1 to 64 consumers",
                cfg.kafka.consumers
            )));
        }
        check_values(&cfg).map_err(parse_err)?;
        let tariff = Tariff::compile(&cfg.rating).map_err(|source| ConfigError::Tariff {
            path: path.into(),
            source,
        })?;
        let _checked = cfg
            .wallet
            .starting_credits(&std::sync::Arc::new(tariff.clone()))
            .map_err(parse_err)?;
        cfg.wallet.low_balance().map_err(parse_err)?;
        Ok((cfg, tariff))
    }
}

/// Checks what can be checked without connecting to anything, so that
/// `tallyd check-config` and the start of `tallyd run` reject the same files:
/// each error names the key, the value and what it must be.
fn check_values(cfg: &Config) -> Result<(), String> {
    let url = &cfg.store.url;
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(format!(
                "store.url = {url:?}: sqlite:// needs a file path, e.g. sqlite://data/tallyd.db"
            ));
        }
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        if let Err(e) = url.parse::<postgres::Config>() {
            return Err(format!(
                "store.url = {:?}: not a PostgreSQL URL: {e}",
                crate::store::redact_url(url)
            ));
        }
    } else {
        return Err(format!(
            "store.url = {:?}: must be sqlite://PATH or postgres://USER@HOST:PORT/DB",
            crate::store::redact_url(url)
        ));
    }
    check_host_port("http.listen", &cfg.http.listen, true)?;
    let advertised = cfg.http.advertised();
    match url::Url::parse(&advertised) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
        _ => {
            return Err(format!(
                "http.advertise_url = {:?}: must be an http:// or https:// base URL such as http://10.0.0.5:8080",
                cfg.http.advertise_url
            ))
        }
    }
    if cfg.http.forward_timeout_secs == 0 {
        return Err("http.forward_timeout_secs = 0: must be at least 1".into());
    }
    let brokers: Vec<&str> = cfg.kafka.brokers.split(',').map(str::trim).collect();
    if brokers.iter().any(|b| b.is_empty()) {
        return Err(format!(
            "kafka.brokers = {:?}: expected comma-separated HOST:PORT entries",
            cfg.kafka.brokers
        ));
    }
    for b in brokers {
        // librdkafka defaults the port; a scheme (PLAINTEXT://, SSL://) may precede the host.
        let hostport = b.rsplit_once("://").map_or(b, |(_, hp)| hp);
        check_host_port("kafka.brokers", hostport, false)?;
    }
    for (key, v) in [
        ("kafka.topic", &cfg.kafka.topic),
        ("kafka.group_id", &cfg.kafka.group_id),
        ("kafka.dead_letter_topic", &cfg.kafka.dead_letter_topic),
    ] {
        if v.trim().is_empty() {
            return Err(format!("{key} is empty"));
        }
    }
    if cfg.kafka.dead_letter_topic == cfg.kafka.topic {
        return Err(format!(
            "kafka.dead_letter_topic = {:?}: must differ from kafka.topic, or rejected CDRs would be consumed again",
            cfg.kafka.dead_letter_topic
        ));
    }
    let share = cfg.flush.max_busy_share;
    if !(0.01..=1.0).contains(&share) {
        return Err(format!("flush.max_busy_share = {share}: must be 0.01 to 1"));
    }
    if cfg.api.pool_size == 0 {
        return Err("api.pool_size = 0: the API needs at least 1 store connection".into());
    }
    crate::api::accounts::validate_config(&cfg.api.accounts).map_err(|e| e.to_string())
}

/// `HOST:PORT` (a bracketed IPv6 host allowed); the port may be left out where
/// `port_required` is false.
fn check_host_port(key: &str, value: &str, port_required: bool) -> Result<(), String> {
    let bad = |why: &str| format!("{key} = {value:?}: {why}");
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("no ] closing the IPv6 address"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(bad("expected [IPV6]:PORT")),
        }
    } else {
        match value.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(bad("an IPv6 address goes in brackets: [IPV6]:PORT"))
            }
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host; expected HOST:PORT, e.g. 0.0.0.0:8080"));
    }
    match port {
        Some(p) if p.parse::<u16>().is_err() => {
            Err(bad(&format!("port {p:?} is not a number from 0 to 65535")))
        }
        None if port_required => Err(bad("no port; expected HOST:PORT, e.g. 0.0.0.0:8080")),
        _ => Ok(()),
    }
}

/// An environment value is read as a TOML value when it parses as one (numbers,
/// booleans), otherwise as a plain string.
fn parse_env_value(s: &str) -> toml::Value {
    match format!("v = {s}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(s.into())),
        Err(_) => toml::Value::String(s.into()),
    }
}

fn set_path(doc: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().expect("at least two keys");
    let mut table = doc;
    for k in parents {
        let entry = table
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{k}` is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[rating]\ndefault_plan = \"p\"\n[rating.plans.p]\ncurrency = \"usd\"\n[rating.plans.p.rates.calls]\nper_minute = \"0.05\"\n";

    #[test]
    fn the_advertised_url_is_given_or_made_from_the_listen_address() {
        let mut h = HttpConfig {
            listen: "0.0.0.0:8080".into(),
            ..HttpConfig::default()
        };
        assert_eq!(h.advertised(), "http://127.0.0.1:8080");
        assert_eq!(h.advertised_at("0.0.0.0:41234"), "http://127.0.0.1:41234");
        h.listen = "[::]:8081".into();
        assert_eq!(h.advertised(), "http://[::1]:8081");
        h.listen = "10.1.2.3:8080".into();
        assert_eq!(h.advertised(), "http://10.1.2.3:8080");
        h.advertise_url = "https://tallyd-0.tallyd:8443/".into();
        assert_eq!(h.advertised(), "https://tallyd-0.tallyd:8443");
    }

    #[test]
    fn shipped_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (cfg, tariff) = Config::from_toml(&text, &path, []).unwrap();
        assert_eq!(cfg.kafka.topic, "cdrs");
        assert!(tariff.plans().len() >= 2);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let text = format!(
            "{MIN}[store]\nurl = \"postgres://tallyd:hunter2@db:5432/t?sslmode=require&password=hunter3\"\n\
             [api]\nadmin_token = \"admin-hunter4\"\n[[api.accounts]]\nsid = \"AC00000000000000000000000000000a01\"\n\
             auth_token = \"token-hunter5\"\napi_keys = [\"key-hunter6\"]\n"
        );
        let (cfg, _) = Config::from_toml(&text, Path::new("x.toml"), []).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("postgres://tallyd:***@db:5432/t"), "{shown}");
        assert_eq!(cfg.api.accounts[0].auth_token.expose(), "token-hunter5");
    }

    #[test]
    fn urls_are_redacted() {
        for (url, want) in [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&password=pw&x=1",
                "postgres://h/db?user=u&password=***&x=1",
            ),
            (
                "postgres://h/db?application_password=x",
                "postgres://h/db?application_password=x",
            ),
            ("sqlite://data/tallyd.db", "sqlite://data/tallyd.db"),
            ("host=h password=pw user=u", "host=h password=*** user=u"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn env_overrides_and_unknown_keys() {
        let env = [
            ("TALLYD_KAFKA__TOPIC".to_string(), "other".to_string()),
            ("TALLYD_FLUSH__INTERVAL_MS".to_string(), "250".to_string()),
            (
                "TALLYD_TEST_POSTGRES_URL".to_string(),
                "not config".to_string(),
            ),
        ];
        let (cfg, _) = Config::from_toml(MIN, Path::new("x.toml"), env).unwrap();
        assert_eq!(cfg.kafka.topic, "other");
        assert_eq!(cfg.flush.interval_ms, 250);
        let typo = [("TALLYD_KAFKA__BROKRS".to_string(), "x".to_string())];
        let e = Config::from_toml(MIN, Path::new("x.toml"), typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokrs"), "{e}");

        let bad = format!("{MIN}[flush]\nintervall_ms = 3\n");
        let e = Config::from_toml(&bad, Path::new("x.toml"), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("intervall_ms") && e.contains("x.toml"), "{e}");

        let zero = [(
            "TALLYD_FLUSH__PARALLEL_WRITERS".to_string(),
            "0".to_string(),
        )];
        let e = Config::from_toml(MIN, Path::new("x.toml"), zero)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.toml") && e.contains("flush.parallel_writers = 0"),
            "{e}"
        );

        let none = [("TALLYD_KAFKA__CONSUMERS".to_string(), "0".to_string())];
        let e = Config::from_toml(MIN, Path::new("x.toml"), none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.consumers = 0"), "{e}");

        for (var, value, says) in [
            (
                "TALLYD_STORE__URL",
                "mysql://u:secret@h/db",
                "store.url = \"mysql://u:***@h/db\": must be sqlite://PATH or postgres://",
            ),
            (
                "TALLYD_STORE__URL",
                "sqlite://",
                "sqlite:// needs a file path",
            ),
            (
                "TALLYD_STORE__URL",
                "postgres://u:secret@h:notaport/db",
                "store.url = \"postgres://u:***@h:notaport/db\": not a PostgreSQL URL",
            ),
            (
                "TALLYD_HTTP__LISTEN",
                "localhost",
                "http.listen = \"localhost\": no port",
            ),
            ("TALLYD_HTTP__LISTEN", "0.0.0.0:80800", "port \"80800\""),
            ("TALLYD_HTTP__LISTEN", "::1:8080", "in brackets"),
            ("TALLYD_HTTP__LISTEN", "[::1", "no ]"),
            ("TALLYD_HTTP__LISTEN", "[::1]8080", "[IPV6]:PORT"),
            ("TALLYD_HTTP__LISTEN", ":8080", "no host"),
            (
                "TALLYD_KAFKA__BROKERS",
                "a:9092,,b:9092",
                "kafka.brokers = \"a:9092,,b:9092\"",
            ),
            (
                "TALLYD_KAFKA__BROKERS",
                "a:x",
                "kafka.brokers = \"a:x\": port \"x\"",
            ),
            (
                "TALLYD_KAFKA__DEAD_LETTER_TOPIC",
                "cdrs",
                "must differ from kafka.topic",
            ),
            ("TALLYD_KAFKA__GROUP_ID", " ", "kafka.group_id is empty"),
            (
                "TALLYD_FLUSH__MAX_BUSY_SHARE",
                "0",
                "flush.max_busy_share = 0: must be 0.01 to 1",
            ),
            ("TALLYD_API__POOL_SIZE", "0", "api.pool_size = 0"),
            (
                "TALLYD_HTTP__ADVERTISE_URL",
                "10.0.0.5:8080",
                "http.advertise_url = \"10.0.0.5:8080\": must be an http:// or https:// base URL",
            ),
            (
                "TALLYD_HTTP__FORWARD_TIMEOUT_SECS",
                "0",
                "http.forward_timeout_secs = 0",
            ),
            ("TALLYD_KAFKA__PARTITIONER", "murmur3", "murmur2_random"),
        ] {
            let e = Config::from_toml(MIN, Path::new("x.toml"), [(var.into(), value.into())])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("x.toml") && e.contains(says),
                "{var}={value}: {e}"
            );
            assert!(!e.contains("secret"), "{e}");
        }
        for (var, value) in [
            (
                "TALLYD_STORE__URL",
                "postgresql://u:pw@127.0.0.1:5432/test?options=-csearch_path%3Dx",
            ),
            ("TALLYD_HTTP__LISTEN", "[::]:8080"),
            ("TALLYD_HTTP__LISTEN", "localhost:0"),
            (
                "TALLYD_KAFKA__BROKERS",
                "SSL://k1.example:9093, k2.example, [::1]:9092",
            ),
        ] {
            Config::from_toml(MIN, Path::new("x.toml"), [(var.into(), value.into())])
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
        let dup = format!("{MIN}[[api.accounts]]\nsid = \"AC0\"\nauth_token = \"t\"\n");
        let e = Config::from_toml(&dup, Path::new("x.toml"), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("api.accounts[0].sid"), "{e}");

        let bad = MIN.replace("0.05", "-0.05");
        let e = Config::from_toml(&bad, Path::new("t.toml"), [])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml")
                && e.contains("rating.plans.p.rates.calls.per_minute")
                && e.contains("negative"),
            "{e}"
        );
    }
}
