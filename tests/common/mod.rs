//! Shared set-up of the API tests: a store (temp SQLite file or a fresh
//! PostgreSQL schema) filled from real CDRs through the rating pipeline, and the
//! API served on 127.0.0.1:0.

#![allow(dead_code)]

use std::path::Path;

use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tallyd::api::{router, ApiState};
use tallyd::calendar::Day;
use tallyd::config::Config;
use tallyd::counters::Deltas;
use tallyd::dedup::DedupWindow;
use tallyd::flush::expand::pages;
use tallyd::pipeline::{ingest, Outcome};
use tallyd::rating::Tariff;
use tallyd::store::{FlushBatch, FlushOutcome, Store};

pub const PARENT: &str = "AC0000000000000000000000000000a001";
pub const PARENT_TOKEN: &str = "parent-token-0123456789abcdef";
pub const SUB: &str = "AC0000000000000000000000000000b002";
pub const SUB_TOKEN: &str = "sub-token-0123456789abcdef";
pub const OTHER: &str = "AC0000000000000000000000000000c003";
pub const OTHER_TOKEN: &str = "other-token-0123456789abcdef";
pub const PARENT_KEY: &str = "ap_test_parent_key_0001";
pub const ADMIN_TOKEN: &str = "admin-secret-for-tests";

/// Declares `NAME::sqlite` and `NAME::postgres`: each makes a store of its kind,
/// turns it into the test's argument with `setup(&TestStore)`, and runs
/// `body(&argument)`. The PostgreSQL one is skipped with
/// `TALLYD_TEST_POSTGRES=skip`.
#[macro_export]
macro_rules! both_stores {
    ($name:ident, $setup:expr, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn sqlite() {
                let store = TestStore::sqlite();
                let arg = ($setup)(&store);
                ($body)(&arg);
            }
            #[test]
            fn postgres() {
                if let Some(base) = postgres_base() {
                    let store = TestStore::postgres(&base);
                    let arg = ($setup)(&store);
                    ($body)(&arg);
                }
            }
        }
    };
}

/// Where a test's store lives; dropped at the end of the test.
pub enum TestStore {
    Sqlite(tempfile::TempDir),
    Postgres { base: String, schema: String },
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "tallyd_test_{}_{}_{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The PostgreSQL server tests use; `TALLYD_TEST_POSTGRES=skip` turns those
/// tests off on machines without one.
pub fn postgres_base() -> Option<String> {
    if std::env::var("TALLYD_TEST_POSTGRES").as_deref() == Ok("skip") {
        eprintln!("TALLYD_TEST_POSTGRES=skip: not testing against PostgreSQL");
        return None;
    }
    Some(
        std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
    )
}

impl TestStore {
    pub fn sqlite() -> TestStore {
        TestStore::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A dedicated schema, so concurrent tests and runs never meet.
    pub fn postgres(base: &str) -> TestStore {
        let schema = unique_name();
        let mut c = postgres::Client::connect(base, postgres::NoTls).unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {base} ({e}); set TALLYD_TEST_POSTGRES_URL, or TALLYD_TEST_POSTGRES=skip")
        });
        c.batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
        TestStore::Postgres {
            base: base.to_owned(),
            schema,
        }
    }

