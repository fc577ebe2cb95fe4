//! The webhook dispatcher against real receivers (axum servers on loopback)
//! and a real store (SQLite and PostgreSQL): Twilio-signed trigger callbacks
//! checked by the official Twilio Python helper library, HMAC-signed wallet
//! events, retries until a receiver comes up, giving up after the retry
//! window (counted in the metrics and the AgentPhone statistics), a restart
//! that takes over a dead instance's claim, a hanging receiver that holds up
//! only its own account, internal addresses refused at send.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use parking_lot::Mutex;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use tallyd::api::ApiState;
use tallyd::config::Config;
use tallyd::rating::Tariff;
use tallyd::store::outbox::{OutboxRow, OutboxState, KIND_USAGE_TRIGGER};
use tallyd::store::Store;
use tallyd::webhooks::{Dispatcher, DispatcherHandle};

use common::*;

// --- Receivers -------------------------------------------------------------------

/// A request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    at_ms: i64,
    method: String,
    /// Path and query as sent.
    target: String,
    headers: HashMap<String, String>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map_or("", String::as_str)
    }
}

#[derive(Clone, Default)]
struct Log {
    got: Arc<Mutex<Vec<Received>>>,
    /// The status `/ok` answers (200 unless changed).
    status: Arc<AtomicU16>,
}

impl Log {
    fn new() -> Log {
        let log = Log::default();
        log.status.store(200, Ordering::Relaxed);
        log
    }
    fn got(&self) -> Vec<Received> {
        self.got.lock().clone()
    }
    fn on(&self, path: &str) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(|r| r.target.starts_with(path))
            .collect()
    }
}

/// Records every request; `/hang…` never answers, anything else answers the
/// configured status.
async fn receive(
    State(log): State<Log>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let r = Received {
        at_ms: now_ms(),
        method: method.to_string(),
        target: uri
            .path_and_query()
            .map_or(uri.path().to_owned(), |p| p.to_string()),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body,
    };
    let hang = r.target.starts_with("/hang");
    log.got.lock().push(r);
    if hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    StatusCode::from_u16(log.status.load(Ordering::Relaxed)).unwrap()
}

/// Serves a receiver on `listener` (in the current runtime).
fn serve_receiver(listener: tokio::net::TcpListener, log: Log) {
    let app = axum::Router::new().fallback(receive).with_state(log);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
}

async fn receiver() -> (u16, Log) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Log::new();
    serve_receiver(listener, log.clone());
    (port, log)
}

/// A port nothing listens on, below the ephemeral range (no outgoing
/// connection takes it meanwhile), for a receiver that comes up later.
fn dead_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    for _ in 0..1000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 10_000..low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}")
}

// --- Set-up ------------------------------------------------------------------------

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The test accounts' config, callbacks to loopback allowed, attempts of a
/// second, retried for a minute.
fn test_config(url: &str) -> (Config, Tariff) {
    let (mut cfg, tariff) = config(url);
    cfg.webhooks.allow_loopback = true;
    cfg.webhooks.timeout_ms = 1_000;
    cfg.webhooks.retry_for_secs = 60;
    (cfg, tariff)
}

struct Fixture {
    cfg: Config,
    store: Store,
    state: ApiState,
    rt: tokio::runtime::Runtime,
}

fn fixture(url: &str, tune: impl FnOnce(&mut Config)) -> Fixture {
    let (mut cfg, tariff) = test_config(url);
    tune(&mut cfg);
    let store = Store::open(&cfg.store.url).unwrap();
    let state = ApiState::seeded(&cfg, &tariff, store.clone()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    Fixture {
        cfg,
        store,
        state,
        rt,
    }
}

struct Running {
    handle: DispatcherHandle,
    stop: Arc<AtomicBool>,
}

impl Running {
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().await;
    }
}

fn start(f: &Fixture) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = Dispatcher::start(f.store.clone(), f.cfg.webhooks.clone(), stop.clone()).unwrap();
    Running { handle, stop }
}

