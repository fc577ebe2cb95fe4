//! The HTTP edge of the real `tallyd run` binary, as an attacker and an
//! operator meet it: credentials that stay revoked across a restart,
//! connections that cannot starve the server, bad input that never gets a 500,
//! secrets that stay out of logs and listings, throttled guessing, JSON errors
//! everywhere, and Twilio paging details. Each test runs over SQLite and over
//! PostgreSQL where the store matters.
//!
//! `TALLYD_TEST_BIN=/path/to/tallyd` runs these tests against another build.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use reqwest::blocking::Client;
use serde_json::{json, Value};

/// The store filled with the scenario; returns its URL for the binary.
fn filled(store: &TestStore) -> String {
    let (cfg, tariff) = config(&store.url());
    // Creates the tables and seeds the accounts, as the daemon would.
    let handle = tallyd::store::Store::open(&cfg.store.url).unwrap();
    drop(tallyd::api::ApiState::seeded(&cfg, &tariff, handle).unwrap());
    flush_cdrs(&store.url(), &tariff, &scenario_cdrs(), AS_OF);
    store.url()
}

/// ERROR lines of the HTTP side (Kafka is unreachable on purpose in these
/// tests, and says so).
fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("ERROR") && (l.contains("tallyd::api") || l.contains("tallyd::http"))
        })
        .collect()
}

// Item 1: a token rotated and a key revoked through the admin API stay so
// after a restart, although the config still declares them.
both_stores!(
    revocations_stay_revoked_across_a_restart,
    filled,
    |url: &str| {
        use reqwest::Method;
        let t = Tallyd::start(url, &[]);
        let own = records_url(&t.base, PARENT, ".json?Category=calls");
        assert_eq!(get_basic(&own, PARENT, PARENT_TOKEN).status(), 200);
        let usage = format!("{}/v1/usage", t.base);
        assert_eq!(get_bearer(&usage, PARENT_KEY).status(), 200);
        let (st, rotated) = json_of(admin(
            &t.base,
            Method::PATCH,
            &format!("/accounts/{PARENT}"),
            Some(json!({"auth_token": "rotated-token-0001"})),
        ));
        assert_eq!(st, 200, "{rotated}");
        assert_eq!(rotated["auth_token"], "rotated-token-0001", "shown once");
        let key_id = tallyd::api::accounts::key_id(&tallyd::api::accounts::key_hash(PARENT_KEY));
        let del = admin(
            &t.base,
            Method::DELETE,
            &format!("/accounts/{PARENT}/api-keys/{key_id}"),
            None,
        );
        assert_eq!(del.status(), 204);
        t.stop();

        let t = Tallyd::start(url, &[]);
        let own = records_url(&t.base, PARENT, ".json?Category=calls");
        assert_eq!(get_basic(&own, PARENT, PARENT_TOKEN).status(), 401);
        assert_eq!(get_basic(&own, PARENT, "rotated-token-0001").status(), 200);
        let usage = format!("{}/v1/usage", t.base);
        assert_eq!(get_bearer(&usage, PARENT_KEY).status(), 401);
        let log = t.stop();
        assert!(
            log.contains("differs from its config entry") && log.contains(PARENT),
            "the operator is told the config entry was not applied:\n{log}"
        );
    }
);

/// Opens `n` connections to `port`: the first half silent, the second half
/// after half a request header. Returns those that connected.
fn hold_connections(port: u16, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // A server that no longer accepts fills its backlog; connects then hang.
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            continue;
        };
        if i >= n / 2 {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        }
        held.push(s);
    }
    held
}

/// Raises this test process's open-file limit to its hard limit.
fn raise_own_file_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur
}