    pub fn url(&self) -> String {
        match self {
            TestStore::Sqlite(dir) => format!("sqlite://{}", dir.path().join("t.db").display()),
            TestStore::Postgres { base, schema } => {
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options=-csearch_path%3D{schema}")
            }
        }
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let TestStore::Postgres { base, schema } = self {
            if let Ok(mut c) = postgres::Client::connect(base, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

/// The shipped config file's text with the test accounts added.
pub fn config_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        r#"
[[api.accounts]]
sid = "{PARENT}"
auth_token = "{PARENT_TOKEN}"
friendly_name = "Parent"
api_keys = ["{PARENT_KEY}"]

[[api.accounts]]
sid = "{SUB}"
auth_token = "{SUB_TOKEN}"
parent_sid = "{PARENT}"

[[api.accounts]]
sid = "{OTHER}"
auth_token = "{OTHER_TOKEN}"
plan = "pro"
limits = {{ numbers = 3, messages_per_month = 100, voice_minutes_per_month = 50, max_call_duration_minutes = 30, concurrent_calls = 2 }}
"#
    ));
    text
}

/// The shipped config with this store and the test accounts.
pub fn config(url: &str) -> (Config, Tariff) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let text = config_text();
    let env = [
        ("TALLYD_STORE__URL".to_string(), url.to_string()),
        (
            "TALLYD_API__ADMIN_TOKEN".to_string(),
            ADMIN_TOKEN.to_string(),
        ),
    ];
    Config::from_toml(&text, &path, env).unwrap()
}

/// A call CDR.
#[allow(clippy::too_many_arguments)]
pub fn call(
    id: &str,
    sid: &str,
    ts: &str,
    direction: &str,
    number_type: &str,
    status: &str,
    billsec: u32,
    mode: &str,
    phone: Option<&str>,
    agent: Option<&str>,
) -> String {
    let mut v = json!({
        "id": id, "account_sid": sid, "kind": "call", "timestamp": ts,
        "direction": direction, "number_type": number_type, "status": status,
        "duration": billsec + 10, "billsec": billsec, "mode": mode,
    });
    if let Some(p) = phone {
        v["phone_number"] = p.into();
    }
    if let Some(a) = agent {
        v["agent_id"] = a.into();
    }
    v.to_string()
}

/// An SMS CDR.
pub fn sms(
    id: &str,
    sid: &str,
    ts: &str,
    direction: &str,
    segments: u32,
    phone: Option<&str>,
    agent: Option<&str>,
) -> String {
    let mut v = json!({
        "id": id, "account_sid": sid, "kind": "sms", "timestamp": ts,
        "direction": direction, "segments": segments,
    });
    if let Some(p) = phone {
        v["phone_number"] = p.into();
    }
    if let Some(a) = agent {
        v["agent_id"] = a.into();
    }
    v.to_string()
}

/// Runs CDRs through the rating pipeline and writes them with the daemon's flush
/// writer ([`Store::write_flush`]): every row (day, month, year, all-time), the
/// by-number / by-agent breakdowns, and `last_flush`
/// = `as_of`. Returns how many CDRs were counted (duplicates are not).
pub fn flush_cdrs(url: &str, tariff: &Tariff, cdrs: &[String], as_of: &str) -> usize {
    let mut counters = Deltas::default();
    let mut seen = DedupWindow::new(Day(0));
    let mut counted = 0;
    for c in cdrs {
        match ingest(c.as_bytes(), tariff, &mut counters, &mut seen) {
            Ok(Outcome::Counted(_)) => counted += 1,
            Ok(Outcome::Duplicate) => {}
            Err(e) => panic!("test CDR rejected: {e:?}: {c}"),
        }
    }
    let batch = FlushBatch {
        as_of: as_of.to_owned(),
        pages: pages(vec![counters.take()], tariff),
        ..FlushBatch::default()
    };
    let store = Store::open(url).unwrap();
    assert_eq!(store.write_flush(&batch).unwrap(), FlushOutcome::Applied);
    counted
}

/// The API served on 127.0.0.1:0 by its own runtime, until dropped.
pub struct Server {
    pub base: String,
    _rt: tokio::runtime::Runtime,
}

pub fn serve(state: ApiState) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = tallyd::http::ServerLimits::from(&tallyd::config::HttpConfig::default());
    rt.spawn(tallyd::http::serve(
        listener,
        router(state),
        limits,
        std::future::pending(),
    ));
    Server {
        base: format!("http://{addr}"),
        _rt: rt,
    }
}

