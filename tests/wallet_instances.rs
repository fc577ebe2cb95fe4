//! Wallets across instances (docs/contract.md §4, "Across instances"): two
//! daemons in one consumer group on one PostgreSQL store and a real tansu
//! broker. Each wallet is answered by the instance that owns its account's
//! partition; the other forwards to it. Holds go alternately to both, CDRs
//! settle them, one instance is killed -9 mid-run: never overspent, and the
//! balances are exact once the survivor has taken the dead one's partitions.

mod common;
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::Fate;
use tallyd::partitioner::Partitioner;
use tallyd::store::{Param, Store};
use tallyd::wallet::CENT;

use common::{postgres_base, serve, TestStore, ADMIN_TOKEN};

const TOPIC: &str = "cdrs";
const PARTITIONS: u32 = 4;
const ACCOUNTS: usize = 6;
const ROUNDS: usize = 48;
/// Hold of a 10-minute call at CallingBox's $0.05/min.
const HOLD: i64 = 50 * CENT;
const START: i64 = 500 * CENT;

fn sid(i: usize) -> String {
    format!("AC{:032x}", 0x1e57_0000 + i)
}

fn key(i: usize) -> String {
    format!("inst_key_{i:04}")
}

fn decimal(m: i64) -> String {
    tallyd::wallet::decimal(m)
}

/// The two instances' HTTP ports and which are alive.
struct Instances {
    ports: [u16; 2],
    alive: [AtomicBool; 2],
}

impl Instances {
    fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[i])
    }
}

fn request(
    http: &Client,
    url: String,
    method: &str,
    key: &str,
    body: Option<&Value>,
) -> reqwest::Result<(StatusCode, Value)> {
    let req = match method {
        "GET" => http.get(url),
        "POST" => http.post(url),
        _ => http.delete(url),
    }
    .bearer_auth(key)
    .timeout(Duration::from_secs(10));
    let req = match body {
        Some(b) => req.json(b),
        None => req,
    };
    let r = req.send()?;
    let status = r.status();
    Ok((status, r.json().unwrap_or(Value::Null)))
}