// Item 2: thousands of idle and half-sent connections to a daemon allowed 1,024
// open files; /healthz and the usage API still answer at once (the header-read
// timeout is set long so that it is not what saves them).
#[test]
fn idle_and_half_sent_connections_do_not_starve_the_server() {
    let limit = raise_own_file_limit();
    let n = 3000usize.min(limit as usize - 200);
    assert!(
        n >= 2000,
        "the test needs ~3000 sockets; open-file limit {limit}"
    );
    let store = TestStore::sqlite();
    filled(&store);
    let t = Tallyd::start_limited(
        &store.url(),
        &[("TALLYD_HTTP__HEADER_READ_TIMEOUT_SECS", "120")],
        Some(1024),
    );
    let held = hold_connections(t.port, n);
    assert!(held.len() >= 2000, "only {} connections opened", held.len());
    let started = Instant::now();
    let quick = Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = quick
        .get(format!("{}/healthz", t.base))
        .send()
        .expect("/healthz answers while thousands of idle sockets are held");
    assert_eq!(r.status(), 200);
    let r = quick
        .get(records_url(&t.base, PARENT, ".json?Category=calls"))
        .basic_auth(PARENT, Some(PARENT_TOKEN))
        .send()
        .expect("the usage API answers while thousands of idle sockets are held");
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(10));
    let metrics = quick
        .get(format!("{}/metrics", t.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("tallyd_http_connections_evicted_total"),
        "{metrics}"
    );
    drop(held);
    t.stop();
}

