//! The HTTP usage APIs, served from the store:
//!
//! - [`twilio`]: Twilio Usage Records (`/2010-04-01/Accounts/{Sid}/Usage/Records…`),
//!   HTTP Basic `AccountSid:AuthToken`, computed by [`records`].
//! - [`triggers`]: Twilio Usage Triggers (`…/Usage/Triggers…`), the same auth,
//!   kept in step with the trigger book the flusher evaluates.
//! - [`agentphone`]: AgentPhone `/v1/usage…`, Bearer API key.
//! - [`admin`]: accounts, subaccounts and API keys, Bearer admin token;
//!   [`webhooks`]: an account's wallet-event webhook, same token.
//! - [`accounts`]: the account model and its tables. Handlers read through the
//!   pooled connections of the one store layer ([`crate::store::Store::run`]).
//! - `GET /openapi.yaml`: the OpenAPI 3 document of all of the above.
//!
//! The daemon mounts [`router`] next to `/metrics`, `/healthz` and `/readyz`.

pub mod accounts;
pub mod admin;
pub mod agentphone;
pub mod auth;
pub mod error;
pub mod forward;
pub mod records;
pub mod triggers;
pub mod twilio;
pub mod twilio_categories;
pub mod wallet;
pub mod webhooks;

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::calendar::Day;
use crate::cdr::AccountSid;
use crate::config::{Config, PlanLimits};
use crate::rating::Tariff;
use crate::store::{Error as StoreError, Store};

