//! Wallets, holds and top-ups (docs/contract.md §4): over HTTP against the API with a
//! real store (SQLite and PostgreSQL), and end to end with a real tansu broker
//! and the real binary killed with SIGKILL mid-run.

mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::Fate;
use tallyd::api::ApiState;
use tallyd::cdr::AccountSid;
use tallyd::config::Config;
use tallyd::rating::Tariff;
use tallyd::store::Store;
use tallyd::wallet::CENT;

use common::{postgres_base, serve, TestStore, ADMIN_TOKEN};

/// A CallingBox account ($0.05/min: a 60-minute hold is $3.00), two calls at once.
const CB: &str = "AC00000000000000000000000000000c11";
const CB_KEY: &str = "cb_test_key_0001";
/// An AgentPhone account, for the other tenant's view.
const AP: &str = "AC0000000000000000000000000000a0a1";
const AP_KEY: &str = "ap_test_key_0002";

fn config(url: &str) -> (Config, Tariff) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        r#"
[[api.accounts]]
sid = "{CB}"
auth_token = "cb-token-0123456789abcdef"
api_keys = ["{CB_KEY}"]
limits = {{ numbers = 10, messages_per_month = 100, voice_minutes_per_month = 100, max_call_duration_minutes = 60, concurrent_calls = 2 }}

[[api.accounts]]
sid = "{AP}"
auth_token = "ap-token-0123456789abcdef"
api_keys = ["{AP_KEY}"]
"#
    ));
    let env = [
        ("TALLYD_STORE__URL".to_string(), url.to_string()),
        ("TALLYD_API__ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
    ];
    Config::from_toml(&text, &path, env).unwrap()
}

struct Api {
    base: String,
    http: Client,
}

impl Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "DELETE" => self.http.delete(url),
            "PUT" => self.http.put(url),
            "PATCH" => self.http.patch(url),
            _ => unreachable!(),
        }
        .bearer_auth(key);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let r = req.send().unwrap();
        let status = r.status();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn hold(&self, key: &str, call_id: &str) -> (StatusCode, Value) {
        self.call("POST", "/v1/holds", key, Some(json!({"call_id": call_id})))
    }

    fn wallet(&self, key: &str) -> Value {
        let (s, v) = self.call("GET", "/v1/wallet", key, None);
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
}

/// The API over a fresh SQLite store with this file's accounts: the store
/// and the server (kept for the test's life), the config and a client.
fn sqlite_api() -> (TestStore, Config, common::Server, Api) {
    let store = TestStore::sqlite();
    let (cfg, tariff) = config(&store.url());
    let state = ApiState::seeded(&cfg, &tariff, Store::open(&cfg.store.url).unwrap()).unwrap();
    let server = serve(state);
    let api = Api {
        base: server.base.clone(),
        http: Client::new(),
    };
    (store, cfg, server, api)
}