/// The scenario every API test reads: a parent with a subaccount, and an
/// unrelated account, with usage around a month boundary in 2025.
///
/// Prices (shipped `agentphone` plan: $0.13/min webhook, $0.22/min hosted,
/// per-second, 1¢ minimum; SMS $0.02 per segment):
///
/// | id | account | day | leaf | billed | price |
/// |---|---|---|---|---|---|
/// | p1 | parent | 01-30 | calls-outbound | 90 s | 0.195 |
/// | p1 again | parent | — | duplicate, not counted | | |
/// | p2 | parent | 01-31 | calls-inbound-local (hosted) | 30 s | 0.11 |
/// | p3 | parent | 02-01 | calls-inbound-mobile, no-answer | 0 s | 0 |
/// | p4 | parent | 02-01 | sms-outbound-longcode | 3 segments | 0.06 |
/// | p5 | parent | 02-02 | sms-inbound-longcode | 1 segment | 0.02 |
/// | p6 | parent | 02-02 | calls-outbound | 1 s | 0.01 (minimum) |
/// | s1 | sub | 01-30 | calls-outbound | 60 s | 0.13 |
/// | o1 | other | 01-30 | sms-outbound-longcode | 1 segment | 0.02 |
pub fn scenario_cdrs() -> Vec<String> {
    let n1 = Some("+14155550101");
    let n2 = Some("+14155550102");
    vec![
        call(
            "p1",
            PARENT,
            "2025-01-30T10:00:00Z",
            "outbound",
            "local",
            "completed",
            90,
            "webhook",
            n1,
            Some("agent-a"),
        ),
        call(
            "p1",
            PARENT,
            "2025-01-30T10:00:00Z",
            "outbound",
            "local",
            "completed",
            90,
            "webhook",
            n1,
            Some("agent-a"),
        ),
        call(
            "p2",
            PARENT,
            "2025-01-31T23:59:59Z",
            "inbound",
            "local",
            "completed",
            30,
            "hosted",
            n2,
            None,
        ),
        call(
            "p3",
            PARENT,
            "2025-02-01T00:00:00Z",
            "inbound",
            "mobile",
            "no-answer",
            0,
            "webhook",
            n1,
            Some("agent-a"),
        ),
        sms(
            "p4",
            PARENT,
            "2025-02-01T12:00:00Z",
            "outbound",
            3,
            n1,
            Some("agent-b"),
        ),
        sms(
            "p5",
            PARENT,
            "2025-02-02T08:00:00+02:00",
            "inbound",
            1,
            n2,
            None,
        ),
        call(
            "p6",
            PARENT,
            "2025-02-02T12:00:00Z",
            "outbound",
            "local",
            "completed",
            1,
            "webhook",
            n2,
            Some("agent-b"),
        ),
        call(
            "s1",
            SUB,
            "2025-01-30T11:00:00Z",
            "outbound",
            "local",
            "completed",
            60,
            "webhook",
            Some("+14155550199"),
            None,
        ),
        sms(
            "o1",
            OTHER,
            "2025-01-30T09:00:00Z",
            "outbound",
            1,
            Some("+14155550300"),
            None,
        ),
    ]
}

/// `last_flush` written by [`flush_cdrs`] in the scenario.
pub const AS_OF: &str = "2025-02-03T04:05:06Z";

/// A store of the given kind filled with the scenario, and the API over it with
/// the clock fixed at `now` (Unix seconds).
pub fn scenario(store: &TestStore, now: i64) -> (Server, ApiState) {
    let (cfg, tariff) = config(&store.url());
    let handle = Store::open(&cfg.store.url).unwrap();
    let state = ApiState::seeded(&cfg, &tariff, handle)
        .unwrap()
        .with_fixed_clock(now);
    let counted = flush_cdrs(&store.url(), &tariff, &scenario_cdrs(), AS_OF);
    assert_eq!(counted, 8, "the duplicate p1 is counted once");
    (serve(state.clone()), state)
}