/// The OpenAPI 3 document, kept in the repository as `openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// Why the API could not start: which config key or store problem.
#[derive(Debug, thiserror::Error)]
pub enum ApiInitError {
    #[error(transparent)]
    Account(#[from] accounts::AccountConfigError),
    #[error("store.url: {0}")]
    Store(#[from] StoreError),
    #[error("api.accounts[{index}].parent_sid: {parent} is neither in [[api.accounts]] nor in the store")]
    UnknownParent { index: usize, parent: String },
    #[error("{0}")]
    Wallet(String),
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Shared>,
}

struct Shared {
    store: Store,
    tariff: Tariff,
    admin_token: Option<String>,
    default_limits: PlanLimits,
    /// The instance's wallets and holds, shared with the consumers.
    wallets: Arc<crate::wallet::Wallets>,
    /// `wallet.hold_grace_seconds`.
    hold_grace: i64,
    /// Set once the stored wallets are loaded; until then the wallet
    /// endpoints answer 503 (a decision on a wallet not yet loaded would use
    /// the starting credit instead of the balance).
    wallets_loaded: Arc<std::sync::atomic::AtomicBool>,
    throttle: Arc<auth::AuthThrottle>,
    /// Accounts of API keys recently authenticated (the wallet endpoints').
    key_cache: Arc<auth::KeyCache>,
    /// Usage triggers in memory, shared with the flusher that evaluates them.
    triggers: crate::triggers::TriggerBook,
    /// The group commit of granted holds, started on the first hold.
    hold_commits: Arc<std::sync::OnceLock<crate::wallet::commit::HoldCommits>>,
    /// Which callback URLs are accepted.
    url_policy: crate::webhooks::url::UrlPolicy,
    /// A fixed clock (Unix seconds) for tests; `None` reads the system clock.
    now: Option<i64>,
    /// Which wallets this instance answers for; the others are forwarded.
    ownership: Arc<crate::wallet::owners::Ownership>,
    /// Forwards wallet requests to their owner (`http.forward_timeout_secs`).
    forwarder: forward::Forwarder,
}

impl ApiState {
    /// The API's state over `store`, with the accounts of `[[api.accounts]]`
    /// checked but not yet written (no I/O: the store may still be down; see
    /// [`ApiState::seed`]).
    pub fn new(cfg: &Config, tariff: &Tariff, store: Store) -> Result<ApiState, ApiInitError> {
        accounts::validate_config(&cfg.api.accounts)?;
        let starting = cfg
            .wallet
            .starting_credits(&Arc::new(tariff.clone()))
            .map_err(ApiInitError::Wallet)?;
        Ok(ApiState {
            inner: Arc::new(Shared {
                store,
                tariff: tariff.clone(),
                admin_token: cfg
                    .api
                    .admin_token
                    .as_ref()
                    .map(|t| t.expose().to_owned())
                    .filter(|t| !t.is_empty()),
                default_limits: cfg.api.default_limits,
                throttle: Arc::new(auth::AuthThrottle::new(cfg.api.auth_failures_per_minute)),
                key_cache: Default::default(),
                wallets: Arc::new(
                    crate::wallet::Wallets::new(starting)
                        .with_low_balance(cfg.wallet.low_balance().map_err(ApiInitError::Wallet)?),
                ),
                hold_grace: cfg.wallet.hold_grace_seconds.into(),
                wallets_loaded: Default::default(),
                triggers: crate::triggers::TriggerBook::new(),
                hold_commits: Default::default(),
                url_policy: cfg.webhooks.url_policy(),
                now: None,
                ownership: Arc::new(crate::wallet::owners::Ownership::lone()),
                forwarder: forward::Forwarder::new(std::time::Duration::from_secs(
                    cfg.http.forward_timeout_secs.max(1),
                )),
            }),
        })
    }

    /// [`ApiState::new`] then [`ApiState::seed`], for tools and tests.
    pub fn seeded(cfg: &Config, tariff: &Tariff, store: Store) -> Result<ApiState, ApiInitError> {
        let state = ApiState::new(cfg, tariff, store)?;
        state.seed(cfg)?;
        state.load_wallets()?;
        Ok(state)
    }

    /// Writes the accounts of `[[api.accounts]]` into the (migrated) store.
    /// Blocking.
    pub fn seed(&self, cfg: &Config) -> Result<(), ApiInitError> {
        let store = self.store();
        store.with_conn(|c| {
            accounts::seed_from_config(c, &cfg.api.accounts, cfg.api.default_limits)
        })?;
        for (index, a) in cfg.api.accounts.iter().enumerate() {
            if let Some(parent) = &a.parent_sid {
                if store.with_conn(|c| accounts::get(c, parent))?.is_none() {
                    return Err(ApiInitError::UnknownParent {
                        index,
                        parent: parent.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The same state with the clock fixed at `unix_seconds` (for tests).
    pub fn with_fixed_clock(self, unix_seconds: i64) -> ApiState {
        self.rebuilt(Some(unix_seconds), None)
    }

    /// The same state answering only for the wallets `ownership` says this
    /// instance owns, forwarding the others (the daemon's, with several
    /// instances in mind).
    pub fn with_ownership(self, ownership: Arc<crate::wallet::owners::Ownership>) -> ApiState {
        let now = self.inner.now;
        self.rebuilt(now, Some(ownership))
    }

    fn rebuilt(
        self,
        now: Option<i64>,
        ownership: Option<Arc<crate::wallet::owners::Ownership>>,
    ) -> ApiState {
        let s = &self.inner;
        ApiState {
            inner: Arc::new(Shared {
                store: s.store.clone(),
                tariff: s.tariff.clone(),
                admin_token: s.admin_token.clone(),
                default_limits: s.default_limits,
                wallets: s.wallets.clone(),
                hold_grace: s.hold_grace,
                wallets_loaded: s.wallets_loaded.clone(),
                throttle: s.throttle.clone(),
                key_cache: s.key_cache.clone(),
                triggers: s.triggers.clone(),
                hold_commits: s.hold_commits.clone(),
                url_policy: s.url_policy,
                now,
                ownership: ownership.unwrap_or_else(|| s.ownership.clone()),
                forwarder: s.forwarder.clone(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Which wallets this instance answers for.
    pub fn ownership(&self) -> &Arc<crate::wallet::owners::Ownership> {
        &self.inner.ownership
    }

    /// The instance's wallets: the consumers debit them, the wallet handlers
    /// grant holds from them.
    pub fn wallets(&self) -> &Arc<crate::wallet::Wallets> {
        &self.inner.wallets
    }

    /// Loads every stored balance and reserved hold into [`ApiState::wallets`]
    /// (at start, before consuming). Blocking.
    pub fn load_wallets(&self) -> Result<usize, StoreError> {
        let n = wallet::load(self)?;
        self.inner
            .wallets_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(n)
    }

    pub fn now(&self) -> i64 {
        self.inner
            .now
            .unwrap_or_else(|| chrono::Utc::now().timestamp())
    }

    pub fn today(&self) -> Day {
        Day::from_unix(self.now())
    }

    /// The usage triggers the flusher evaluates (the API keeps it in step
    /// with the store).
    pub fn triggers(&self) -> &crate::triggers::TriggerBook {
        &self.inner.triggers
    }

    /// Where granted holds are stored (one writer, many holds per
    /// transaction); started on the runtime of the first request that needs it.
    pub fn hold_commits(&self) -> &crate::wallet::commit::HoldCommits {
        self.inner
            .hold_commits
            .get_or_init(|| crate::wallet::commit::HoldCommits::start(self.inner.store.clone()))
    }

    pub fn url_policy(&self) -> crate::webhooks::url::UrlPolicy {
        self.inner.url_policy
    }

    /// Failed authentications per client address.
    pub fn throttle(&self) -> &auth::AuthThrottle {
        &self.inner.throttle
    }

    pub fn key_cache(&self) -> &auth::KeyCache {
        &self.inner.key_cache
    }

    fn admin_token(&self) -> Option<&str> {
        self.inner.admin_token.as_deref()
    }

    fn default_limits(&self) -> PlanLimits {
        self.inner.default_limits
    }

    /// The account's currency under its rating plan (for records with no rows).
    pub fn currency_of(&self, sid: &str) -> String {
        match AccountSid::parse(sid) {
            Some(a) => self.inner.tariff.plan_for(a).currency.clone(),
            None => "usd".into(),
        }
    }

    /// The name of the account's rating plan (the default AgentPhone plan name).
    pub fn rating_plan_name(&self, sid: &str) -> String {
        match AccountSid::parse(sid) {
            Some(a) => self.inner.tariff.plan_for(a).name.clone(),
            None => String::new(),
        }
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

/// All API routes. Mount it in the daemon's HTTP server.
pub fn router(state: ApiState) -> Router {
    let twilio_records = "/2010-04-01/Accounts/:sid/Usage/Records";
    let twilio_triggers = "/2010-04-01/Accounts/:sid/Usage/Triggers";
    Router::new()
        .route(twilio_records, get(twilio::records_root))
        .route(&format!("{twilio_records}.json"), get(twilio::records_root))
        .route(&format!("{twilio_records}/:sub"), get(twilio::records_sub))
        .route(twilio_triggers, get(triggers::list).post(triggers::create))
        .route(
            &format!("{twilio_triggers}.json"),
            get(triggers::list).post(triggers::create),
        )
        .route(
            &format!("{twilio_triggers}/:trigger"),
            get(triggers::fetch)
                .post(triggers::update)
                .delete(triggers::delete),
        )
        .route("/2010-04-01/*rest", get(twilio::not_found))
        .route("/v1/usage", get(agentphone::usage))
        .route("/v1/usage/daily", get(agentphone::daily))
        .route("/v1/usage/monthly", get(agentphone::monthly))
        .route("/v1/usage/by-number", get(agentphone::by_number))
        .route("/v1/usage/by-agent", get(agentphone::by_agent))
        .route(
            "/admin/accounts",
            get(admin::list_accounts).post(admin::create_account),
        )
        .route(
            "/admin/accounts/:sid",
            get(admin::get_account)
                .patch(admin::update_account)
                .delete(admin::delete_account),
        )
        .route(
            "/admin/accounts/:sid/api-keys",
            get(admin::list_api_keys).post(admin::create_api_key),
        )
        .route(
            "/admin/accounts/:sid/api-keys/:key_id",
            axum::routing::delete(admin::delete_api_key),
        )
        .route("/v1/holds", axum::routing::post(wallet::create_hold))
        .route(
            "/v1/holds/:call_id",
            axum::routing::delete(wallet::release_hold),
        )
        .route("/v1/calls/:call_id/billing", get(wallet::call_billing))
        .route("/v1/wallet", get(wallet::wallet))
        .route(
            "/admin/accounts/:sid/credits",
            axum::routing::post(wallet::create_credit),
        )
        .route(
            "/admin/accounts/:sid/auto-recharge",
            axum::routing::put(wallet::set_auto_recharge),
        )
        .route("/admin/wallet-events", get(wallet::list_events))
        .route(
            "/admin/accounts/:sid/webhook",
            get(webhooks::get_webhook)
                .put(webhooks::set_webhook)
                .delete(webhooks::delete_webhook),
        )
        .route("/openapi.yaml", get(openapi))
        .with_state(state)
}

/// Why a text is not a [`plain_decimal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotPlain {
    /// Not digits with at most one point between digits.
    Shape,
    /// More digits than a `Decimal` holds exactly.
    Inexact,
}

/// A decimal as the APIs take one (trigger values, money): ASCII digits with
/// at most one point, digits on both sides of it; no sign, exponent,
/// separator or space (`1e3` parses as a `Decimal`, and would mean 1000).
/// Parsed exactly: more digits than a `Decimal` holds are refused, not
/// rounded to another number.
pub fn plain_decimal(s: &str) -> Result<rust_decimal::Decimal, NotPlain> {
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return Err(NotPlain::Shape);
    }
    rust_decimal::Decimal::from_str_exact(s).map_err(|_| NotPlain::Inexact)
}