fn holds_and_top_ups_over_http(store: &TestStore) {
    let (cfg, tariff) = config(&store.url());
    let state = ApiState::seeded(&cfg, &tariff, Store::open(&cfg.store.url).unwrap()).unwrap();
    let now = 1_800_000_000;
    let state = state.with_fixed_clock(now);
    let server = serve(state.clone());
    let api = Api {
        base: server.base.clone(),
        http: Client::new(),
    };
    // Starting credit, nothing held.
    let w = api.wallet(CB_KEY);
    assert_eq!(
        (
            &w["balance"],
            &w["held"],
            &w["available"],
            &w["hold_amount"],
            &w["status"],
            &w["currency"]
        ),
        (
            &json!("5.00000"),
            &json!("0.00000"),
            &json!("5.00000"),
            &json!("3.00000"),
            &json!("low"),
            &json!("usd")
        )
    );
    // A hold: 201, then the same call id again: 200, the same hold.
    let (s, h) = api.hold(CB_KEY, "CA1");
    assert_eq!(s, StatusCode::CREATED, "{h}");
    assert_eq!(
        (&h["amount"], &h["status"]),
        (&json!("3.00000"), &json!("reserved"))
    );
    assert_eq!(
        h["expires_at"],
        json!("2027-01-15T09:01:00Z"),
        "60 min + 60 s grace"
    );
    assert_eq!(h["wallet"]["available"], json!("2.00000"));
    let (s, again) = api.hold(CB_KEY, "CA1");
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["created_at"], h["created_at"]);
    // The seed's example: usage took $0.12, so $1.88 is available of a $3.00 hold.
    state
        .wallets()
        .wallet(AccountSid::parse(CB).unwrap())
        .debit(12 * CENT);
    let (s, refusal) = api.hold(CB_KEY, "CA2");
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(refusal["code"], "calls_paused");
    assert_eq!(
        refusal["message"],
        "Calls paused. Your balance is $1.88 but each call requires a $3.00 hold (we release it back if no one answers). Add $1.12 or more in credits to keep calling."
    );
    assert_eq!(api.wallet(CB_KEY)["status"], "paused");
    // A top-up: durable, credited once per idempotency key.
    let credit = json!({"amount": "10.00", "idempotency_key": "stripe-pi-1", "reason": "card"});
    let path = format!("/admin/accounts/{CB}/credits");
    let (s, first) = api.call("POST", &path, ADMIN_TOKEN, Some(credit.clone()));
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["credited"], true);
    let (s, second) = api.call("POST", &path, ADMIN_TOKEN, Some(credit));
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(second["credited"], false);
    assert_eq!(second["created_at"], first["created_at"]);
    let w = api.wallet(CB_KEY);
    assert_eq!(
        (&w["balance"], &w["available"]),
        (&json!("14.88000"), &json!("11.88000"))
    );
    assert_eq!(
        store_balance(&cfg.store.url, CB),
        Some(1500 * CENT),
        "the store has the top-up; the in-memory debit stands for an unflushed CDR"
    );
    // Two concurrent calls allowed: the third is 429 and names the limit.
    assert_eq!(api.hold(CB_KEY, "CA2").0, StatusCode::CREATED);
    let (s, limit) = api.hold(CB_KEY, "CA3");
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{limit}");
    assert!(limit["message"]
        .as_str()
        .unwrap()
        .contains("2 concurrent calls"));
    // Release: money back, slot back; a second release is harmless.
    let (s, r) = api.call("DELETE", "/v1/holds/CA2", CB_KEY, None);
    assert_eq!((s, &r["status"]), (StatusCode::OK, &json!("released")));
    assert_eq!(
        api.call("DELETE", "/v1/holds/CA2", CB_KEY, None).0,
        StatusCode::OK
    );
    assert_eq!(api.wallet(CB_KEY)["available"], "11.88000");
    // Billing view before the CDR.
    let (s, b) = api.call("GET", "/v1/calls/CA1/billing", CB_KEY, None);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        b,
        json!({"call_id": "CA1", "duration_seconds": 0, "billed_duration_seconds": 0,
               "billing_amount_milli_cents": 0, "reservation_status": "reserved", "hold_amount": "3.00000"})
    );
    // Another tenant sees none of it.
    assert_eq!(
        api.call("GET", "/v1/calls/CA1/billing", AP_KEY, None).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.call("DELETE", "/v1/holds/CA1", AP_KEY, None).0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.wallet(AP_KEY)["balance"], "5.00000");
    assert_eq!(
        api.call("GET", "/v1/wallet", "nope", None).0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call(
            "POST",
            &path,
            CB_KEY,
            Some(json!({"amount": "1", "idempotency_key": "x"}))
        )
        .0,
        StatusCode::UNAUTHORIZED,
        "an account's key is not the admin token"
    );
    // Bad input: a clear 400 naming the problem.
    for (body, param) in [
        (json!({"call_id": ""}), "call_id"),
        (json!({"call_id": "x".repeat(65)}), "call_id"),
        (json!({"call_id": "CA9", "mode": "telepathy"}), "mode"),
        (
            json!({"call_id": "CA9", "number_type": "pigeon"}),
            "number_type",
        ),
        (json!({"call_id": 7}), "call_id"),
    ] {
        let (s, e) = api.call("POST", "/v1/holds", CB_KEY, Some(body));
        assert_eq!(
            (s, &e["error"]["param"]),
            (StatusCode::BAD_REQUEST, &json!(param)),
            "{e}"
        );
    }
    let huge = "9".repeat(10_000);
    for amount in [
        "-1",
        "0",
        "0.00",
        "ten",
        "0.000001",
        "1e400",
        "1e3",
        "+5",
        "1_000",
        huge.as_str(),
    ] {
        let (s, e) = api.call(
            "POST",
            &path,
            ADMIN_TOKEN,
            Some(json!({"amount": amount, "idempotency_key": "k"})),
        );
        assert_eq!(
            (s, &e["error"]["param"]),
            (StatusCode::BAD_REQUEST, &json!("amount")),
            "{amount}: {e}"
        );
        // The value is quoted cut short, whatever its length.
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }
    let unknown = format!(
        "/admin/accounts/{}/credits",
        "AC0000000000000000000000000000dead"
    );
    assert_eq!(
        api.call(
            "POST",
            &unknown,
            ADMIN_TOKEN,
            Some(json!({"amount": "1", "idempotency_key": "k"}))
        )
        .0,
        StatusCode::NOT_FOUND
    );

    // Expiry: past 60 min + grace the hold is released, in memory and store.
    let later = state.clone().with_fixed_clock(now + 3600 + 60);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(tallyd::api::wallet::expire_due(&later))
            .unwrap(),
        1
    );
    assert_eq!(api.wallet(CB_KEY)["held"], "0.00000");
    let (_, b) = api.call("GET", "/v1/calls/CA1/billing", CB_KEY, None);
    assert_eq!(b["reservation_status"], "released");

    // A restart (a new state over the same store) sees the stored wallet:
    // the top-up, no hold; the unflushed debit is not there (the replay of
    // its CDR would bring it back).
    let again = ApiState::seeded(&cfg, &tariff, Store::open(&cfg.store.url).unwrap()).unwrap();
    let v = again
        .wallets()
        .wallet(AccountSid::parse(CB).unwrap())
        .view();
    assert_eq!((v.balance, v.held), (1500 * CENT, 0));
}