/// 2025-02-02T15:00:00Z: "today" in the scenario.
pub const NOW: i64 = 1_738_508_400;

/// Makes sure `python3` can import `module`, installing
/// `tests/python/requirements.txt` with pip if it cannot.
pub fn ensure_python_requirements(module: &str) {
    use std::process::Command;
    let has = || {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has() {
        return;
    }
    let req = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/requirements.txt");
    let ok = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "-r", req])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok && has(),
        "python3 needs {module}: python3 -m pip install -r {req}"
    );
}

/// The real `tallyd run` binary serving the API over `store_url`, with the test
/// accounts and admin token, and Kafka pointed at a port where nothing listens
/// (the HTTP side does not need the broker). `TALLYD_TEST_BIN` runs another
/// build of the binary instead (e.g. an older one, to see a test fail there).
pub struct Tallyd {
    pub child: std::process::Child,
    pub base: String,
    pub port: u16,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Tallyd {
    pub fn start(store_url: &str, env: &[(&str, &str)]) -> Tallyd {
        Tallyd::start_limited(store_url, env, None)
    }

    /// As [`Tallyd::start`], with the process's open-file limit (soft and hard)
    /// set to `open_files`.
    pub fn start_limited(store_url: &str, env: &[(&str, &str)], open_files: Option<u64>) -> Tallyd {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tallyd.toml");
        std::fs::write(&config, config_text()).unwrap();
        let log = dir.path().join("tallyd.log");
        let port = free_port();
        let bin = std::env::var("TALLYD_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tallyd").to_owned());
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("TALLYD_STORE__URL", store_url)
            .env("TALLYD_API__ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TALLYD_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("TALLYD_KAFKA__BROKERS", format!("127.0.0.1:{}", free_port()))
            .env(
                "RUST_LOG",
                "info,librdkafka=off,rdkafka=off,tallyd::ingest=off,tallyd::dead_letter=off,postgres=warn",
            )
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(n) = open_files {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "tallyd exited with {st} before serving:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let ok = reqwest::blocking::Client::new()
                .get(format!("{base}/healthz"))
                .timeout(std::time::Duration::from_secs(2))
                .send()
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tallyd did not serve /healthz within 60 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Tallyd {
            child,
            base,
            port,
            log,
            _dir: dir,
        }
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(mut self) -> String {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tallyd did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "tallyd exited with {status}:\n{log}");
        log
    }
}

impl Drop for Tallyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with a timeout, so a server that hangs fails the test.
pub fn client() -> Client {
    Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn records_url(base: &str, sid: &str, rest: &str) -> String {
    format!("{base}/2010-04-01/Accounts/{sid}/Usage/Records{rest}")
}

pub fn get_basic(url: &str, user: &str, pass: &str) -> Response {
    client()
        .get(url)
        .basic_auth(user, Some(pass))
        .send()
        .unwrap()
}

pub fn get_bearer(url: &str, key: &str) -> Response {
    client().get(url).bearer_auth(key).send().unwrap()
}

/// A request to `/admin{path}` with the admin token.
pub fn admin(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Response {
    let mut r = client()
        .request(method, format!("{base}/admin{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().unwrap()
}

/// The status and JSON body of a response (which must be JSON).
pub fn json_of(r: Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text:?}"));
    (status, body)
}

/// Asserts a Twilio error body of `status` and `code`; returns its message.
pub fn twilio_error(r: Response, status: u16, code: u64) -> String {
    let (st, body) = json_of(r);
    assert_eq!(st.as_u16(), status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(
        body["more_info"],
        format!("https://www.twilio.com/docs/errors/{code}")
    );
    body["message"].as_str().unwrap().to_owned()
}

/// Asserts an AgentPhone-shaped error body of `status`; returns its `error`.
pub fn api_error(r: Response, status: u16) -> Value {
    let (st, body) = json_of(r);
    assert_eq!(st.as_u16(), status, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"].clone()
}
