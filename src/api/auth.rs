//! Credentials as the APIs read them, and the throttle on failed attempts.
//!
//! - [`basic`]: `Authorization: Basic` (Twilio's `AccountSid:AuthToken`);
//! - [`bearer`]: `Authorization: Bearer <token>` (AgentPhone API keys and the
//!   admin token): one parser for both, the scheme case-insensitive as HTTP
//!   says, the token visible ASCII.
//! - [`AuthThrottle`]: failed attempts per client address are limited to
//!   `api.auth_failures_per_minute` (a burst of as many, refilled evenly). A
//!   client over it is answered 429 with `Retry-After` — before its credentials
//!   are looked at, so throttled guesses learn nothing — until the quota lets it
//!   try again. IPv6 clients are counted per /64 (one host usually owns one).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap};
use base64::Engine;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The value of an `Authorization` header with the given scheme (compared
/// without case), its credentials trimmed; `None` for another scheme or none.
fn credentials<'h>(headers: &'h HeaderMap, scheme: &str) -> Option<&'h str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (given, rest) = value.trim_start().split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| rest.trim_matches(' '))
        .filter(|c| !c.is_empty())
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    credentials(headers, "Bearer").filter(|t| t.bytes().all(|b| b.is_ascii_graphic()))
}

/// The user and password of `Authorization: Basic <base64>`.
pub fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let b64 = credentials(headers, "Basic")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// The address a request came from, as the throttle counts it.
pub fn client_of(peer: Option<ConnectInfo<SocketAddr>>) -> IpAddr {
    match peer.map(|ConnectInfo(a)| a.ip()) {
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        Some(v4) => v4,
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    }
}

/// Failed authentications per client address.
pub struct AuthThrottle {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Clients over the quota, until when.
    blocked: DashMap<IpAddr, Instant>,
    failures: AtomicU64,
}

impl AuthThrottle {
    pub fn new(per_minute: u32) -> AuthThrottle {
        let n = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
        AuthThrottle {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            blocked: DashMap::new(),
            failures: AtomicU64::new(0),
        }
    }

    /// Before credentials are checked: how long the client must wait, if it is
    /// over its quota of failures.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        match self.blocked.get(&client).map(|until| *until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// After a failed attempt of `api`: counts it; `Err(wait)` when this failure
    /// was one too many (the client is then blocked for `wait`).
    pub fn failed(&self, client: IpAddr, api: &'static str) -> Result<(), Duration> {
        metrics::counter!(crate::metrics::HTTP_AUTH_FAILURES_TOTAL, "api" => api).increment(1);
        if self.failures.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            // Forget clients whose quota is full again and blocks that ended.
            self.limiter.retain_recent();
            let now = Instant::now();
            self.blocked.retain(|_, until| *until > now);
        }
        match self.limiter.check_key(&client) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until
                    .wait_time_from(DefaultClock::default().now())
                    .max(Duration::from_millis(1));
                self.blocked.insert(client, Instant::now() + wait);
                Err(wait)
            }
        }
    }

    /// Counts a request refused because its client was blocked.
    pub fn throttled(api: &'static str) {
        metrics::counter!(crate::metrics::HTTP_AUTH_THROTTLED_TOTAL, "api" => api).increment(1);
    }
}

/// How long an API key's account is answered from memory ([`KeyCache`]).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// The accounts of API keys recently authenticated, by key hash, so the
/// wallet endpoints (a hold and its release are two requests per call) do not
/// read the store for every request. This instance's admin API empties it on
/// every account or key change, so here a revoked key or new limits apply at
/// once; a change made through another instance applies here within
/// [`KEY_CACHE_TTL`].
#[derive(Default)]
pub struct KeyCache {
    /// Shared, not copied out per request (an account is seven strings).
    accounts: DashMap<String, (Arc<crate::api::accounts::Account>, Instant)>,
    /// Moved by every [`KeyCache::clear`]: an account read from the store
    /// before a clear is not put in after it.
    generation: std::sync::atomic::AtomicU64,
}