// Item 2: a half-sent header and a silent connection are closed after
// http.header_read_timeout_secs; a request slower than
// http.request_timeout_secs to send its body gets a JSON 408.
#[test]
fn slow_clients_are_timed_out() {
    let store = TestStore::sqlite();
    filled(&store);
    let t = Tallyd::start(
        &store.url(),
        &[
            ("TALLYD_HTTP__HEADER_READ_TIMEOUT_SECS", "1"),
            ("TALLYD_HTTP__REQUEST_TIMEOUT_SECS", "2"),
        ],
    );
    let closed_within = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    };
    let silent = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    let (took, _) = closed_within(silent);
    assert!(
        took < Duration::from_secs(5),
        "silent connection open {took:?}"
    );
    let mut half = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (took, _) = closed_within(half);
    assert!(
        took < Duration::from_secs(5),
        "half-sent header open {took:?}"
    );
    // Headers complete, body never comes.
    let mut slow = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    write!(
        slow,
        "POST /admin/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .unwrap();
    let (took, answer) = closed_within(slow);
    assert!(took < Duration::from_secs(8), "slow body open {took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    t.stop();
}

// Items 3 and 5: nothing a client sends gets a 500 or an ERROR log line;
// unauthenticated requests learn nothing about parameters; values are never
// echoed at length.
both_stores!(bad_input_gets_4xx_never_500, filled, |url: &str| {
    let t = Tallyd::start(url, &[]);
    let own = records_url(&t.base, PARENT, ".json");
    // A NUL in the Basic username: no valid credentials at all.
    twilio_error(get_basic(&own, "AC\u{0}x", PARENT_TOKEN), 401, 20003);
    twilio_error(
        get_basic(&own, &format!("{PARENT}\u{0}"), PARENT_TOKEN),
        401,
        20003,
    );
    // A NUL (and invalid UTF-8) in the path SID, with valid credentials.
    for sid in [
        "AC%00",
        "%00",
        "%ff%fe",
        "AC0000000000000000000000000000a00%00",
    ] {
        let url = format!("{}/2010-04-01/Accounts/{sid}/Usage/Records.json", t.base);
        twilio_error(get_basic(&url, PARENT, PARENT_TOKEN), 404, 20404);
        let url = format!(
            "{}/2010-04-01/Accounts/{sid}/Usage/Records/Daily.json",
            t.base
        );
        twilio_error(get_basic(&url, PARENT, PARENT_TOKEN), 404, 20404);
    }
    // Without credentials, a bad parameter is not looked at: 401, not 400.
    let bad = records_url(
        &t.base,
        PARENT,
        "/Daily.json?StartDate=yesterday&PageSize=-1",
    );
    twilio_error(client().get(&bad).send().unwrap(), 401, 20003);
    twilio_error(get_basic(&bad, PARENT, "wrong-token"), 401, 20003);
    for path in ["/v1/usage/daily?days=9999", "/v1/usage/by-agent?period=eon"] {
        api_error(
            client().get(format!("{}{path}", t.base)).send().unwrap(),
            401,
        );
    }
    // A NUL in admin JSON: 400 naming the field.
    for (field, body) in [
        ("friendly_name", json!({"friendly_name": "a\u{0}b"})),
        ("plan", json!({"plan": "\u{0}"})),
        ("auth_token", json!({"auth_token": "token\u{0}token"})),
    ] {
        let e = api_error(
            admin(&t.base, reqwest::Method::POST, "/accounts", Some(body)),
            400,
        );
        assert_eq!(e["param"], field, "{e}");
    }
    let e = api_error(
        admin(
            &t.base,
            reqwest::Method::POST,
            &format!("/accounts/{PARENT}/api-keys"),
            Some(json!({"key": "key\u{0}key-key"})),
        ),
        400,
    );
    assert_eq!(e["param"], "key", "{e}");
    // Admin paths with NULs are unknown accounts.
    api_error(
        admin(&t.base, reqwest::Method::GET, "/accounts/AC%00", None),
        404,
    );
    api_error(
        admin(
            &t.base,
            reqwest::Method::DELETE,
            &format!("/accounts/{PARENT}/api-keys/key_%00"),
            None,
        ),
        404,
    );
    // A long value is not echoed back.
    let long = "x".repeat(6_000);
    let r = get_basic(
        &records_url(&t.base, PARENT, &format!(".json?Category={long}")),
        PARENT,
        PARENT_TOKEN,
    );
    let msg = twilio_error(r, 400, 20001);
    assert!(msg.len() < 2000, "{} bytes of error message", msg.len());
    let r = get_basic(&own, &"AC".repeat(5_000), PARENT_TOKEN);
    assert_eq!(r.status(), 401);
    assert!(r.text().unwrap().len() < 1000);
    let log = t.stop();
    assert_eq!(error_lines(&log), Vec::<&str>::new(), "{log}");
});

// Item 4: listings never show auth tokens; a key cannot be moved to another
// account; the store URL's password is kept out of logs and errors.
both_stores!(secrets_are_not_listed_or_moved, filled, |url: &str| {
    use reqwest::Method;
    let t = Tallyd::start(url, &[]);
    let (st, list) = json_of(admin(&t.base, Method::GET, "/accounts", None));
    assert_eq!(st, 200);
    let text = list.to_string();
    for token in [PARENT_TOKEN, SUB_TOKEN, OTHER_TOKEN] {
        assert!(!text.contains(token), "{text}");
    }
    assert!(list["accounts"][0].get("auth_token").is_none(), "{list}");
    let (_, one) = json_of(admin(
        &t.base,
        Method::GET,
        &format!("/accounts/{PARENT}"),
        None,
    ));
    assert!(one.get("auth_token").is_none(), "{one}");
    // Created: the token is shown that once.
    let (st, created) = json_of(admin(&t.base, Method::POST, "/accounts", Some(json!({}))));
    assert_eq!(st, 201);
    assert_eq!(created["auth_token"].as_str().unwrap().len(), 32);
    // PARENT's key registered again, to OTHER: refused, and it still reads PARENT.
    let e = api_error(
        admin(
            &t.base,
            Method::POST,
            &format!("/accounts/{OTHER}/api-keys"),
            Some(json!({"key": PARENT_KEY})),
        ),
        409,
    );
    assert!(!e["message"].as_str().unwrap().contains(PARENT_KEY), "{e}");
    api_error(
        admin(
            &t.base,
            Method::POST,
            &format!("/accounts/{PARENT}/api-keys"),
            Some(json!({"key": PARENT_KEY})),
        ),
        409,
    );
    let (_, usage) = json_of(
        client()
            .get(format!("{}/v1/usage", t.base))
            .bearer_auth(PARENT_KEY)
            .send()
            .unwrap(),
    );
    assert_eq!(
        usage["plan"]["name"], "agentphone",
        "still PARENT's: {usage}"
    );
    t.stop();
});

#[test]
fn the_store_password_stays_out_of_logs() {
    for (url, exits) in [
        // Unreachable: the daemon waits for it, saying why (until killed).
        (
            format!("postgres://tallyd:hunter2@127.0.0.1:{}/test", free_port()),
            false,
        ),
        // Not a URL the store can use: the start fails, saying why.
        (
            "postgres://tallyd:hunter2@127.0.0.1:notaport/test".to_owned(),
            true,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let bin = std::env::var("TALLYD_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tallyd").to_owned());
        let config = dir.path().join("tallyd.toml");
        std::fs::write(&config, config_text()).unwrap();
        let log = dir.path().join("tallyd.log");
        let mut child = std::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("TALLYD_STORE__URL", &url)
            .env("TALLYD_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
            .env(
                "TALLYD_KAFKA__BROKERS",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("RUST_LOG", "debug,librdkafka=off")
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !exits && text.contains("tallyd:***@") {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            assert!(Instant::now() < deadline, "{url}: nothing logged:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let all = std::fs::read_to_string(&log).unwrap();
        if exits {
            assert!(!status.unwrap().success(), "{all}");
        } else {
            assert!(
                status.is_none(),
                "a store that is down is waited for:\n{all}"
            );
        }
        assert!(
            all.contains("tallyd:***@"),
            "the URL is shown, redacted:\n{all}"
        );
        assert!(!all.contains("hunter2"), "{url}:\n{all}");
    }
}

// Item 5: failed authentications are throttled per client address: past the
// quota a client gets 429 with Retry-After (even with the right credentials,
// so throttled guesses learn nothing), and a metric counts them.
both_stores!(auth_failures_are_throttled, filled, |url: &str| {
    let t = Tallyd::start(url, &[("TALLYD_API__AUTH_FAILURES_PER_MINUTE", "5")]);
    let own = records_url(&t.base, PARENT, ".json?Category=calls");
    for _ in 0..5 {
        twilio_error(get_basic(&own, PARENT, "guess"), 401, 20003);
    }
    let r = get_basic(&own, PARENT, "guess");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    twilio_error(r, 429, 20429);
    twilio_error(get_basic(&own, PARENT, PARENT_TOKEN), 429, 20429);
    api_error(
        client()
            .get(format!("{}/v1/usage", t.base))
            .bearer_auth(PARENT_KEY)
            .send()
            .unwrap(),
        429,
    );
    api_error(admin(&t.base, reqwest::Method::GET, "/accounts", None), 429);
    let metrics = client()
        .get(format!("{}/metrics", t.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("tallyd_http_auth_failures_total{api=\"twilio\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(failures.ends_with(" 6"), "{failures}");
    assert!(
        metrics.contains("tallyd_http_auth_throttled_total{api=\"twilio\"} 1"),
        "{metrics}"
    );
    t.stop();
});

// Item 6: errors that do not come from a handler are JSON too, in the shape of
// the API their path belongs to.
both_stores!(framework_errors_are_json, filled, |url: &str| {
    let t = Tallyd::start(url, &[]);
    let own = records_url(&t.base, PARENT, ".json");
    let r = client()
        .post(&own)
        .basic_auth(PARENT, Some(PARENT_TOKEN))
        .send()
        .unwrap();
    assert!(r.headers()["allow"].to_str().unwrap().contains("GET"));
    twilio_error(r, 405, 20004);
    let r = client()
        .delete(format!("{}/v1/usage", t.base))
        .send()
        .unwrap();
    assert_eq!(api_error(r, 405)["code"], "method_not_allowed");
    twilio_error(
        get_basic(
            &format!("{}/2010-04-01/Nope.json", t.base),
            PARENT,
            PARENT_TOKEN,
        ),
        404,
        20404,
    );
    twilio_error(
        client().get(format!("{}/nope", t.base)).send().unwrap(),
        404,
        20404,
    );
    assert_eq!(
        api_error(
            client().get(format!("{}/v1/nope", t.base)).send().unwrap(),
            404
        )["code"],
        "not_found"
    );
    // 414, 431.
    let long = format!("{own}?x={}", "y".repeat(10_000));
    twilio_error(get_basic(&long, PARENT, PARENT_TOKEN), 414, 20414);
    let r = client()
        .get(&own)
        .basic_auth(PARENT, Some(PARENT_TOKEN))
        .header("X-Big", "z".repeat(20_000))
        .send()
        .unwrap();
    twilio_error(r, 431, 20431);
    let r = client()
        .get(format!("{}/v1/usage", t.base))
        .header("X-Big", "z".repeat(20_000))
        .send()
        .unwrap();
    assert_eq!(api_error(r, 431)["code"], "headers_too_large");
    // 413: a body over the admin API's limit.
    let r = client()
        .post(format!("{}/admin/accounts", t.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(format!(
            "{{\"friendly_name\": \"{}\"}}",
            "n".repeat(3 << 20)
        ))
        .send()
        .unwrap();
    assert_eq!(api_error(r, 413)["code"], "payload_too_large");
    // Bad percent-encoding in the query of an authenticated request.
    let r = get_basic(
        &records_url(&t.base, PARENT, "/Daily.json?StartDate=%ff%fe"),
        PARENT,
        PARENT_TOKEN,
    );
    twilio_error(r, 400, 20001);
    let log = t.stop();
    assert_eq!(error_lines(&log), Vec::<&str>::new(), "{log}");
});

// Item 10: admin input is checked field by field.
both_stores!(admin_input_is_validated, filled, |url: &str| {
    use reqwest::Method;
    let t = Tallyd::start(url, &[]);
    let post = |body: Value| admin(&t.base, Method::POST, "/accounts", Some(body));
    for (body, param) in [
        (json!({"limits": {"numbers": -1}}), "limits.numbers"),
        (
            json!({"limits": {"concurrent_calls": -5}}),
            "limits.concurrent_calls",
        ),
        (json!({"limits": {"numbers": "ten"}}), "limits.numbers"),
        (
            json!({"friendly_name": "n".repeat(1 << 20)}),
            "friendly_name",
        ),
        (json!({"friendly_name": ""}), "friendly_name"),
        (json!({"friendly_name": "line\nbreak"}), "friendly_name"),
        (json!({"plan": "p".repeat(100)}), "plan"),
        (json!({"sid": "AC\u{0}"}), "sid"),
        (json!({"parent_sid": 7}), "parent_sid"),
        (json!({"auth_token": "short"}), "auth_token"),
        (json!({"auth_token": "x".repeat(200)}), "auth_token"),
    ] {
        let e = api_error(post(body.clone()), 400);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().len() < 500, "{e}");
    }
    let e = api_error(
        admin(
            &t.base,
            Method::PATCH,
            &format!("/accounts/{PARENT}"),
            Some(json!({"limits": {"numbers": -3}})),
        ),
        400,
    );
    assert_eq!(e["param"], "limits.numbers");
    // One Bearer parser: any case of the scheme, extra spaces trimmed; nothing
    // else is a bearer token.
    let status = |path: &str, authorization: &str| {
        client()
            .get(format!("{}{path}", t.base))
            .header("authorization", authorization)
            .send()
            .unwrap()
            .status()
    };
    for (path, value, want) in [
        ("/admin/accounts", format!("Bearer {ADMIN_TOKEN}"), 200),
        ("/admin/accounts", format!("bearer {ADMIN_TOKEN}"), 200),
        ("/admin/accounts", format!("BEARER  {ADMIN_TOKEN} "), 200),
        ("/admin/accounts", format!("Basic {ADMIN_TOKEN}"), 401),
        ("/admin/accounts", format!("Bearer{ADMIN_TOKEN}"), 401),
        ("/admin/accounts", format!("Token {ADMIN_TOKEN}"), 401),
        ("/v1/usage", format!("bearer {PARENT_KEY}"), 200),
        ("/v1/usage", format!("BEARER  {PARENT_KEY} "), 200),
        ("/v1/usage", format!("Bearer{PARENT_KEY}"), 401),
    ] {
        assert_eq!(status(path, &value), want, "{path} {value}");
    }
    t.stop();
});

// Item 11: Twilio's paging and parameter details.
both_stores!(twilio_conformance, filled, |url: &str| {
    let t = Tallyd::start(url, &[]);
    let get = |rest: &str| {
        json_of(get_basic(
            &records_url(&t.base, PARENT, rest),
            PARENT,
            PARENT_TOKEN,
        ))
    };
    // PageSize above 1000 is served as 1000.
    let (st, page) = get("/Daily.json?StartDate=2024-01-01&EndDate=2025-02-01&PageSize=5000");
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["page_size"], 1000);
    assert_eq!(page["usage_records"].as_array().unwrap().len(), 1000);
    let next = page["next_page_uri"].as_str().unwrap();
    assert!(next.contains("PageSize=1000"), "{next}");
    // Every category of Twilio's list is accepted; those tallyd does not count
    // are zero.
    for category in [
        "phonenumbers",
        "recordings",
        "pfax-minutes",
        "trunking-origination",
        "calls-recordings",
    ] {
        let (st, page) = get(&format!(
            "/Daily.json?Category={category}&StartDate=2025-01-30&EndDate=2025-01-31"
        ));
        assert_eq!(st, 200, "{category}: {page}");
        assert_eq!(page["total"], 2, "{page}");
        let r = &page["usage_records"][0];
        assert_eq!(
            (
                r["category"].as_str(),
                r["count"].as_str(),
                r["usage"].as_str(),
                r["price"].as_str()
            ),
            (Some(category), Some("0"), Some("0"), Some("0")),
            "{r}"
        );
    }
    // Dates before year 1, and StartDate after EndDate, on every subresource.
    for sub in [
        ".json",
        "/Daily.json",
        "/Monthly.json",
        "/Yearly.json",
        "/AllTime.json",
        "/Today.json",
        "/Yesterday.json",
        "/ThisMonth.json",
        "/LastMonth.json",
    ] {
        for q in [
            "StartDate=-999999days",
            "StartDate=0000-06-01",
            "StartDate=2025-02-02&EndDate=2025-02-01",
            "StartDate=%2B3days",
        ] {
            let (st, body) = get(&format!("{sub}?{q}"));
            assert_eq!(st, 400, "{sub}?{q}: {body}");
            assert_eq!(body["code"], 20001);
        }
    }
    // Pages past the end.
    let (_, past) = get("/Daily.json?StartDate=2025-01-01&EndDate=2025-01-04&PageSize=10&Page=20");
    assert_eq!(past["usage_records"], json!([]));
    assert_eq!(
        (
            past["page"].as_u64(),
            past["start"].as_u64(),
            past["end"].as_u64()
        ),
        (Some(20), Some(200), Some(199))
    );
    assert_eq!(past["next_page_uri"], Value::Null);
    let prev = past["previous_page_uri"].as_str().unwrap();
    let (_, before) = json_of(get_basic(
        &format!("{}{prev}", t.base),
        PARENT,
        PARENT_TOKEN,
    ));
    assert_eq!(
        (
            before["page"].as_u64(),
            before["start"].as_u64(),
            before["end"].as_u64()
        ),
        (Some(19), Some(190), Some(189))
    );
    // The last real page: start and end agree with its records.
    let (_, last) = get("/Daily.json?StartDate=2025-01-01&EndDate=2025-01-04&PageSize=30&Page=3");
    assert_eq!(last["usage_records"].as_array().unwrap().len(), 10);
    assert_eq!(
        (last["start"].as_u64(), last["end"].as_u64()),
        (Some(90), Some(99))
    );
    // PageToken: opaque, and a tampered one is a 400.
    let (_, first) = get("/Daily.json?StartDate=2025-01-01&EndDate=2025-01-04&PageSize=30");
    let next = first["next_page_uri"].as_str().unwrap().to_owned();
    let token = next
        .split("PageToken=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    assert!(!token[2..].bytes().all(|b| b.is_ascii_digit()), "{token}");
    let (st, second) = json_of(get_basic(
        &format!("{}{next}", t.base),
        PARENT,
        PARENT_TOKEN,
    ));
    assert_eq!(st, 200);
    assert_eq!(second["start"], 30);
    let mut tampered = token.clone().into_bytes();
    let last_char = tampered.len() - 1;
    tampered[last_char] = if tampered[last_char] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = String::from_utf8(tampered).unwrap();
    let (st, body) = json_of(get_basic(
        &format!("{}{}", t.base, next.replace(&token, &tampered)),
        PARENT,
        PARENT_TOKEN,
    ));
    assert_eq!(st, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("PageToken"),
        "{body}"
    );
    // A token used on another listing.
    let (st, _) = get(&format!(
        "/Daily.json?StartDate=2025-01-01&EndDate=2025-01-05&PageSize=30&PageToken={token}"
    ));
    assert_eq!(st, 400);
    t.stop();
});