/// Sends to instance `first` (the other if it is dead or answers a 5xx)
/// until an answer other than a 5xx comes (an instance answers 500 until
/// its store is migrated, 503 while a wallet's owner is away or moving).
fn send(
    http: &Client,
    inst: &Instances,
    first: usize,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i = first;
    loop {
        if inst.alive[i].load(Ordering::Acquire) {
            if let Ok((status, v)) = request(http, inst.url(i, path), method, key, body.as_ref()) {
                if !status.is_server_error() {
                    return (status, v);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{method} {path}: no answer for 2 minutes"
        );
        i = 1 - i;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(t: &support::Tansu, url: &str, log: &Path, port: u16) -> support::Daemon {
    let listen = format!("127.0.0.1:{port}");
    support::Daemon::spawn_with(
        &t.brokers(),
        url,
        "g-instances",
        log,
        &[
            ("TALLYD_HTTP__LISTEN", listen.as_str()),
            ("TALLYD_API__ADMIN_TOKEN", ADMIN_TOKEN),
            ("TALLYD_RATING__DEFAULT_PLAN", "callingbox"),
            ("TALLYD_KAFKA__PARTITIONER", "consistent_random"),
        ],
    )
}

/// partition → owner URL as the store records it.
fn owners(store: &Store) -> Vec<(i32, String)> {
    store
        .with_conn(|c| {
            Ok(c.query(
                "SELECT partition, owner FROM wallet_owners WHERE topic = $1 ORDER BY partition",
                &[Param::Text(TOPIC)],
            )?
            .iter()
            .map(|r| (r[0].int() as i32, r[1].text().to_owned()))
            .collect())
        })
        .unwrap()
}

/// Which instance owns account `a`'s wallet now.
fn owner_of(store: &Store, inst: &Instances, a: usize) -> usize {
    let p = Partitioner::ConsistentRandom
        .partition(sid(a).as_bytes(), PARTITIONS)
        .unwrap();
    let url = owners(store)
        .into_iter()
        .find(|(q, _)| *q == p)
        .map(|(_, u)| u)
        .expect("an owner");
    (0..2)
        .find(|&i| url == format!("http://127.0.0.1:{}", inst.ports[i]))
        .unwrap_or_else(|| panic!("owner {url} is neither instance"))
}

/// The labelled counter `name{outcome="…"}` of one instance.
fn outcome_metric(port: u16, name: &str, outcome: &str) -> f64 {
    support::metric(port, &format!("{name}{{outcome=\"{outcome}\"}}")).unwrap_or(0.0)
}

/// Waits until account `a`'s wallet, asked through instance `i`, is what
/// `book` says once every produced CDR is consumed.
fn wait_exact(http: &Client, inst: &Instances, i: usize, a: usize, book: &Book) {
    let balance = book.credits - book.charges;
    assert!(balance - book.reserved >= 0, "account {a} overspent");
    let want = (
        decimal(balance),
        decimal(book.reserved),
        decimal(balance - book.reserved),
    );
    let mut last = Value::Null;
    support::wait_until(
        &format!("wallet of account {a} to be {want:?} through instance {i}"),
        Duration::from_secs(60),
        || {
            last = send(http, inst, i, "GET", "/v1/wallet", &key(a), None).1;
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
}

/// Per account, what the driver knows was done.
#[derive(Default, Clone)]
struct Book {
    credits: i64,
    charges: i64,
    /// Holds granted whose CDR was not produced and that were not released.
    reserved: i64,
    /// Of those, the ones kept to the end.
    kept: i64,
    granted: Vec<(String, Fate)>,
}

impl Book {
    /// What is available if every produced CDR was consumed: the most the
    /// owner can have; a grant beyond it is an overspend.
    fn available(&self) -> i64 {
        self.credits - self.charges - self.reserved
    }
}

#[test]
fn postgres_wallets_across_two_instances_with_one_killed() {
    if postgres_base().is_none() {
        return;
    }
    use rand::{Rng, SeedableRng};
    let pg = support::PgSchema::new("instances");
    let url = pg.url.clone();
    let dir = support::test_dir();
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let t = support::Tansu::start();
    t.create_topic(TOPIC, PARTITIONS);
    t.create_topic("cdrs-dead-letter", 1);
    let inst = Instances {
        ports: [support::free_port(), support::free_port()],
        alive: [AtomicBool::new(true), AtomicBool::new(true)],
    };
    let mut daemons = [
        spawn(&t, &url, &logs[0], inst.ports[0]),
        spawn(&t, &url, &logs[1], inst.ports[1]),
    ];
    let http = Client::new();
    for a in 0..ACCOUNTS {
        let limits = json!({"max_call_duration_minutes": 10, "concurrent_calls": 100});
        let (s, r) = send(
            &http,
            &inst,
            a % 2,
            "POST",
            "/admin/accounts",
            ADMIN_TOKEN,
            Some(json!({"sid": sid(a), "limits": limits})),
        );
        assert_eq!(s, StatusCode::CREATED, "{r}");
        let (s, r) = send(
            &http,
            &inst,
            a % 2,
            "POST",
            &format!("/admin/accounts/{}/api-keys", sid(a)),
            ADMIN_TOKEN,
            Some(json!({"key": key(a)})),
        );
        assert_eq!(s, StatusCode::CREATED, "{r}");
    }
    // Both instances own partitions and have loaded them.
    let store = Store::open(&url).unwrap();
    let me = |i: usize| format!("http://127.0.0.1:{}", inst.ports[i]);
    support::wait_until(
        "both instances to own partitions",
        Duration::from_secs(90),
        || {
            let o = owners(&store);
            o.len() == PARTITIONS as usize
                && (0..2).all(|i| o.iter().any(|(_, u)| *u == me(i)))
                && (0..ACCOUNTS).all(|a| {
                    (0..2).all(|i| {
                        request(&http, inst.url(i, "/v1/wallet"), "GET", &key(a), None)
                            .is_ok_and(|(s, _)| s == StatusCode::OK)
                    })
                })
        },
    );
    let mut books = vec![
        Book {
            credits: START,
            ..Book::default()
        };
        ACCOUNTS
    ];

    // A hold sent to the instance that does not own the wallet is forwarded:
    // its answer is the owner's, byte for byte, and so are the wallet and the
    // call's billing.
    let mut owners_seen = [0; 2];
    for a in 0..ACCOUNTS {
        let owner = owner_of(&store, &inst, a);
        owners_seen[owner] += 1;
        let other = 1 - owner;
        let body = json!({"call_id": format!("probe-{a}")});
        let (s, first) = request(
            &http,
            inst.url(other, "/v1/holds"),
            "POST",
            &key(a),
            Some(&body),
        )
        .unwrap();
        assert_eq!(s, StatusCode::CREATED, "forwarded hold: {first}");
        assert_eq!(first["wallet"]["held"], decimal(HOLD), "{first}");
        let at_owner = request(
            &http,
            inst.url(owner, "/v1/holds"),
            "POST",
            &key(a),
            Some(&body),
        )
        .unwrap();
        let forwarded = request(
            &http,
            inst.url(other, "/v1/holds"),
            "POST",
            &key(a),
            Some(&body),
        )
        .unwrap();
        assert_eq!(at_owner.0, StatusCode::OK, "{}", at_owner.1);
        assert_eq!(
            forwarded, at_owner,
            "a repeated hold through the other instance"
        );
        for path in [
            "/v1/wallet".to_string(),
            format!("/v1/calls/probe-{a}/billing"),
        ] {
            let at_owner = request(&http, inst.url(owner, &path), "GET", &key(a), None).unwrap();
            let forwarded = request(&http, inst.url(other, &path), "GET", &key(a), None).unwrap();
            assert_eq!(at_owner.0, StatusCode::OK, "{path}: {}", at_owner.1);
            assert_eq!(forwarded, at_owner, "{path} through the other instance");
        }
        let (s, r) = request(
            &http,
            inst.url(other, &format!("/v1/holds/probe-{a}")),
            "DELETE",
            &key(a),
            None,
        )
        .unwrap();
        assert_eq!(
            (s, &r["status"]),
            (StatusCode::OK, &json!("released")),
            "{r}"
        );
        // A request that says it was forwarded is never forwarded again.
        let r = http
            .get(inst.url(other, "/v1/wallet"))
            .bearer_auth(key(a))
            .header("x-tallyd-forwarded-by", "http://127.0.0.1:1")
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"));
        let v: Value = r.json().unwrap();
        assert_eq!(v["error"]["code"], "owner_moving", "{v}");
    }
    assert!(
        owners_seen.iter().all(|&n| n > 0),
        "each instance owns some of the accounts: {owners_seen:?}"
    );
    let answered: f64 = (0..2)
        .map(|i| outcome_metric(inst.ports[i], "tallyd_wallet_forwarded_total", "answered"))
        .sum();
    assert!(
        answered >= 6.0 * ACCOUNTS as f64,
        "forwarded answers counted: {answered}"
    );

    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", t.brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut messages = 0u64;
    // A CDR on another partition than its key's is counted and reported.
    let stray = format!("AC{:032x}", 0x5_7a9);
    let right = Partitioner::ConsistentRandom
        .partition(stray.as_bytes(), PARTITIONS)
        .unwrap();
    let sms = json!({"id": "SM-stray", "account_sid": stray, "kind": "sms",
        "timestamp": chrono::Utc::now().to_rfc3339(), "direction": "outbound"});
    support::produce_one(
        &producer,
        TOPIC,
        &stray,
        &sms.to_string(),
        Some((right + 1) % PARTITIONS as i32),
    );
    messages += 1;
    support::wait_until(
        "the misplaced CDR to be counted",
        Duration::from_secs(30),
        || {
            (0..2)
                .filter_map(|i| {
                    support::metric(inst.ports[i], "tallyd_cdr_partition_mismatch_total")
                })
                .sum::<f64>()
                == 1.0
        },
    );

    // The run: holds alternately to both instances, their calls' CDRs,
    // releases and top-ups; instance 1 is killed -9 half-way, and comes back
    // three quarters in, once the survivor has taken its partitions and
    // answers every wallet exactly (a live rebalance while holds go on).
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut refused = 0;
    let mut turn = 0usize;
    for round in 0..ROUNDS {
        if round == ROUNDS / 2 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            inst.alive[1].store(false, Ordering::Release);
            daemons[1].kill9();
        }
        if round == 3 * ROUNDS / 4 {
            support::wait_until(
                "the survivor to own every partition",
                Duration::from_secs(60),
                || owners(&store).iter().all(|(_, u)| *u == me(0)),
            );
            for (a, book) in books.iter().enumerate() {
                wait_exact(&http, &inst, 0, a, book);
            }
            daemons[1] = spawn(&t, &url, &logs[1], inst.ports[1]);
            inst.alive[1].store(true, Ordering::Release);
        }
        for (a, book) in books.iter_mut().enumerate() {
            turn += 1;
            let (sid, key) = (sid(a), key(a));
            let call_id = format!("CA{a}-{round}");
            let (s, h) = send(
                &http,
                &inst,
                turn % 2,
                "POST",
                "/v1/holds",
                &key,
                Some(json!({"call_id": call_id})),
            );
            match s {
                StatusCode::CREATED => {
                    assert_eq!(h["amount"], decimal(HOLD), "{h}");
                    assert!(
                        !h["wallet"]["available"].as_str().unwrap().starts_with('-'),
                        "{h}"
                    );
                    book.reserved += HOLD;
                    assert!(
                        book.available() >= 0,
                        "{call_id} granted with {} available at most: overspent",
                        decimal(book.available() + HOLD)
                    );
                    let fate = Fate::draw(&mut rng, 200..=600);
                    if let Some(cdr) = fate.cdr(&call_id, &sid) {
                        support::produce_one(&producer, TOPIC, &sid, &cdr, None);
                        messages += 1;
                    }
                    match fate {
                        Fate::Answered(b) => {
                            book.reserved -= HOLD;
                            book.charges += support::callingbox_price(b);
                        }
                        Fate::NoAnswer => book.reserved -= HOLD,
                        Fate::Released => {
                            let (s, r) = send(
                                &http,
                                &inst,
                                (turn + 1) % 2,
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
                            book.reserved -= HOLD;
                        }
                        Fate::Kept => book.kept += HOLD,
                    }
                    book.granted.push((call_id, fate));
                }
                StatusCode::PAYMENT_REQUIRED => {
                    assert_eq!(h["code"], "calls_paused", "{h}");
                    refused += 1;
                }
                other => panic!("hold {call_id}: {other} {h}"),
            }
            if round % 12 == 11 {
                let path = format!("/admin/accounts/{sid}/credits");
                let body = json!({"amount": "1.00", "idempotency_key": format!("top-{round}")});
                let (s, r) = send(
                    &http,
                    &inst,
                    turn % 2,
                    "POST",
                    &path,
                    ADMIN_TOKEN,
                    Some(body.clone()),
                );
                assert_eq!(
                    (s, &r["credited"]),
                    (StatusCode::CREATED, &json!(true)),
                    "{r}"
                );
                book.credits += 100 * CENT;
                // The same key again through the other instance: credited once.
                let (s, r) = send(
                    &http,
                    &inst,
                    (turn + 1) % 2,
                    "POST",
                    &path,
                    ADMIN_TOKEN,
                    Some(body),
                );
                assert_eq!(
                    (s, &r["credited"]),
                    (StatusCode::CREATED, &json!(false)),
                    "{r}"
                );
            }
        }
    }
    assert!(refused > 0, "the run reaches the limit of some wallets");

    // Both instances again, each owning partitions: every wallet exact and
    // answered the same through either, every granted hold accounted for.
    support::wait_flushed(&url, TOPIC, messages, Duration::from_secs(120), &logs[0]);
    support::wait_until(
        "both instances to own partitions again",
        Duration::from_secs(90),
        || {
            let o = owners(&store);
            (0..2).all(|i| o.iter().any(|(_, u)| *u == me(i)))
        },
    );
    for (a, book) in books.iter().enumerate() {
        assert_eq!(book.reserved, book.kept, "only kept holds are left");
        wait_exact(&http, &inst, 0, a, book);
        let through = |i: usize| send(&http, &inst, i, "GET", "/v1/wallet", &key(a), None);
        assert_eq!(
            through(0),
            through(1),
            "wallet of account {a} through either instance"
        );
        for (n, (call_id, fate)) in book.granted.iter().enumerate() {
            let path = format!("/v1/calls/{call_id}/billing");
            let (s, b) = send(&http, &inst, n % 2, "GET", &path, &key(a), None);
            assert_eq!(s, StatusCode::OK, "granted hold {call_id} lost: {b}");
            let (status, _, charged) = fate.billing();
            assert_eq!(
                (
                    b["reservation_status"].as_str(),
                    b["billing_amount_milli_cents"].as_i64()
                ),
                (Some(status), Some(charged)),
                "{call_id} ({fate:?}): {b}"
            );
        }
    }
    daemons[1].stop();
    daemons[0].stop();
    // After a clean stop the store alone has the exact balances.
    for (a, book) in books.iter().enumerate() {
        let stored = store.with_conn(|c| c.wallet_balance(&sid(a))).unwrap();
        assert_eq!(
            stored,
            Some(book.credits - book.charges),
            "stored balance of account {a}"
        );
    }
    support::assert_offsets(&url, TOPIC, messages);
}

// ---------------------------------------------------------------------------
// Routing over HTTP against one API and a real store, no broker: who answers
// when the owner is unknown, away, loading, or has lost the partition.

const CB: &str = "AC00000000000000000000000000000c11";
const CB_KEY: &str = "cb_test_key_0001";

fn api_config(url: &str) -> (tallyd::config::Config, tallyd::rating::Tariff) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        r#"
[[api.accounts]]
sid = "{CB}"
auth_token = "cb-token-0123456789abcdef"
api_keys = ["{CB_KEY}"]
limits = {{ numbers = 10, messages_per_month = 100, voice_minutes_per_month = 100, max_call_duration_minutes = 10, concurrent_calls = 5 }}
"#
    ));
    let env = [
        ("TALLYD_STORE__URL".to_string(), url.to_string()),
        ("TALLYD_API__ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("TALLYD_HTTP__FORWARD_TIMEOUT_SECS".into(), "2".into()),
    ];
    tallyd::config::Config::from_toml(&text, &path, env).unwrap()
}

fn routing_over_http(store: &TestStore) {
    use std::sync::Arc;
    use tallyd::wallet::owners::Ownership;
    let (cfg, tariff) = api_config(&store.url());
    let me = "http://127.0.0.1:1";
    let ownership = Arc::new(Ownership::routed(TOPIC, Partitioner::ConsistentRandom, me));
    let st = Store::open(&cfg.store.url).unwrap();
    let state = tallyd::api::ApiState::seeded(&cfg, &tariff, st.clone())
        .unwrap()
        .with_ownership(ownership.clone());
    let server = serve(state.clone());
    let http = Client::new();
    let call = |method: &str, path: &str, key: &str, body: Option<Value>| {
        let url = format!("{}{path}", server.base);
        let req = match method {
            "GET" => http.get(url),
            "POST" => http.post(url),
            _ => http.delete(url),
        }
        .bearer_auth(key);
        let req = match &body {
            Some(b) => req.json(b),
            None => req,
        };
        let r = req.send().unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let status = r.status();
        let v: Value = r.json().unwrap_or(Value::Null);
        (
            status,
            v["error"]["code"].as_str().unwrap_or("").to_owned(),
            retry,
            v,
        )
    };
    let unavailable = |code: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            code.to_owned(),
            Some("1".to_owned()),
        )
    };
    let head = |r: (StatusCode, String, Option<String>, Value)| (r.0, r.1, r.2);
    // The partition count is not known yet: nobody can tell the owner.
    assert_eq!(
        head(call("GET", "/v1/wallet", CB_KEY, None)),
        unavailable("owner_unknown")
    );
    ownership.set_partitions(PARTITIONS);
    let p = Partitioner::ConsistentRandom
        .partition(CB.as_bytes(), PARTITIONS)
        .unwrap();
    // No instance has claimed the partition.
    assert_eq!(
        head(call("GET", "/v1/wallet", CB_KEY, None)),
        unavailable("owner_unknown")
    );
    // Claimed by an instance that does not answer.
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    st.with_conn(|c| c.claim_partitions(TOPIC, &[p], &dead))
        .unwrap();
    let hold = json!({"call_id": "CA1"});
    assert_eq!(
        head(call("POST", "/v1/holds", CB_KEY, Some(hold.clone()))),
        unavailable("owner_unavailable")
    );
    // Claimed by this instance, whose load has not published it yet.
    let epochs = st
        .with_conn(|c| c.claim_partitions(TOPIC, &[p], me))
        .unwrap();
    assert_eq!(epochs, [(p, 2)], "each claim takes the next epoch");
    assert_eq!(
        head(call("POST", "/v1/holds", CB_KEY, Some(hold.clone()))),
        unavailable("owner_moving")
    );
    // Owned and loaded: answered here.
    ownership.own(&epochs);
    let (s, _, _, h) = call("POST", "/v1/holds", CB_KEY, Some(hold));
    assert_eq!(s, StatusCode::CREATED, "{h}");
    // Another instance takes the partition; this one has not heard of it
    // yet. Its writes are fenced: nothing granted, released or credited.
    st.with_conn(|c| c.claim_partitions(TOPIC, &[p], &dead))
        .unwrap();
    let sid = tallyd::cdr::AccountSid::parse(CB).unwrap();
    let before = state.wallets().wallet(sid).view();
    assert_eq!(
        head(call(
            "POST",
            "/v1/holds",
            CB_KEY,
            Some(json!({"call_id": "CA2"}))
        )),
        unavailable("owner_moving")
    );
    assert_eq!(
        state.wallets().wallet(sid).view(),
        before,
        "the fenced hold is taken back"
    );
    assert!(state.wallets().hold(sid, "CA2").is_none());
    assert_eq!(st.with_conn(|c| c.hold(CB, "CA2")).unwrap(), None);
    let credit = json!({"amount": "1.00", "idempotency_key": "k1"});
    let path = format!("/admin/accounts/{CB}/credits");
    assert_eq!(
        head(call("POST", &path, ADMIN_TOKEN, Some(credit))),
        unavailable("owner_moving")
    );
    assert_eq!(
        st.with_conn(|c| c.wallet_balance(CB)).unwrap(),
        None,
        "no top-up written"
    );
    assert_eq!(
        head(call("DELETE", "/v1/holds/CA1", CB_KEY, None)),
        unavailable("owner_moving")
    );
    let stored = st.with_conn(|c| c.hold(CB, "CA1")).unwrap().unwrap();
    assert_eq!(
        stored.status.as_str(),
        "reserved",
        "the release was not written"
    );
}

#[test]
fn sqlite_routing_over_http() {
    routing_over_http(&TestStore::sqlite());
}

#[test]
fn postgres_routing_over_http() {
    if let Some(base) = postgres_base() {
        routing_over_http(&TestStore::postgres(&base));
    }
}

/// The fence against a stale owner, with the two instances' store
/// connections interleaved: a new owner's claim waits for a hold the old
/// owner is writing under its epoch and then loads it; once the claim is in,
/// the old owner's next write is refused.
fn a_claim_waits_for_the_old_owners_write_then_fences_it(store: &TestStore) {
    use std::sync::mpsc;
    use tallyd::store::wallet::{Fence, StoredHold};
    use tallyd::wallet::HoldStatus;
    let st = Store::open(&store.url()).unwrap();
    st.migrate().unwrap();
    let epochs = st
        .with_conn(|c| c.claim_partitions(TOPIC, &[2], "http://old"))
        .unwrap();
    let old = Fence {
        topic: TOPIC.into(),
        partition: 2,
        epoch: epochs[0].1,
    };
    let hold = |call_id: &str| StoredHold {
        account_sid: CB.into(),
        call_id: call_id.into(),
        amount: HOLD,
        status: HoldStatus::Reserved,
        created_at: 1,
        expires_at: 2,
        billing: None,
    };
    let (locked_tx, locked) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let writer = {
        let (st, old, h) = (st.clone(), old.clone(), hold("CA-old"));
        std::thread::spawn(move || {
            st.with_conn(|c| {
                c.fenced(Some(&old), |c| {
                    locked_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    c.insert_hold(&h)
                })
            })
            .unwrap()
        })
    };
    locked.recv().unwrap();
    let (claimed_tx, claimed) = mpsc::channel();
    let claimer = {
        let st = st.clone();
        std::thread::spawn(move || {
            let epochs = st
                .with_conn(|c| c.claim_partitions(TOPIC, &[2], "http://new"))
                .unwrap();
            claimed_tx.send(()).unwrap();
            let holds = st.with_conn(|c| c.reserved_holds()).unwrap();
            (epochs, holds)
        })
    };
    assert!(
        claimed.recv_timeout(Duration::from_millis(500)).is_err(),
        "the claim waits while the old owner writes under its epoch"
    );
    go.send(()).unwrap();
    assert_eq!(
        writer.join().unwrap(),
        Some(None),
        "the old owner's hold is written"
    );
    let (epochs, holds) = claimer.join().unwrap();
    assert_eq!(epochs, [(2, old.epoch + 1)]);
    assert!(
        holds.iter().any(|h| h.call_id == "CA-old"),
        "the new owner loads what the old one wrote before its claim"
    );
    // Now the old owner is fenced: nothing it writes lands.
    let late = st
        .with_conn(|c| c.fenced(Some(&old), |c| c.insert_hold(&hold("CA-late"))))
        .unwrap();
    assert_eq!(late, None);
    assert_eq!(st.with_conn(|c| c.hold(CB, "CA-late")).unwrap(), None);
    // In a group commit, each hold is judged by its own fence.
    let new = Fence {
        epoch: old.epoch + 1,
        ..old.clone()
    };
    let batch = [
        (hold("CA-b1"), Some(old.clone())),
        (hold("CA-b2"), None),
        (hold("CA-b3"), Some(new)),
        (hold("CA-old"), Some(old.clone())),
    ];
    let found = st.with_conn(|c| c.insert_holds(&batch)).unwrap();
    assert_eq!(found[..3], [None, Some(None), Some(None)]);
    assert_eq!(found[3], None, "a fenced repeat is not looked up either");
    assert_eq!(st.with_conn(|c| c.hold(CB, "CA-b1")).unwrap(), None);
    assert_eq!(
        st.with_conn(|c| c.wallet_owner(TOPIC, 2)).unwrap(),
        Some(("http://new".to_string(), old.epoch + 1))
    );
}

#[test]
fn sqlite_a_claim_waits_for_the_old_owners_write_then_fences_it() {
    a_claim_waits_for_the_old_owners_write_then_fences_it(&TestStore::sqlite());
}

#[test]
fn postgres_a_claim_waits_for_the_old_owners_write_then_fences_it() {
    if let Some(base) = postgres_base() {
        a_claim_waits_for_the_old_owners_write_then_fences_it(&TestStore::postgres(&base));
    }
}