impl KeyCache {
    /// Taken before the store is read for an account that may be put in.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The account of the key with this hash, if authenticated less than
    /// [`KEY_CACHE_TTL`] ago.
    pub fn get(&self, hash: &str) -> Option<Arc<crate::api::accounts::Account>> {
        let hit = self.accounts.get(hash)?;
        (hit.1.elapsed() < KEY_CACHE_TTL).then(|| hit.0.clone())
    }

    /// Remembers `account` for its key, unless the cache was cleared since
    /// `seen` ([`KeyCache::generation`], taken before the account was read):
    /// a key deleted while its request read the store is not remembered.
    pub fn put(&self, hash: String, account: Arc<crate::api::accounts::Account>, seen: u64) {
        if self.generation() != seen {
            return;
        }
        self.accounts
            .insert(hash.clone(), (account, Instant::now()));
        // A clear between the check and the insert: take it out again (the
        // clear bumps the generation before it empties the map).
        if self.generation() != seen {
            self.accounts.remove(&hash);
        }
    }

    /// Forgets every key (an account or key changed).
    pub fn clear(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.accounts.clear();
    }
}

/// Whole seconds for `Retry-After`, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    /// A key deleted while its request read the store is not remembered:
    /// the clear that follows the deletion comes between the read and the put.
    #[test]
    fn an_account_read_before_a_clear_is_not_cached() {
        let account = Arc::new(crate::api::accounts::Account {
            sid: "AC00000000000000000000000000000001".into(),
            auth_token: crate::config::Secret::new("t"),
            parent_sid: None,
            friendly_name: "a".into(),
            plan: None,
            limits: crate::config::PlanLimits::default(),
            created_at: String::new(),
            updated_at: String::new(),
        });
        let cache = KeyCache::default();
        let seen = cache.generation();
        cache.clear();
        cache.put("h".into(), account.clone(), seen);
        assert!(cache.get("h").is_none());
        let seen = cache.generation();
        cache.put("h".into(), account.clone(), seen);
        assert_eq!(
            cache.get("h").map(|a| a.sid.clone()),
            Some(account.sid.clone())
        );
    }

    #[test]
    fn one_bearer_parser() {
        assert_eq!(bearer(&auth("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&auth("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&auth("BEARER abc")), Some("abc"));
        assert_eq!(bearer(&auth("Bearer")), None);
        assert_eq!(bearer(&auth("Bearer ")), None);
        assert_eq!(bearer(&auth("Bearer a b")), None);
        assert_eq!(bearer(&auth("Basic abc")), None);
        assert_eq!(bearer(&auth("Bearerabc")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn basic_is_decoded() {
        assert_eq!(
            basic(&auth("Basic QUNhYmM6dG9rZW4=")),
            Some(("ACabc".to_owned(), "token".to_owned()))
        );
        assert_eq!(
            basic(&auth("basic QUNhYmM6dG9rZW4=")),
            Some(("ACabc".to_owned(), "token".to_owned()))
        );
        assert_eq!(basic(&auth("Basic !!!")), None);
        assert_eq!(basic(&auth("Bearer QUNhYmM6dG9rZW4=")), None);
    }

    #[test]
    fn failures_past_the_quota_block_the_client_only() {
        let t = AuthThrottle::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(t.check(a).is_ok());
            assert!(t.failed(a, "test").is_ok());
        }
        let wait = t.failed(a, "test").unwrap_err();
        assert!(wait > Duration::from_secs(10) && wait <= Duration::from_secs(20));
        assert!(t.check(a).is_err());
        assert!(t.check(b).is_ok());
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let p = |s: &str| Some(ConnectInfo(s.parse::<SocketAddr>().unwrap()));
        assert_eq!(
            client_of(p("[2001:db8:1:2:aaaa::1]:5")),
            client_of(p("[2001:db8:1:2:bbbb::9]:6"))
        );
        assert_ne!(
            client_of(p("[2001:db8:1:2::1]:5")),
            client_of(p("[2001:db8:1:3::1]:5"))
        );
        assert_eq!(
            client_of(p("[::ffff:10.0.0.1]:5")),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