/// A usage trigger firing's callback parameters, as Twilio sends them.
fn trigger_params(sid: &str, trigger: &str, token: &str) -> Vec<(String, String)> {
    [
        ("AccountSid", sid.to_owned()),
        ("UsageTriggerSid", trigger.to_owned()),
        ("DateFired", "Mon, 07 Dec 2026 12:00:00 +0000".to_owned()),
        ("Recurring", "daily".to_owned()),
        ("UsageCategory", "calls".to_owned()),
        ("TriggerBy", "usage".to_owned()),
        ("TriggerValue", "10".to_owned()),
        ("CurrentValue", "10.5".to_owned()),
        (
            "UsageRecordUri",
            format!("/2010-04-01/Accounts/{sid}/Usage/Records/Today.json?Category=calls"),
        ),
        ("IdempotencyToken", token.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn trigger_row(id: &str, sid: &str, url: &str, method: &str) -> OutboxRow {
    OutboxRow {
        id: id.to_owned(),
        account_sid: sid.to_owned(),
        kind: KIND_USAGE_TRIGGER.to_owned(),
        source_sid: "UT00000000000000000000000000000001".to_owned(),
        url: url.to_owned(),
        method: method.to_owned(),
        body: serde_urlencoded::to_string(trigger_params(
            sid,
            "UT00000000000000000000000000000001",
            id,
        ))
        .unwrap(),
        created_at: now_ms(),
    }
}

/// Writes `row` to the outbox (from async code: the blocking PostgreSQL
/// client must not run on a runtime thread).
async fn insert(store: &Store, row: &OutboxRow) {
    let row = row.clone();
    assert!(store.run(move |c| c.insert_outbox(&row)).await.unwrap());
}

async fn state_of(store: &Store, id: &str) -> OutboxState {
    let id = id.to_owned();
    store
        .run(move |c| c.outbox_state(&id))
        .await
        .unwrap()
        .expect("the row exists")
}

/// Waits up to `secs` for `ok`; panics with `what` if it never holds.
async fn until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "waited {secs} s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until_status(store: &Store, id: &str, status: &str, secs: u64) -> OutboxState {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = state_of(store, id).await;
        if s.status == status {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "waited {secs} s for {id} to be {status}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the Twilio helper library's `RequestValidator` on a request.
fn twilio_accepts(token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    let params: serde_json::Map<String, Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let args = json!({"token": token, "url": url, "params": params, "signature": signature});
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             from twilio.request_validator import RequestValidator\n\
             a = json.loads(sys.argv[1])\n\
             ok = RequestValidator(a['token']).validate(a['url'], a['params'], a['signature'])\n\
             print('valid' if ok else 'invalid')",
            &args.to_string(),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Twilio helper library did not run (pip install twilio): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match String::from_utf8_lossy(&out.stdout).trim() {
        "valid" => true,
        "invalid" => false,
        other => panic!("unexpected output {other:?}"),
    }
}

/// HMAC-SHA256 of `body` under `secret`, hex, computed by Python's standard
/// library (independently of tallyd's code).
fn python_hmac_sha256(secret: &str, body: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import hashlib, hmac, sys\n\
             print(hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), hashlib.sha256).hexdigest())",
            secret,
            body,
        ])
        .output()
        .expect("python3 runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A sample of the metrics exposition, 0 if absent.
fn metric(line_start: &str) -> f64 {
    tallyd::metrics::install()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn deliveries(outcome: &str) -> f64 {
    metric(&format!(
        "tallyd_webhook_deliveries_total{{outcome=\"{outcome}\"}}"
    ))
}

// --- Tests -------------------------------------------------------------------------

fn trigger_callbacks_are_signed_as_twilio_does(url: &str) {
    let f = fixture(url, |_| {});
    let store = f.store.clone();
    let callbacks_before = tallyd::metrics::TRIGGER_CROSSING_TO_CALLBACK
        .snapshot()
        .count;
    let delivered_before = deliveries("delivered");
    f.rt.block_on(async {
        let (port, log) = receiver().await;
        let running = start(&f);
        // Past the first poll: from here only a wake-up sends at once.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let post = trigger_row(
            "UT1-post-idem",
            PARENT,
            &format!("http://127.0.0.1:{port}/ok/post?x=1"),
            "POST",
        );
        let get = trigger_row(
            "UT1-get-idem",
            PARENT,
            &format!("http://127.0.0.1:{port}/ok/get?x=1"),
            "GET",
        );
        let written = Instant::now();
        insert(&store, &post).await;
        insert(&store, &get).await;
        running.handle.wake();
        until("both callbacks", 10, || log.got().len() == 2).await;
        assert!(
            written.elapsed() < Duration::from_millis(700),
            "a wake-up sends at once, not at the next poll ({:?})",
            written.elapsed()
        );
        let params = trigger_params(
            PARENT,
            "UT00000000000000000000000000000001",
            "UT1-post-idem",
        );

        // POST: the parameters form-encoded in the body, the URL as configured.
        let p = &log.on("/ok/post")[0];
        assert_eq!(p.method, "POST");
        assert_eq!(p.target, "/ok/post?x=1");
        assert_eq!(p.header("I-Twilio-Idempotency-Token"), "UT1-post-idem");
        assert_eq!(
            p.header("Content-Type"),
            "application/x-www-form-urlencoded"
        );
        let got: Vec<(String, String)> = serde_urlencoded::from_str(&p.body).unwrap();
        assert_eq!(got, params);
        let url = format!("http://127.0.0.1:{port}{}", p.target);
        let sig = p.header("X-Twilio-Signature");
        assert!(
            twilio_accepts(PARENT_TOKEN, &url, &got, sig),
            "POST signature refused"
        );
        assert!(!twilio_accepts(OTHER_TOKEN, &url, &got, sig));
        let mut tampered = got.clone();
        tampered[7].1 = "99".into();
        assert!(!twilio_accepts(PARENT_TOKEN, &url, &tampered, sig));

        // GET: the parameters appended to the URL's query, signed with it.
        let g = &log.on("/ok/get")[0];
        assert_eq!(g.method, "GET");
        assert_eq!(g.body, "");
        assert_eq!(g.header("I-Twilio-Idempotency-Token"), "UT1-get-idem");
        let query = g.target.split_once('?').unwrap().1;
        let got: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        assert_eq!(got[0], ("x".to_owned(), "1".to_owned()));
        let mut want = vec![("x".to_owned(), "1".to_owned())];
        want.extend(trigger_params(
            PARENT,
            "UT00000000000000000000000000000001",
            "UT1-get-idem",
        ));
        assert_eq!(got, want);
        let url = format!("http://127.0.0.1:{port}{}", g.target);
        let sig = g.header("X-Twilio-Signature");
        assert!(
            twilio_accepts(PARENT_TOKEN, &url, &[], sig),
            "GET signature refused"
        );
        assert!(!twilio_accepts(SUB_TOKEN, &url, &[], sig));

        for id in ["UT1-post-idem", "UT1-get-idem"] {
            let s = until_status(&store, id, "delivered", 5).await;
            assert_eq!((s.attempts, s.last_error), (1, None));
            assert!(s.finished_at.is_some());
        }
        running.stop().await;
        // Nothing is sent twice.
        assert_eq!(log.got().len(), 2);
    });
    assert!(
        tallyd::metrics::TRIGGER_CROSSING_TO_CALLBACK
            .snapshot()
            .count
            >= callbacks_before + 2
    );
    assert!(deliveries("delivered") >= delivered_before + 2.0);
}

both_stores!(
    trigger_callbacks,
    |s: &TestStore| s.url(),
    |url: &String| { trigger_callbacks_are_signed_as_twilio_does(url) }
);

/// Debits `amount` from `sid` as a flush of partition 0 moving its offset
/// from `from` to `from + 1` would (a $1.00 low-balance threshold).
fn flush_debit(store: &Store, sid: &str, amount: i64, from: i64) {
    use tallyd::store::wallet::WalletRows;
    use tallyd::store::{FlushBatch, OffsetAdvance};
    store
        .write_flush(&FlushBatch {
            as_of: chrono::Utc::now().to_rfc3339(),
            offsets: vec![OffsetAdvance {
                topic: "cdrs".into(),
                partition: 0,
                from: (from > 0).then_some(from),
                to: from + 1,
            }],
            wallet: WalletRows {
                debits: vec![(sid.to_owned(), amount, 500 * tallyd::wallet::CENT)],
                holds: Vec::new(),
                low_balance: tallyd::wallet::LowBalance {
                    threshold: 100 * tallyd::wallet::CENT,
                    recharge: 0,
                },
            },
            ..FlushBatch::default()
        })
        .unwrap();
}

fn admin(http: &Client, method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = http.request(method, url).bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn wallet_events_are_signed_with_the_account_secret(url: &str) {
    let f = fixture(url, |_| {});
    let server = serve(f.state.clone());
    let http = Client::new();
    let (port, log) = f.rt.block_on(receiver());
    let hook = format!("{}/admin/accounts/{PARENT}/webhook", server.base);
    use reqwest::Method as M;

    // Bad input is refused by name.
    let cases = [
        (json!({}), "url"),
        (json!({"url": "ftp://example.com/x"}), "url"),
        (json!({"url": "http://10.0.0.1/x"}), "url"),
        (
            json!({"url": "https://example.com", "secret": "x"}),
            "secret",
        ),
    ];
    for (body, param) in cases {
        let (s, e) = admin(&http, M::PUT, &hook, Some(body.clone()));
        assert_eq!(
            (s, &e["error"]["param"]),
            (400, &json!(param)),
            "{body}: {e}"
        );
    }
    let (s, e) = admin(&http, M::GET, &hook, None);
    assert_eq!(s, 404, "{e}");
    let missing = format!(
        "{}/admin/accounts/AC0000000000000000000000000000dead/webhook",
        server.base
    );
    let (s, _) = admin(
        &http,
        M::PUT,
        &missing,
        Some(json!({"url": "https://example.com/"})),
    );
    assert_eq!(s, 404);
    let r = http.get(&hook).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Set it: the secret is shown this once.
    let url = format!("http://127.0.0.1:{port}/ok/wallet");
    let (s, v) = admin(&http, M::PUT, &hook, Some(json!({ "url": url })));
    assert_eq!(s, 200, "{v}");
    let secret = v["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.starts_with("whsec_") && secret.len() == 70,
        "{secret}"
    );
    let (s, v) = admin(&http, M::GET, &hook, None);
    assert_eq!((s, &v["url"]), (200, &json!(url)));
    assert!(v.get("secret").is_none(), "{v}");

    // A low-balance crossing queues the event for the webhook.
    flush_debit(&f.store, PARENT, 450 * tallyd::wallet::CENT, 0);
    let events = f
        .store
        .with_conn(|c| c.wallet_events(Some(PARENT), 10))
        .unwrap();
    assert_eq!(events.len(), 1);
    let event = &events[0];
    f.rt.block_on(async {
        let running = start(&f);
        until("the wallet event", 10, || log.got().len() == 1).await;
        let r = &log.got()[0];
        assert_eq!(
            (r.method.as_str(), r.target.as_str()),
            ("POST", "/ok/wallet")
        );
        assert_eq!(r.body, event.payload);
        assert_eq!(r.header("Content-Type"), "application/json");
        assert_eq!(r.header("X-Tallyd-Event-Id"), event.event_id);
        assert_eq!(
            r.header("X-Tallyd-Signature"),
            format!("sha256={}", python_hmac_sha256(&secret, &r.body))
        );
        assert_ne!(
            r.header("X-Tallyd-Signature"),
            format!("sha256={}", python_hmac_sha256("whsec_other", &r.body))
        );
        let s = until_status(&f.store, &event.event_id, "delivered", 5).await;
        assert_eq!(s.kind, "wallet.low_balance");
        running.stop().await;
    });

    // Without a webhook, events are kept but not queued.
    let (s, _) = admin(&http, M::DELETE, &hook, None);
    assert_eq!(s, 204);
    let (s, _) = admin(&http, M::DELETE, &hook, None);
    assert_eq!(s, 404);
    let top_up = format!("{}/admin/accounts/{PARENT}/credits", server.base);
    let (s, v) = admin(
        &http,
        M::POST,
        &top_up,
        Some(json!({"amount": "5.00", "idempotency_key": "k1"})),
    );
    assert_eq!(s, 201, "{v}");
    flush_debit(&f.store, PARENT, 600 * tallyd::wallet::CENT, 1);
    let events = f
        .store
        .with_conn(|c| c.wallet_events(Some(PARENT), 10))
        .unwrap();
    assert_eq!(events.len(), 2);
    let second = f
        .store
        .with_conn(|c| c.outbox_state(&events[1].event_id))
        .unwrap();
    assert_eq!(second, None);
}

both_stores!(wallet_events, |s: &TestStore| s.url(), |url: &String| {
    wallet_events_are_signed_with_the_account_secret(url)
});

/// Callbacks still to be delivered follow what they were sent for: a wallet
/// event goes to the webhook's new URL (signed with its new secret), a usage
/// trigger's callback to its updated URL, and a deleted trigger's callbacks
/// are dropped. (They went to the URL of the moment they were written for as
/// long as they were retried.)
fn pending_callbacks_follow_their_trigger_and_webhook(url: &str) {
    let f = fixture(url, |_| {});
    let server = serve(f.state.clone());
    let http = Client::new();
    let hook = format!("{}/admin/accounts/{PARENT}/webhook", server.base);
    let dead = format!("http://127.0.0.1:{}/ok/old", dead_port());
    let (s, v) = admin(
        &http,
        reqwest::Method::PUT,
        &hook,
        Some(json!({ "url": dead })),
    );
    assert_eq!(s, 200, "{v}");
    let event = OutboxRow {
        id: "EVmoved".into(),
        account_sid: PARENT.into(),
        kind: "wallet.low_balance".into(),
        source_sid: "EVmoved".into(),
        url: dead.clone(),
        method: "POST".into(),
        body: r#"{"type":"wallet.low_balance"}"#.into(),
        created_at: now_ms(),
    };
    let moved = trigger_row("UT7-moved", PARENT, &dead, "POST");
    let (port, log, running) = f.rt.block_on(async {
        let (port, log) = receiver().await;
        insert(&f.store, &event).await;
        insert(&f.store, &moved).await;
        let running = start(&f);
        until_tried(&f.store, &event.id).await;
        until_tried(&f.store, &moved.id).await;
        (port, log, running)
    });
    // The webhook moves: a new URL, a new secret.
    let live = format!("http://127.0.0.1:{port}/ok/wallet");
    let (s, v) = admin(
        &http,
        reqwest::Method::PUT,
        &hook,
        Some(json!({ "url": live })),
    );
    assert_eq!(s, 200, "{v}");
    let secret = v["secret"].as_str().unwrap().to_owned();
    f.rt.block_on(async {
        let to = format!("http://127.0.0.1:{port}/ok/trigger");
        let source = moved.source_sid.clone();
        f.store
            .run(move |c| c.redirect_trigger_callbacks(&source, &to, "GET"))
            .await
            .unwrap();
        until_status(&f.store, &event.id, "delivered", 20).await;
        until_status(&f.store, &moved.id, "delivered", 20).await;
        let got = log.got();
        let wallet = got
            .iter()
            .find(|r| r.target == "/ok/wallet")
            .expect("the event");
        assert_eq!(
            wallet.header("X-Tallyd-Signature"),
            format!("sha256={}", python_hmac_sha256(&secret, &wallet.body))
        );
        let trigger = got
            .iter()
            .find(|r| r.target.starts_with("/ok/trigger?"))
            .expect("the trigger's callback, by GET");
        assert_eq!(trigger.method, "GET");
        // A deleted trigger's callbacks are dropped.
        let dropped = trigger_row("UT7-dropped", PARENT, &dead, "POST");
        insert(&f.store, &dropped).await;
        until_tried(&f.store, &dropped.id).await;
        let source = dropped.source_sid.clone();
        f.store
            .run(move |c| c.drop_trigger_callbacks(&source, now_ms()))
            .await
            .unwrap();
        let s = until_status(&f.store, &dropped.id, "failed", 5).await;
        assert_eq!(
            s.last_error.as_deref(),
            Some("the usage trigger was deleted")
        );
        running.stop().await;

        // A claim of a row read before its redirect fails (it is read again,
        // with where it goes now).
        let read = trigger_row("UT7-read", PARENT, &dead, "POST");
        insert(&f.store, &read).await;
        let due = f
            .store
            .run(|c| c.due_outbox(now_ms() + 1_000, 100, &[]))
            .await
            .unwrap();
        let seen = due.iter().find(|d| d.row.id == read.id).unwrap();
        let (id, at) = (read.id.clone(), seen.next_attempt_at);
        let source = read.source_sid.clone();
        f.store
            .run(move |c| c.redirect_trigger_callbacks(&source, "http://127.0.0.1:9/new", "GET"))
            .await
            .unwrap();
        let claimed = f
            .store
            .run(move |c| c.claim_outbox(&[(id.as_str(), at)], now_ms() + 60_000))
            .await
            .unwrap();
        assert_eq!(
            claimed,
            [false],
            "claimed with the address it had when read"
        );
    });
}

both_stores!(
    pending_callbacks_follow,
    |s: &TestStore| s.url(),
    |url: &String| { pending_callbacks_follow_their_trigger_and_webhook(url) }
);

/// Waits until `id` has been tried at least once.
async fn until_tried(store: &Store, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(store, id).await.attempts < 1 {
        assert!(Instant::now() < deadline, "{id} never tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn delivered_once_the_receiver_is_up(url: &str) {
    let f = fixture(url, |_| {});
    let port = dead_port();
    let row = trigger_row(
        "UT2-late",
        PARENT,
        &format!("http://127.0.0.1:{port}/ok"),
        "POST",
    );
    f.rt.block_on(async {
        insert(&f.store, &row).await;
        let running = start(&f);
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            let s = state_of(&f.store, &row.id).await;
            if s.attempts >= 2 && s.last_error.is_some() {
                break s;
            }
            assert!(Instant::now() < deadline, "{s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(s.status, "pending");
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        // The receiver comes up.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let log = Log::new();
        serve_receiver(listener, log.clone());
        let s = until_status(&f.store, &row.id, "delivered", 20).await;
        assert!(s.attempts >= 3, "{s:?}");
        running.stop().await;
        let got = log.got();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header("I-Twilio-Idempotency-Token"), "UT2-late");
    });
}

both_stores!(
    receiver_down_then_up,
    |s: &TestStore| s.url(),
    |url: &String| delivered_once_the_receiver_is_up(url)
);

fn failed_after_the_retry_window_and_counted(url: &str) {
    let f = fixture(url, |c| c.webhooks.retry_for_secs = 2);
    let server = serve(f.state.clone());
    let (failed_before, retried_before) = (deliveries("failed"), deliveries("retried"));
    let dead = dead_port();
    f.rt.block_on(async {
        let (port, _log) = receiver().await;
        let never = trigger_row(
            "UT3-never",
            PARENT,
            &format!("http://127.0.0.1:{dead}/x"),
            "GET",
        );
        let fine = trigger_row(
            "UT3-fine",
            PARENT,
            &format!("http://127.0.0.1:{port}/ok"),
            "GET",
        );
        let elsewhere = trigger_row(
            "UT3-other",
            OTHER,
            &format!("http://127.0.0.1:{port}/ok"),
            "GET",
        );
        for r in [&never, &fine, &elsewhere] {
            insert(&f.store, r).await;
        }
        let running = start(&f);
        until_status(&f.store, &fine.id, "delivered", 5).await;
        let s = until_status(&f.store, &never.id, "failed", 15).await;
        let error = s.last_error.clone().unwrap();
        assert!(
            error.contains("connection refused") && error.contains("gave up"),
            "{error}"
        );
        assert!(s.attempts >= 2, "{s:?}");
        running.stop().await;
    });
    assert!(deliveries("failed") > failed_before);
    assert!(deliveries("retried") > retried_before);
    // Written while no dispatcher runs: pending.
    let pending = trigger_row("UT3-pending", PARENT, "http://127.0.0.1:9/x", "GET");
    assert!(f.store.with_conn(|c| c.insert_outbox(&pending)).unwrap());

    let get = |path: &str| -> Value {
        let r = Client::new()
            .get(format!("{}{path}", server.base))
            .bearer_auth(PARENT_KEY)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.json().unwrap()
    };
    // The account's (total, successful, failed) webhook deliveries.
    let delivered = || -> [Value; 3] {
        let stats = &get("/v1/usage")["stats"];
        ["total", "successful", "failed"].map(|k| stats[format!("{k}WebhookDeliveries")].clone())
    };
    assert_eq!(delivered(), [json!(3), json!(1), json!(1)]);
    let daily = get("/v1/usage/daily?days=2");
    let data = daily["data"].as_array().unwrap();
    assert_eq!(
        (&data[0]["webhooks"], &data[1]["webhooks"]),
        (&json!(0), &json!(3))
    );
    let monthly = get("/v1/usage/monthly?months=2");
    let data = monthly["data"].as_array().unwrap();
    assert_eq!(
        (&data[0]["webhooks"], &data[1]["webhooks"]),
        (&json!(0), &json!(3))
    );

    // Kept a second once finished: every row leaves the outbox (the pending
    // one once it too has failed), and the statistics still count them.
    let running = f.rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let mut cfg = f.cfg.webhooks.clone();
        cfg.keep_finished_secs = 1;
        let handle = Dispatcher::start(f.store.clone(), cfg, stop.clone()).unwrap();
        Running { handle, stop }
    });
    let left = || {
        f.store
            .with_conn(|c| c.query("SELECT id FROM webhook_outbox", &[]))
            .unwrap()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while left() > 0 {
        assert!(
            Instant::now() < deadline,
            "finished callbacks never removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    f.rt.block_on(running.stop());
    assert!(metric("tallyd_webhook_outbox_pruned_total") >= 4.0);
    assert_eq!(delivered(), [json!(3), json!(1), json!(2)]);
    let daily = get("/v1/usage/daily?days=2");
    assert_eq!(daily["data"][1]["webhooks"], json!(3));
    let monthly = get("/v1/usage/monthly?months=2");
    assert_eq!(monthly["data"][1]["webhooks"], json!(3));
}

both_stores!(never_up, |s: &TestStore| s.url(), |url: &String| {
    failed_after_the_retry_window_and_counted(url)
});

fn a_restart_takes_over_and_sends_once_more(url: &str) {
    let f = fixture(url, |_| {});
    f.rt.block_on(async {
        let (port, log) = receiver().await;
        log.status.store(503, Ordering::Relaxed);
        let row = trigger_row(
            "UT4-restart",
            PARENT,
            &format!("http://127.0.0.1:{port}/ok"),
            "POST",
        );
        insert(&f.store, &row).await;
        let first = start(&f);
        until("the first attempt", 10, || !log.got().is_empty()).await;
        first.stop().await;
        // Stopped: one attempt, or two if a retry was due before it stopped.
        let sent = log.got().len() as i64;
        let s = state_of(&f.store, &row.id).await;
        assert_eq!((s.status.as_str(), s.attempts), ("pending", sent), "{s:?}");
        assert_eq!(s.last_error.as_deref(), Some("HTTP 503"));

        // An instance claims the row and dies before reporting.
        let (id, seen) = (row.id.clone(), s.next_attempt_at);
        let lease = now_ms().max(seen) + 1_500;
        let claimed = f
            .store
            .run(move |c| c.claim_outbox(&[(id.as_str(), seen)], lease))
            .await
            .unwrap();
        assert_eq!(claimed, vec![true]);
        // A second claim of the same read loses the compare-and-set.
        let id = row.id.clone();
        let again = f
            .store
            .run(move |c| c.claim_outbox(&[(id.as_str(), seen)], lease + 5))
            .await
            .unwrap();
        assert_eq!(again, vec![false]);

        log.status.store(200, Ordering::Relaxed);
        let second = start(&f);
        let s = until_status(&f.store, &row.id, "delivered", 15).await;
        // Its attempts, the dead instance's, the one that delivered.
        assert_eq!(s.attempts, sent + 2);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        second.stop().await;
        let got = log.got();
        assert_eq!(got.len() as i64, sent + 1, "{got:?}");
        assert!(
            got.last().unwrap().at_ms >= lease,
            "sent before the dead claim's lease ended"
        );
        for r in &got {
            assert_eq!(r.header("I-Twilio-Idempotency-Token"), "UT4-restart");
            assert_eq!(r.body, row.body);
        }
        assert_eq!(
            got[0].header("X-Twilio-Signature"),
            got[1].header("X-Twilio-Signature")
        );
    });
}

both_stores!(restart, |s: &TestStore| s.url(), |url: &String| {
    a_restart_takes_over_and_sends_once_more(url)
});

fn a_hanging_receiver_holds_up_only_its_account(url: &str) {
    let f = fixture(url, |c| {
        c.webhooks.max_in_flight = 4;
        c.webhooks.per_account_in_flight = 2;
        c.webhooks.timeout_ms = 4_000;
    });
    f.rt.block_on(async {
        let (port, log) = receiver().await;
        for i in 0..5 {
            insert(
                &f.store,
                &trigger_row(
                    &format!("UT5-hang-{i}"),
                    OTHER,
                    &format!("http://127.0.0.1:{port}/hang"),
                    "POST",
                ),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let ok = trigger_row(
            "UT5-ok",
            PARENT,
            &format!("http://127.0.0.1:{port}/ok"),
            "POST",
        );
        insert(&f.store, &ok).await;
        let started = Instant::now();
        let running = start(&f);
        until_status(&f.store, &ok.id, "delivered", 3).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // OTHER has its two in flight, hanging; no more of its rows were sent.
        assert_eq!(log.on("/hang").len(), 2);
        until("two in flight", 2, || running.handle.in_flight() == 2).await;
        running.stop().await;
    });
}

both_stores!(hanging_receiver, |s: &TestStore| s.url(), |url: &String| {
    a_hanging_receiver_holds_up_only_its_account(url)
});

#[test]
fn internal_addresses_are_refused_at_send() {
    let ts = TestStore::sqlite();
    let f = fixture(&ts.url(), |c| c.webhooks.allow_loopback = false);
    let refused_before = deliveries("refused");
    f.rt.block_on(async {
        let (port, log) = receiver().await;
        let literal = trigger_row("UT6-literal", PARENT, &format!("http://127.0.0.1:{port}/ok"), "POST");
        insert(&f.store, &literal).await;
        // A host name that resolves to loopback (this machine's name, where it does).
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let resolves_to_loopback = !host.is_empty()
            && std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .map(|a| {
                    let a: Vec<_> = a.collect();
                    !a.is_empty() && a.iter().all(|a| a.ip().is_loopback())
                })
                .unwrap_or(false);
        let named = trigger_row("UT6-named", PARENT, &format!("http://{host}:{port}/ok"), "POST");
        if resolves_to_loopback {
            insert(&f.store, &named).await;
        } else {
            eprintln!("{host:?} does not resolve to loopback only: the resolver's check is left to the unit test");
        }
        let running = start(&f);
        let s = until_status(&f.store, &literal.id, "failed", 5).await;
        let e = s.last_error.unwrap();
        assert!(e.contains("loopback") && e.contains("127.0.0.1"), "{e}");
        assert_eq!(s.attempts, 1);
        if resolves_to_loopback {
            let s = until_status(&f.store, &named.id, "failed", 5).await;
            let e = s.last_error.unwrap();
            assert!(e.contains(&format!("{host} resolves to a loopback address")), "{e}");
            assert_eq!(s.attempts, 1);
        }
        running.stop().await;
        assert!(log.got().is_empty(), "{:?}", log.got());
    });
    // Counted as refused, not as a receiver given up on.
    assert!(deliveries("refused") > refused_before);
}

/// A store that cannot be reached: the dispatcher keeps polling (logging,
/// not panicking) and stops when told.
#[test]
fn an_unreachable_store_is_waited_out() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Port 1: nothing listens; the connection is refused at once.
    let store = Store::new("postgres://postgres@127.0.0.1:1/none", 2).unwrap();
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Dispatcher::start(store.clone(), Default::default(), stop.clone()).unwrap();
        for _ in 0..3 {
            handle.wake();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(handle.in_flight(), 0);
        assert!(!store.health().is_up());
        stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(5), handle.join())
            .await
            .expect("the dispatcher stops");
    });
}

/// The whole chain: a trigger made through the Usage Triggers API, a flush
/// whose SMS crosses it (the flush writes the callback to the outbox), the
/// dispatcher sending it — signed so that Twilio's `RequestValidator`
/// accepts it, with the parameters of the trigger and the crossing.
fn a_trigger_made_through_the_api_calls_back(url: &str) {
    use tallyd::counters::Deltas;
    use tallyd::dedup::DedupWindow;
    use tallyd::pipeline::{ingest, Outcome};
    let f = fixture(url, |_| {});
    let server = serve(f.state.clone());
    let (port, log) = f.rt.block_on(receiver());
    let hook = format!("http://127.0.0.1:{port}/hook");
    let r = Client::new()
        .post(format!(
            "{}/2010-04-01/Accounts/{PARENT}/Usage/Triggers.json",
            server.base
        ))
        .basic_auth(PARENT, Some(PARENT_TOKEN))
        .form(&[
            ("CallbackUrl", hook.as_str()),
            ("TriggerValue", "1"),
            ("UsageCategory", "sms"),
            ("TriggerBy", "count"),
            ("Recurring", "daily"),
        ])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let trigger: Value = r.json().unwrap();
    let trigger_sid = trigger["sid"].as_str().unwrap().to_owned();

    // One SMS now crosses it; flushed as the daemon does.
    let (_, tariff) = config(url);
    let mut counters = Deltas::default();
    let mut seen = DedupWindow::new(tallyd::calendar::Day(0));
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cdr = sms("w1", PARENT, &ts, "outbound", 1, None, None);
    assert!(matches!(
        ingest(cdr.as_bytes(), &tariff, &mut counters, &mut seen),
        Ok(Outcome::Counted(_))
    ));
    let batch = tallyd::store::FlushBatch {
        as_of: ts.clone(),
        pages: tallyd::flush::expand::pages(vec![counters.take()], &tariff),
        triggers: f.state.triggers().of(PARENT),
        consumed_at_ms: now.timestamp_millis(),
        ..Default::default()
    };
    let (_, report) = f.store.write_flush_firing(&batch).unwrap();
    assert_eq!(report.fired.len(), 1);

    f.rt.block_on(async {
        let running = start(&f);
        running.handle.wake();
        until("the trigger's callback", 10, || log.got().len() == 1).await;
        let r = &log.got()[0];
        assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/hook"));
        let params: Vec<(String, String)> = serde_urlencoded::from_str(&r.body).unwrap();
        let get = |k: &str| {
            params
                .iter()
                .find(|(n, _)| n == k)
                .map_or("", |(_, v)| v.as_str())
        };
        assert_eq!(get("AccountSid"), PARENT);
        assert_eq!(get("UsageTriggerSid"), trigger_sid);
        assert_eq!(get("UsageCategory"), "sms");
        assert_eq!((get("TriggerValue"), get("CurrentValue")), ("1", "1"));
        let token = r.header("I-Twilio-Idempotency-Token");
        assert!(!token.is_empty());
        assert_eq!(get("IdempotencyToken"), token);
        assert!(twilio_accepts(
            PARENT_TOKEN,
            &hook,
            &params,
            r.header("X-Twilio-Signature")
        ));
        let s = until_status(&f.store, token, "delivered", 5).await;
        assert_eq!(s.kind, KIND_USAGE_TRIGGER);
        running.stop().await;
    });
}

both_stores!(
    trigger_end_to_end,
    |s: &TestStore| s.url(),
    |url: &String| { a_trigger_made_through_the_api_calls_back(url) }
);

/// Rows a flush wrote claimed by this instance and handed over after its
/// commit leave without a read or a claim, once; a handed row whose lease no
/// longer covers an attempt is claimed again first, and not sent if another
/// instance claimed it after its lease ended.
fn handed_over_rows_are_sent_once(url: &str) {
    let f = fixture(url, |_| {});
    f.rt.block_on(async {
        let (port, log) = receiver().await;
        let hook = format!("http://127.0.0.1:{port}/ok");
        let running = start(&f);
        let lease = running.handle.lease_for_handoff().expect("not behind");
        let row = trigger_row("UT6-handed", PARENT, &hook, "POST");
        let written = row.clone();
        let ids = f
            .store
            .run(move |c| c.insert_outbox_rows_leased(&[written], lease))
            .await
            .unwrap();
        assert_eq!(ids, std::slice::from_ref(&row.id));
        // Claimed: the dispatcher's reads never see it.
        running.handle.wake();
        let s = state_of(&f.store, &row.id).await;
        assert_eq!((s.attempts, s.next_attempt_at), (1, lease));
        running.handle.hand_over(vec![row.clone()], lease);
        let s = until_status(&f.store, &row.id, "delivered", 10).await;
        assert_eq!(s.attempts, 1, "no claim of its own");

        // Handed over with a lease too short for an attempt (its flush took
        // long to commit): claimed again from that lease, then sent.
        let late = trigger_row("UT6-late", PARENT, &hook, "POST");
        let short = now_ms() + 1_000;
        let written = late.clone();
        f.store
            .run(move |c| c.insert_outbox_rows_leased(&[written], short))
            .await
            .unwrap();
        running.handle.hand_over(vec![late.clone()], short);
        let s = until_status(&f.store, &late.id, "delivered", 15).await;
        assert_eq!(s.attempts, 2, "the lease's claim and the renewal");
        // Handed over with a short lease that another claim replaced (as
        // another instance's after the lease ended): that claim sends it,
        // this instance does not.
        let taken = trigger_row("UT6-taken", PARENT, &hook, "POST");
        let short = now_ms() + 300;
        let written = taken.clone();
        f.store
            .run(move |c| {
                c.insert_outbox_rows_leased(&[written], short)?;
                c.claim_outbox(&[("UT6-taken", short)], short + 60_000)
            })
            .await
            .unwrap();
        running.handle.hand_over(vec![taken.clone()], short);
        // The next row handed over is sent after it was looked at.
        let after = trigger_row("UT6-after", PARENT, &hook, "POST");
        let lease = running.handle.lease_for_handoff().unwrap();
        let written = after.clone();
        f.store
            .run(move |c| c.insert_outbox_rows_leased(&[written], lease))
            .await
            .unwrap();
        running.handle.hand_over(vec![after.clone()], lease);
        until_status(&f.store, &after.id, "delivered", 10).await;
        assert_eq!(state_of(&f.store, &taken.id).await.status, "pending");
        running.stop().await;
        let got = log.got();
        let tokens: Vec<&str> = got
            .iter()
            .map(|r| r.header("I-Twilio-Idempotency-Token"))
            .collect();
        assert_eq!(tokens, ["UT6-handed", "UT6-late", "UT6-after"]);
    });
}

both_stores!(handed_over, |s: &TestStore| s.url(), |url: &String| {
    handed_over_rows_are_sent_once(url)
});

/// While the consumers are far behind, flushes hand nothing over (their
/// callbacks are written pending) and the dispatcher paces itself; once they
/// have caught up, every callback waiting goes out, once.
fn deferred_while_behind_then_all_delivered_once(url: &str) {
    let f = fixture(url, |_| {});
    f.rt.block_on(async {
        let (port, log) = receiver().await;
        let hook = format!("http://127.0.0.1:{port}/ok");
        let behind = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = behind.clone();
        let handle = Dispatcher::start_paced(
            f.store.clone(),
            f.cfg.webhooks.clone(),
            stop.clone(),
            Some(Arc::new(move || flag.load(Ordering::Relaxed))),
        )
        .unwrap();
        assert_eq!(
            handle.lease_for_handoff(),
            None,
            "behind: nothing handed over"
        );
        let rows: Vec<OutboxRow> = (0..40)
            .map(|i| trigger_row(&format!("UT7-{i:02}"), PARENT, &hook, "POST"))
            .collect();
        for r in &rows {
            insert(&f.store, r).await;
        }
        handle.wake();
        until("a first paced batch", 10, || !log.got().is_empty()).await;
        // Caught up.
        behind.store(false, Ordering::Relaxed);
        assert!(handle.lease_for_handoff().is_some());
        for r in &rows {
            until_status(&f.store, &r.id, "delivered", 20).await;
        }
        let running = Running { handle, stop };
        running.stop().await;
        let mut tokens: Vec<String> = log
            .got()
            .iter()
            .map(|r| r.header("I-Twilio-Idempotency-Token").to_owned())
            .collect();
        tokens.sort();
        let want: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        assert_eq!(tokens, want, "each once");
    });
}

both_stores!(
    deferred_while_behind,
    |s: &TestStore| s.url(),
    |url: &String| { deferred_while_behind_then_all_delivered_once(url) }
);