/// Holds the write lock of the SQLite file at `path` for `held`, from
/// another connection; returns once it is taken.
fn write_locked(path: String, held: Duration) -> std::thread::JoinHandle<()> {
    let (locked, is_locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        std::thread::sleep(held);
        c.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    holder
}

/// A POST of `body` to `path` whose client gives up after `timeout`.
fn cut_off(
    api: &Api,
    path: &str,
    key: &str,
    body: Value,
    timeout: Duration,
) -> reqwest::Result<reqwest::blocking::Response> {
    Client::builder()
        .timeout(timeout)
        .build()
        .unwrap()
        .post(format!("{}{path}", api.base))
        .bearer_auth(key)
        .json(&body)
        .send()
}

/// A top-up whose request is cut off while the store is busy (the client's
/// timeout here; a proxy's or a forwarding instance's alike) is committed
/// once the store is free, and then it is in the balance: the live wallet, not
/// only the store. The same idempotency key again credits nothing more.
#[test]
fn a_top_up_cut_off_while_the_store_is_busy_is_in_the_balance() {
    let (_store, cfg, _server, api) = sqlite_api();
    assert_eq!(api.wallet(CB_KEY)["balance"], "5.00000");
    let path = cfg.store.url.strip_prefix("sqlite://").unwrap().to_owned();
    // Another writer holds the store's write lock for 1.5 s.
    let holder = write_locked(path, Duration::from_millis(1500));
    let cut = cut_off(
        &api,
        &format!("/admin/accounts/{CB}/credits"),
        ADMIN_TOKEN,
        json!({"amount": "10.00", "idempotency_key": "cut-1"}),
        Duration::from_millis(300),
    );
    assert!(
        cut.is_err(),
        "the store was busy; the request should time out"
    );
    holder.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.wallet(CB_KEY)["balance"] != "15.00000" {
        assert!(Instant::now() < deadline, "{}", api.wallet(CB_KEY));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, again) = api.call(
        "POST",
        &format!("/admin/accounts/{CB}/credits"),
        ADMIN_TOKEN,
        Some(json!({"amount": "10.00", "idempotency_key": "cut-1"})),
    );
    assert_eq!(
        (s, &again["credited"]),
        (StatusCode::CREATED, &json!(false)),
        "{again}"
    );
    assert_eq!(api.wallet(CB_KEY)["balance"], "15.00000");
}

/// A hold is answered only once it is in the store: with the holds file
/// locked past the store's busy timeout, a grant whose request was cut off
/// meanwhile is revoked when its write fails (not left granted in memory
/// only), and a repeat of a call id whose grant is still being written waits
/// for that write instead of answering "reserved" at once.
#[test]
fn holds_are_answered_only_once_stored() {
    let (_store, cfg, _server, api) = sqlite_api();
    // Room for two $3.00 holds; the holds file exists after a first hold.
    let (s, v) = api.call(
        "POST",
        &format!("/admin/accounts/{CB}/credits"),
        ADMIN_TOKEN,
        Some(json!({"amount": "10.00", "idempotency_key": "room"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(api.hold(CB_KEY, "CAwarm").0, StatusCode::CREATED);
    assert_eq!(
        api.call("DELETE", "/v1/holds/CAwarm", CB_KEY, None).0,
        StatusCode::OK
    );
    let holds = format!("{}-holds", cfg.store.url.strip_prefix("sqlite://").unwrap());
    // Past the busy timeout (10 s) of the write waiting first.
    let holder = write_locked(holds, Duration::from_millis(10_500));
    let started = Instant::now();
    // Cut off by its client; its write fails at the busy timeout.
    let cut = cut_off(
        &api,
        "/v1/holds",
        CB_KEY,
        json!({"call_id": "CAcut"}),
        Duration::from_secs(1),
    );
    assert!(
        cut.is_err(),
        "the holds file was locked; the request should time out"
    );
    let hold_at = |call_id: &'static str| {
        let base = api.base.clone();
        std::thread::spawn(move || {
            let r = Client::new()
                .post(format!("{base}/v1/holds"))
                .bearer_auth(CB_KEY)
                .json(&json!({ "call_id": call_id }))
                .send()
                .unwrap();
            (r.status(), Instant::now())
        })
    };
    let first = hold_at("CAdup");
    std::thread::sleep(Duration::from_millis(300));
    let repeat = hold_at("CAdup");
    let (first, first_at) = first.join().unwrap();
    let (repeat, repeat_at) = repeat.join().unwrap();
    holder.join().unwrap();
    assert_eq!(first, StatusCode::CREATED);
    assert_eq!(repeat, StatusCode::OK);
    assert!(
        repeat_at + Duration::from_millis(50) >= first_at
            && repeat_at - started > Duration::from_secs(9),
        "the repeat answered {:?} after the start, before its first grant was stored",
        repeat_at - started
    );
    // The cut-off grant is gone: not in memory, not in the store.
    let (s, b) = api.call("GET", "/v1/calls/CAcut/billing", CB_KEY, None);
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let w = api.wallet(CB_KEY);
    assert_eq!(
        (&w["held"], &w["balance"]),
        (&json!("3.00000"), &json!("15.00000")),
        "{w}"
    );
}

/// A deleted account's webhook goes with it: an account created again with
/// its SID has none (and no secret to sign with); its wallet stays.
#[test]
fn a_deleted_account_takes_its_webhook_and_keeps_its_wallet() {
    let (_store, _, _server, api) = sqlite_api();
    let sid = "AC000000000000000000000000000beef1";
    let account = format!("/admin/accounts/{sid}");
    let create = json!({"sid": sid, "friendly_name": "one"});
    let (s, v) = api.call("POST", "/admin/accounts", ADMIN_TOKEN, Some(create.clone()));
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let hook = format!("{account}/webhook");
    let (s, v) = api.call(
        "PUT",
        &hook,
        ADMIN_TOKEN,
        Some(json!({"url": "https://tenant-one.example.com/hook"})),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    let credits = format!("{account}/credits");
    let top_up = json!({"amount": "100.00", "idempotency_key": "inv-1"});
    let (s, v) = api.call("POST", &credits, ADMIN_TOKEN, Some(top_up.clone()));
    assert_eq!(
        (s, &v["credited"]),
        (StatusCode::CREATED, &json!(true)),
        "{v}"
    );
    let (s, _) = api.call("DELETE", &account, ADMIN_TOKEN, None);
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api.call("POST", "/admin/accounts", ADMIN_TOKEN, Some(create));
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = api.call("GET", &hook, ADMIN_TOKEN, None);
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // The top-up stays, once: the same key credits nothing again.
    let (s, v) = api.call("POST", &credits, ADMIN_TOKEN, Some(top_up));
    assert_eq!(
        (s, &v["credited"]),
        (StatusCode::CREATED, &json!(false)),
        "{v}"
    );
    assert_eq!(v["wallet"]["balance"], "105.00000", "{v}");
}

/// Debits `amount` from `sid` as a flush of partition 0 moving its offset
/// from `from` to `from + 1` would.
fn flush_debit(store: &Store, sid: &str, amount: i64, from: i64) -> tallyd::store::FlushOutcome {
    use tallyd::store::wallet::WalletRows;
    use tallyd::store::{FlushBatch, OffsetAdvance};
    store
        .write_flush(&FlushBatch {
            as_of: format!("2026-11-29T10:00:{:02}+00:00", from),
            offsets: vec![OffsetAdvance {
                topic: "cdrs".into(),
                partition: 0,
                from: (from > 0).then_some(from),
                to: from + 1,
            }],
            wallet: WalletRows {
                debits: vec![(sid.to_owned(), amount, 500 * CENT)],
                holds: Vec::new(),
                low_balance: tallyd::wallet::LowBalance {
                    threshold: 100 * CENT,
                    recharge: 0,
                },
            },
            ..FlushBatch::default()
        })
        .unwrap()
}

fn low_balance_once_per_crossing(store: &TestStore) {
    let (cfg, tariff) = config(&store.url());
    let state = ApiState::seeded(&cfg, &tariff, Store::open(&cfg.store.url).unwrap()).unwrap();
    let server = serve(state.clone());
    let api = Api {
        base: server.base.clone(),
        http: Client::new(),
    };
    let db = Store::open(&cfg.store.url).unwrap();
    let events = |sid: &str| {
        let (s, v) = api.call(
            "GET",
            &format!("/admin/wallet-events?account_sid={sid}"),
            ADMIN_TOKEN,
            None,
        );
        assert_eq!(s, StatusCode::OK, "{v}");
        v["events"].as_array().unwrap().clone()
    };
    let top_up = |key: &str, amount: &str| {
        let body = json!({"amount": amount, "idempotency_key": key});
        let (s, v) = api.call(
            "POST",
            &format!("/admin/accounts/{AP}/credits"),
            ADMIN_TOKEN,
            Some(body),
        );
        assert_eq!(s, StatusCode::CREATED, "{v}");
    };
    // $5.00 → $1.50: above the $1.00 threshold.
    flush_debit(&db, AP, 350 * CENT, 0);
    assert!(events(AP).is_empty());
    // → $0.50: one crossing, one event.
    flush_debit(&db, AP, 100 * CENT, 1);
    // The same flush again (a retry after an unknown commit outcome, or a
    // replay after a crash) is recognised and fires nothing.
    assert_eq!(
        flush_debit(&db, AP, 100 * CENT, 1),
        tallyd::store::FlushOutcome::AlreadyApplied
    );
    // Still low: no repeat.
    flush_debit(&db, AP, 10 * CENT, 2);
    top_up("t1", "0.20");
    flush_debit(&db, AP, 10 * CENT, 3);
    let first = events(AP);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["type"], "wallet.low_balance");
    assert_eq!(first[0]["data"]["balance"], "0.50000");
    // A top-up back above the threshold re-arms; the next crossing fires again,
    // now as a recharge request since the account turned auto-recharge on.
    top_up("t2", "1.00");
    let (s, v) = api.call(
        "PUT",
        &format!("/admin/accounts/{AP}/auto-recharge"),
        ADMIN_TOKEN,
        Some(json!({"threshold": "1.00", "amount": "10.00"})),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["auto_recharge"],
        json!({"enabled": true, "threshold": "1.00000", "amount": "10.00000"})
    );
    flush_debit(&db, AP, 100 * CENT, 4);
    let all = events(AP);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[1]["type"], "wallet.recharge_requested");
    assert_eq!(all[1]["data"]["amount"], "10.00000");
    assert_ne!(all[0]["id"], all[1]["id"]);
    assert_eq!(api.wallet(AP_KEY)["auto_recharge"]["enabled"], true);
    // Bad settings are refused by name.
    let (s, e) = api.call(
        "PUT",
        &format!("/admin/accounts/{AP}/auto-recharge"),
        ADMIN_TOKEN,
        Some(json!({"threshold": "-1", "amount": "10.00"})),
    );
    assert_eq!(
        (s, &e["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("threshold"))
    );
}

#[test]
fn sqlite_low_balance_once_per_crossing() {
    low_balance_once_per_crossing(&TestStore::sqlite());
}

#[test]
fn postgres_low_balance_once_per_crossing() {
    if let Some(base) = postgres_base() {
        low_balance_once_per_crossing(&TestStore::postgres(&base));
    }
}

fn store_balance(url: &str, sid: &str) -> Option<i64> {
    Store::open(url)
        .unwrap()
        .with_conn(|c| c.wallet_balance(sid))
        .unwrap()
}

#[test]
fn sqlite_holds_and_top_ups_over_http() {
    holds_and_top_ups_over_http(&TestStore::sqlite());
}

#[test]
fn postgres_holds_and_top_ups_over_http() {
    if let Some(base) = postgres_base() {
        holds_and_top_ups_over_http(&TestStore::postgres(&base));
    }
}

/// The wallet endpoints answer recently authenticated keys from memory; a
/// change made through the admin API applies to the very next request.
#[test]
fn admin_changes_apply_to_the_next_hold() {
    let (_store, _, _server, api) = sqlite_api();
    let (s, key) = api.call(
        "POST",
        &format!("/admin/accounts/{CB}/api-keys"),
        ADMIN_TOKEN,
        Some(json!({"key": "cb_second_key_0003"})),
    );
    assert_eq!(s, StatusCode::CREATED, "{key}");
    assert_eq!(api.hold("cb_second_key_0003", "CA1").0, StatusCode::CREATED);
    // The limit of two concurrent calls lowered to one: the second hold is
    // refused for the limit (under the old limit it would be for the balance,
    // 402: $5.00 holds one $3.00 hold).
    let limits = json!({"numbers": 10, "messages_per_month": 100, "voice_minutes_per_month": 100,
        "max_call_duration_minutes": 60, "concurrent_calls": 1});
    let (s, v) = api.call(
        "PATCH",
        &format!("/admin/accounts/{CB}"),
        ADMIN_TOKEN,
        Some(json!({ "limits": limits })),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        api.hold("cb_second_key_0003", "CA2").0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The key revoked: refused at once.
    let path = format!(
        "/admin/accounts/{CB}/api-keys/{}",
        key["key_id"].as_str().unwrap()
    );
    assert_eq!(
        api.call("DELETE", &path, ADMIN_TOKEN, None).0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.call("DELETE", "/v1/holds/CA1", "cb_second_key_0003", None)
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call("DELETE", "/v1/holds/CA1", CB_KEY, None).0,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------
// End to end: the real binary, a real broker, SIGKILL mid-run.

const TOPIC: &str = "cdrs";
const ACCOUNTS: usize = 4;
const ROUNDS: usize = 60;
/// Hold of a 10-minute call at CallingBox's $0.05/min.
const HOLD: i64 = 50 * CENT;

fn e2e_sid(i: usize) -> String {
    format!("AC{:032x}", 0xe2e0 + i)
}

fn e2e_key(i: usize) -> String {
    format!("e2e_key_{i:04}")
}

#[derive(Default)]
struct Expect {
    /// Per account: starting credit + top-ups − CDR prices.
    balance: Vec<i64>,
    /// Per account: holds left reserved.
    held: Vec<i64>,
    /// Per account: distinct top-up keys.
    credits: Vec<usize>,
    holds: Vec<(usize, String, Fate)>,
    messages: u64,
}

/// Sends a request until the daemon answers it with something other than a
/// 5xx (it is being killed and restarted meanwhile).
fn send(
    http: &Client,
    port: &std::sync::atomic::AtomicU16,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let url = format!(
            "http://127.0.0.1:{}{path}",
            port.load(std::sync::atomic::Ordering::Acquire)
        );
        let req = match method {
            "GET" => http.get(url),
            "POST" => http.post(url),
            _ => http.delete(url),
        }
        .bearer_auth(key)
        .timeout(Duration::from_secs(5));
        let req = match &body {
            Some(b) => req.json(b),
            None => req,
        };
        if let Ok(r) = req.send() {
            let status = r.status();
            if !status.is_server_error() {
                let v = r.json().unwrap_or(Value::Null);
                return (status, v);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{method} {path}: no answer for 4 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The switch's side: holds, the CDRs of their calls, releases, top-ups (some
/// sent twice) and usage without holds, while the daemon is killed.
fn drive(
    brokers: &str,
    port: &std::sync::atomic::AtomicU16,
    progress: &std::sync::atomic::AtomicUsize,
) -> Expect {
    use rand::{Rng, SeedableRng};
    let http = Client::new();
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let mut e = Expect {
        balance: vec![500 * CENT; ACCOUNTS],
        held: vec![0; ACCOUNTS],
        credits: vec![0; ACCOUNTS],
        ..Expect::default()
    };
    for round in 0..ROUNDS {
        progress.store(round, std::sync::atomic::Ordering::Release);
        for a in 0..ACCOUNTS {
            let (sid, key) = (e2e_sid(a), e2e_key(a));
            let call_id = format!("CA{a}-{round}");
            let (s, h) = send(
                &http,
                port,
                "POST",
                "/v1/holds",
                &key,
                Some(json!({"call_id": call_id})),
            );
            match s {
                StatusCode::CREATED | StatusCode::OK => {
                    assert_eq!(h["amount"], "0.50000", "{h}");
                    let fate = Fate::draw(&mut rng, 1..=600);
                    if let Some(cdr) = fate.cdr(&call_id, &sid) {
                        support::produce_one(&producer, TOPIC, &sid, &cdr, None);
                        e.messages += 1;
                    }
                    match fate {
                        Fate::Answered(b) => e.balance[a] -= support::callingbox_price(b),
                        Fate::NoAnswer => {}
                        Fate::Released => {
                            let (s, r) = send(
                                &http,
                                port,
                                "DELETE",
                                &format!("/v1/holds/{call_id}"),
                                &key,
                                None,
                            );
                            assert_eq!(
                                (s, &r["status"]),
                                (StatusCode::OK, &json!("released")),
                                "{r}"
                            );
                        }
                        Fate::Kept => e.held[a] += HOLD,
                    }
                    e.holds.push((a, call_id, fate));
                }
                StatusCode::PAYMENT_REQUIRED => assert_eq!(h["code"], "calls_paused"),
                other => panic!("hold {call_id}: {other} {h}"),
            }
            // Usage without a hold: an SMS ($0.02).
            if rng.gen_bool(0.3) {
                let sms = json!({"id": format!("SM{a}-{round}"), "account_sid": sid, "kind": "sms",
                    "timestamp": chrono::Utc::now().to_rfc3339(), "direction": "outbound"});
                support::produce_one(&producer, TOPIC, &sid, &sms.to_string(), None);
                e.balance[a] -= 2 * CENT;
                e.messages += 1;
            }
            if round % 3 == a % 3 {
                // A top-up, and now and then the previous one again.
                let k = round / 3;
                let path = format!("/admin/accounts/{sid}/credits");
                let body = json!({"amount": "1.00", "idempotency_key": format!("top-{k}")});
                let (s, r) = send(&http, port, "POST", &path, ADMIN_TOKEN, Some(body));
                assert_eq!(s, StatusCode::CREATED, "{r}");
                e.balance[a] += 100 * CENT;
                e.credits[a] += 1;
                if k > 0 && rng.gen_bool(0.5) {
                    let again =
                        json!({"amount": "1.00", "idempotency_key": format!("top-{}", k - 1)});
                    let (s, r) = send(&http, port, "POST", &path, ADMIN_TOKEN, Some(again));
                    assert_eq!(
                        (s, &r["credited"]),
                        (StatusCode::CREATED, &json!(false)),
                        "{r}"
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
    }
    progress.store(ROUNDS, std::sync::atomic::Ordering::Release);
    e
}

fn spawn(t: &support::Tansu, url: &str, log: &Path, port: u16) -> support::Daemon {
    let listen = format!("127.0.0.1:{port}");
    support::Daemon::spawn_with(
        &t.brokers(),
        url,
        "g-wallet",
        log,
        &[
            ("TALLYD_HTTP__LISTEN", listen.as_str()),
            ("TALLYD_API__ADMIN_TOKEN", ADMIN_TOKEN),
            ("TALLYD_RATING__DEFAULT_PLAN", "callingbox"),
        ],
    )
}

fn exact_across_sigkill(url: &str) {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    let dir = support::test_dir();
    let log = dir.path().join("tallyd.log");
    let t = support::Tansu::start();
    t.create_topic(TOPIC, 4);
    t.create_topic("cdrs-dead-letter", 1);
    let port = AtomicU16::new(support::free_port());
    let mut d = spawn(&t, url, &log, port.load(Ordering::Relaxed));
    let http = Client::new();
    for a in 0..ACCOUNTS {
        let limits = json!({"max_call_duration_minutes": 10, "concurrent_calls": 100});
        let (s, r) = send(
            &http,
            &port,
            "POST",
            "/admin/accounts",
            ADMIN_TOKEN,
            Some(json!({"sid": e2e_sid(a), "limits": limits})),
        );
        assert_eq!(s, StatusCode::CREATED, "{r}");
        let (s, r) = send(
            &http,
            &port,
            "POST",
            &format!("/admin/accounts/{}/api-keys", e2e_sid(a)),
            ADMIN_TOKEN,
            Some(json!({"key": e2e_key(a)})),
        );
        assert_eq!(s, StatusCode::CREATED, "{r}");
    }
    let progress = AtomicUsize::new(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let expect = std::thread::scope(|s| {
        let driver = s.spawn(|| drive(&t.brokers(), &port, &progress));
        // Kill -9 at three moments of the run, each time once the previous
        // instance consumes; the next one listens on another port.
        for at in [ROUNDS / 6, ROUNDS / 2, 5 * ROUNDS / 6] {
            support::wait_until("the driver's progress", Duration::from_secs(600), || {
                progress.load(Ordering::Acquire) >= at || driver.is_finished()
            });
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
            d.kill9();
            port.store(support::free_port(), Ordering::Release);
            d = spawn(&t, url, &log, port.load(Ordering::Relaxed));
        }
        driver.join().unwrap()
    });
    support::wait_flushed(url, TOPIC, expect.messages, Duration::from_secs(240), &log);
    // Everything consumed is flushed: the wallets over HTTP and in the store.
    let held_total: i64 = expect.held.iter().sum();
    for a in 0..ACCOUNTS {
        let (sid, key) = (e2e_sid(a), e2e_key(a));
        let mut last = Value::Null;
        let want = (
            decimal(expect.balance[a]),
            decimal(expect.held[a]),
            decimal(expect.balance[a] - expect.held[a]),
        );
        support::wait_until(
            &format!("wallet {sid} to be {want:?}"),
            Duration::from_secs(30),
            || {
                last = send(&http, &port, "GET", "/v1/wallet", &key, None).1;
                (
                    last["balance"].as_str(),
                    last["held"].as_str(),
                    last["available"].as_str(),
                ) == (
                    Some(want.0.as_str()),
                    Some(want.1.as_str()),
                    Some(want.2.as_str()),
                )
            },
        );
        let n: i64 = Store::open(url)
            .unwrap()
            .with_conn(|c| {
                Ok(c.query(
                    "SELECT COUNT(*) FROM wallet_credits WHERE account_sid = $1",
                    &[tallyd::store::Param::Text(&sid)],
                )?[0][0]
                    .int())
            })
            .unwrap();
        assert_eq!(n as usize, expect.credits[a], "top-ups of {sid}");
    }
    assert!(held_total > 0, "the run keeps some holds reserved");
    for (a, call_id, fate) in &expect.holds {
        let (s, b) = send(
            &http,
            &port,
            "GET",
            &format!("/v1/calls/{call_id}/billing"),
            &e2e_key(*a),
            None,
        );
        assert_eq!(s, StatusCode::OK, "granted hold {call_id} lost: {b}");
        let (status, billsec, charged) = fate.billing();
        let want = json!({"reservation_status": status,
            "billed_duration_seconds": billsec, "billing_amount_milli_cents": charged});
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&b[k], v, "{call_id} ({fate:?}): {k} in {b}");
        }
    }
    d.stop();
    // After a clean stop the store alone has the exact balances.
    for a in 0..ACCOUNTS {
        assert_eq!(
            store_balance(url, &e2e_sid(a)),
            Some(expect.balance[a]),
            "stored balance of account {a}"
        );
    }
    support::assert_offsets(url, TOPIC, expect.messages);
}

fn decimal(m: i64) -> String {
    tallyd::wallet::decimal(m)
}

#[test]
fn sqlite_wallets_exact_across_sigkill() {
    let dir = support::test_dir();
    exact_across_sigkill(&format!("sqlite://{}/tallyd.db", dir.path().display()));
}

#[test]
fn postgres_wallets_exact_across_sigkill() {
    if postgres_base().is_some() {
        let pg = support::PgSchema::new("wallet");
        exact_across_sigkill(&pg.url);
    }
}
