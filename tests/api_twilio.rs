//! The Twilio Usage Records API read by the official Twilio Python helper
//! library (`tests/python/twilio_usage_check.py`), over SQLite and PostgreSQL.
//!
//! The expected values below are worked out by hand from the scenario's CDRs
//! (see `common::scenario_cdrs`), not read back from the pipeline.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn rec(
    category: &str,
    start: &str,
    end: &str,
    count: Option<&str>,
    usage: &str,
    price: &str,
) -> Value {
    json!({"category": category, "start_date": start, "end_date": end,
           "count": count, "usage": usage, "price": price})
}

fn expectations() -> Value {
    json!([
        {
            "name": "daily calls, parent with subaccount",
            "subresource": "daily",
            "params": {"category": "calls", "start_date": "2025-01-30", "end_date": "2025-02-02"},
            "total": 4,
            "records": [
                // p1 90 s + s1 60 s = 2.5 min; 0.195 + 0.13
                rec("calls", "2025-01-30", "2025-01-30", Some("2"), "2.5", "0.325"),
                rec("calls", "2025-01-31", "2025-01-31", Some("1"), "0.5", "0.11"),
                // unanswered: counted, not billed
                rec("calls", "2025-02-01", "2025-02-01", Some("1"), "0", "0"),
                // 1 s = 0.0167 min → 0.02; priced at the 1¢ minimum
                rec("calls", "2025-02-02", "2025-02-02", Some("1"), "0.02", "0.01"),
            ]
        },
        {
            "name": "daily calls, parent only",
            "subresource": "daily",
            "params": {"category": "calls", "start_date": "2025-01-30", "end_date": "2025-01-30",
                       "include_subaccounts": false},
            "total": 1,
            "records": [rec("calls", "2025-01-30", "2025-01-30", Some("1"), "1.5", "0.195")]
        },
        {
            "name": "daily, every category, two pages",
            "subresource": "daily",
            "params": {"start_date": "2025-01-30", "end_date": "2025-02-02", "page_size": 30},
            "total": 100,
            "records": [
                rec("totalprice", "2025-01-30", "2025-01-30", None, "0.325", "0.325"),
                rec("totalprice", "2025-02-01", "2025-02-01", None, "0.06", "0.06"),
                rec("totalprice", "2025-02-02", "2025-02-02", None, "0.03", "0.03"),
                rec("sms-outbound-longcode", "2025-02-01", "2025-02-01", Some("1"), "3", "0.06"),
                rec("sms-inbound-longcode", "2025-02-02", "2025-02-02", Some("1"), "1", "0.02"),
                rec("calls-inbound-mobile", "2025-02-01", "2025-02-01", Some("1"), "0", "0"),
                rec("mms", "2025-01-30", "2025-01-30", Some("0"), "0", "0"),
            ]
        },
        {
            "name": "monthly",
            "subresource": "monthly",
            "params": {"start_date": "2025-01-01", "end_date": "2025-02-28"},
            "total": 50,
            "records": [
                // p1 + p2 + s1 = 180 s; 0.195 + 0.11 + 0.13
                rec("calls", "2025-01-01", "2025-01-31", Some("3"), "3", "0.435"),
                rec("calls", "2025-02-01", "2025-02-28", Some("2"), "0.02", "0.01"),
                rec("sms", "2025-02-01", "2025-02-28", Some("2"), "4", "0.08"),
                rec("totalprice", "2025-02-01", "2025-02-28", None, "0.09", "0.09"),
                rec("calls-inbound", "2025-01-01", "2025-01-31", Some("1"), "0.5", "0.11"),
            ]
        },
        {
            "name": "monthly clipped to the dates asked for",
            "subresource": "monthly",
            "params": {"category": "calls", "start_date": "2025-01-31", "end_date": "2025-02-01"},
            "total": 2,
            "records": [
                rec("calls", "2025-01-31", "2025-01-31", Some("1"), "0.5", "0.11"),
                rec("calls", "2025-02-01", "2025-02-01", Some("1"), "0", "0"),
            ]
        },
        {
            "name": "all time (Records.json without dates)",
            "subresource": "records",
            "params": {},
            "total": 25,
            "records": [
                // 181 s = 3.0167 min → 3.02
                rec("calls", "2025-01-30", "2025-02-02", Some("5"), "3.02", "0.445"),
                rec("calls-inbound", "2025-01-30", "2025-02-02", Some("2"), "0.5", "0.11"),
                rec("sms", "2025-01-30", "2025-02-02", Some("2"), "4", "0.08"),
                rec("totalprice", "2025-01-30", "2025-02-02", None, "0.525", "0.525"),
                rec("calls-sip", "2025-01-30", "2025-02-02", Some("0"), "0", "0"),
            ]
        },
        {
            "name": "all time subresource with dates",
            "subresource": "all_time",
            "params": {"category": "totalprice", "start_date": "2025-01-31", "end_date": "2025-02-01"},
            "total": 1,
            "records": [rec("totalprice", "2025-01-31", "2025-02-01", None, "0.17", "0.17")]
        },
        {
            "name": "yearly",
            "subresource": "yearly",
            "params": {"category": "calls", "start_date": "2024-12-01", "end_date": "2025-12-31"},
            "total": 2,
            "records": [
                rec("calls", "2024-12-01", "2024-12-31", Some("0"), "0", "0"),
                rec("calls", "2025-01-01", "2025-12-31", Some("5"), "3.02", "0.445"),
            ]
        },
        {
            "name": "today and yesterday (clock fixed at 2025-02-02)",
            "subresource": "yesterday",
            "params": {"category": "sms"},
            "total": 1,
            "records": [rec("sms", "2025-02-01", "2025-02-01", Some("1"), "3", "0.06")]
        },
        {
            // The client sends PageSize=5000; it is served as 1000 per page,
            // and the client follows next_page_uri to its limit.
            "name": "list(limit=5000) over 9975 daily records",
            "subresource": "daily",
            "params": {"start_date": "2024-01-01", "end_date": "2025-02-02", "limit": 5000},
            "total": 5000,
            "records": [rec("calls", "2024-01-01", "2024-01-01", Some("0"), "0", "0")]
        },
        {
            "name": "a Twilio category tallyd does not count",
            "subresource": "daily",
            "params": {"category": "phonenumbers", "start_date": "2025-01-30", "end_date": "2025-01-31"},
            "total": 2,
            "records": [
                rec("phonenumbers", "2025-01-30", "2025-01-30", Some("0"), "0", "0"),
                rec("phonenumbers", "2025-01-31", "2025-01-31", Some("0"), "0", "0"),
            ]
        },
        {
            "name": "last month",
            "subresource": "last_month",
            "params": {"category": "totalprice"},
            "total": 1,
            "records": [rec("totalprice", "2025-01-01", "2025-01-31", None, "0.435", "0.435")]
        }
    ])
}

fn run_twilio_client(store: TestStore) {
    ensure_python_requirements("twilio");
    let (server, _state) = scenario(&store, NOW);
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("expectations.json");
    std::fs::write(&exp, expectations().to_string()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/twilio_usage_check.py"
    );
    let out = Command::new("python3")
        .args([
            script,
            &server.base,
            PARENT,
            PARENT_TOKEN,
            exp.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "twilio client check failed\n{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.matches("ok: ").count(),
        expectations().as_array().unwrap().len(),
        "{stdout}"
    );
}

#[test]
fn twilio_client_reads_exact_usage_sqlite() {
    run_twilio_client(TestStore::sqlite());
}

#[test]
fn twilio_client_reads_exact_usage_postgres() {
    if let Some(base) = postgres_base() {
        run_twilio_client(TestStore::postgres(&base));
    }
}
