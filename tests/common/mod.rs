//! Shared set-up of the API tests: a store (temp SQLite file or a fresh
//! PostgreSQL schema) filled from real CDRs through the rating pipeline, and the
//! API served on 127.0.0.1:0.

#![allow(dead_code)]

use std::path::Path;

use serde_json::json;
use tallyd::api::{router, ApiState};
use tallyd::calendar::Day;
use tallyd::config::Config;
use tallyd::counters::UsageCounters;
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

/// The shipped config with this store and the test accounts.
pub fn config(url: &str) -> (Config, Tariff) {
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
    let counters = UsageCounters::new(4);
    let mut seen = DedupWindow::new(Day(0));
    let mut counted = 0;
    for c in cdrs {
        match ingest(c.as_bytes(), tariff, &counters, &mut seen) {
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
    rt.spawn(async move { axum::serve(listener, router(state)).await });
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
