//! The HTTP API driven with plain HTTP (reqwest): every error case, paging
//! through more than one page, the AgentPhone endpoints and the admin API. Each
//! test runs over SQLite and over PostgreSQL.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

/// The API served in-process over the scenario.
fn served(store: &TestStore) -> Server {
    scenario(store, NOW).0
}

both_stores!(twilio_auth_errors, served, |s: &Server| {
    let url = records_url(&s.base, PARENT, ".json");
    let r = client().get(&url).send().unwrap();
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    twilio_error(r, 401, 20003);
    twilio_error(get_basic(&url, PARENT, "wrong-token"), 401, 20003);
    twilio_error(get_basic(&url, "ACnobody", PARENT_TOKEN), 401, 20003);

    // An unknown account and another tenant's answer alike: nobody can tell
    // from outside which SIDs exist.
    let unknown = "AC00000000000000000000000000000fff";
    let msg = twilio_error(
        get_basic(
            &records_url(&s.base, unknown, ".json"),
            PARENT,
            PARENT_TOKEN,
        ),
        404,
        20404,
    );
    assert!(msg.contains(unknown), "{msg}");
    let other = twilio_error(
        get_basic(&records_url(&s.base, OTHER, ".json"), PARENT, PARENT_TOKEN),
        404,
        20404,
    );
    assert_eq!(other, msg.replace(unknown, OTHER));
    // A subaccount cannot read its parent.
    let parent = twilio_error(
        get_basic(&records_url(&s.base, PARENT, ".json"), SUB, SUB_TOKEN),
        404,
        20404,
    );
    assert_eq!(parent, msg.replace(unknown, PARENT));
    // A parent reads its subaccount.
    let (st, body) = json_of(get_basic(
        &records_url(&s.base, SUB, ".json?Category=calls"),
        PARENT,
        PARENT_TOKEN,
    ));
    assert_eq!(st, 200);
    assert_eq!(body["usage_records"][0]["account_sid"], SUB);
    assert_eq!(body["usage_records"][0]["count"], "1");
});

both_stores!(twilio_parameter_errors, served, |s: &Server| {
    for (query, names) in [
        ("StartDate=2025-13-01", vec!["StartDate", "2025-13-01"]),
        ("EndDate=soon", vec!["EndDate", "soon"]),
        (
            "StartDate=2025-02-02&EndDate=2025-02-01",
            vec!["StartDate", "EndDate", "2025-02-02"],
        ),
        (
            "Category=calls-teleport",
            vec!["Category", "calls-teleport"],
        ),
        ("PageSize=0", vec!["PageSize", "from 1"]),
        ("PageSize=x", vec!["PageSize"]),
        ("Page=-2", vec!["Page", "-2"]),
        ("PageToken=bogus", vec!["PageToken", "bogus"]),
        (
            "IncludeSubaccounts=maybe",
            vec!["IncludeSubaccounts", "maybe"],
        ),
    ] {
        let url = records_url(&s.base, PARENT, &format!("/Daily.json?{query}"));
        let msg = twilio_error(get_basic(&url, PARENT, PARENT_TOKEN), 400, 20001);
        for n in names {
            assert!(msg.contains(n), "{query}: {msg}");
        }
    }
    twilio_error(
        get_basic(
            &records_url(&s.base, PARENT, "/Weekly.json"),
            PARENT,
            PARENT_TOKEN,
        ),
        404,
        20404,
    );
    twilio_error(
        get_basic(
            &format!("{}/2010-04-01/Accounts/{PARENT}/Calls.json", s.base),
            PARENT,
            PARENT_TOKEN,
        ),
        404,
        20404,
    );
});

both_stores!(twilio_record_shape, served, |s: &Server| {
    let q = "?Category=totalprice&StartDate=2025-02-01&EndDate=2025-02-01";
    let (st, with_json) = json_of(get_basic(
        &records_url(&s.base, PARENT, &format!("/Daily.json{q}")),
        PARENT,
        PARENT_TOKEN,
    ));
    assert_eq!(st, 200);
    let (_, without) = json_of(get_basic(
        &records_url(&s.base, PARENT, &format!("/Daily{q}")),
        PARENT,
        PARENT_TOKEN,
    ));
    assert_eq!(with_json["usage_records"], without["usage_records"]);

    let base = format!("/2010-04-01/Accounts/{PARENT}/Usage/Records");
    let r = &with_json["usage_records"][0];
    assert_eq!(
        *r,
        json!({
            "account_sid": PARENT,
            "api_version": "2010-04-01",
            "as_of": "2025-02-03T04:05:06+00:00",
            "category": "totalprice",
            "count": null,
            "count_unit": "",
            "description": "Total Price",
            "end_date": "2025-02-01",
            "price": "0.06",
            "price_unit": "usd",
            "start_date": "2025-02-01",
            "subresource_uris": {
                "all_time": format!("{base}/AllTime.json?Category=totalprice"),
                "daily": format!("{base}/Daily.json?Category=totalprice"),
                "last_month": format!("{base}/LastMonth.json?Category=totalprice"),
                "monthly": format!("{base}/Monthly.json?Category=totalprice"),
                "this_month": format!("{base}/ThisMonth.json?Category=totalprice"),
                "today": format!("{base}/Today.json?Category=totalprice"),
                "yearly": format!("{base}/Yearly.json?Category=totalprice"),
                "yesterday": format!("{base}/Yesterday.json?Category=totalprice"),
            },
            "uri": format!("{base}/Daily?Category=totalprice&StartDate=2025-02-01&EndDate=2025-02-01"),
            "usage": "0.06",
            "usage_unit": "usd",
        })
    );
    let page: serde_json::Map<String, Value> = with_json.as_object().unwrap().clone();
    let mut keys: Vec<&str> = page.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "end",
            "first_page_uri",
            "last_page_uri",
            "next_page_uri",
            "num_pages",
            "page",
            "page_size",
            "previous_page_uri",
            "start",
            "total",
            "uri",
            "usage_records"
        ]
    );
    assert_eq!(with_json["page_size"], 50);
    assert_eq!(with_json["total"], 1);
    assert_eq!(with_json["next_page_uri"], Value::Null);
    assert_eq!(with_json["previous_page_uri"], Value::Null);
    assert_eq!(
        with_json["first_page_uri"],
        format!("{base}/Daily?Category=totalprice&StartDate=2025-02-01&EndDate=2025-02-01&Page=0&PageSize=50")
    );
    // Message categories: usage in segments, count in messages.
    let (_, sms) = json_of(get_basic(
        &records_url(
            &s.base,
            PARENT,
            "/Daily.json?Category=sms-outbound-longcode&StartDate=2025-02-01&EndDate=2025-02-01",
        ),
        PARENT,
        PARENT_TOKEN,
    ));
    let r = &sms["usage_records"][0];
    assert_eq!(
        (&r["count"], &r["count_unit"], &r["usage"], &r["usage_unit"]),
        (
            &json!("1"),
            &json!("messages"),
            &json!("3"),
            &json!("messages")
        )
    );
});

both_stores!(
    twilio_paging_covers_every_record_once,
    served,
    |s: &Server| {
        // 33 days × 25 categories = 825 records in pages of 100.
        let first = records_url(
            &s.base,
            PARENT,
            "/Daily.json?StartDate=2025-01-01&EndDate=2025-02-02&PageSize=100",
        );
        let mut url = first.clone();
        let mut seen = HashSet::new();
        let mut pages = Vec::new();
        loop {
            let (st, body) = json_of(get_basic(&url, PARENT, PARENT_TOKEN));
            assert_eq!(st, 200, "{body}");
            let n = body["usage_records"].as_array().unwrap().len() as u64;
            let page = body["page"].as_u64().unwrap();
            assert_eq!(page, pages.len() as u64);
            assert_eq!(body["start"].as_u64().unwrap(), page * 100);
            assert_eq!(body["end"].as_u64().unwrap(), page * 100 + n - 1);
            assert_eq!(body["total"], 825);
            assert_eq!(body["num_pages"], 9);
            assert_eq!(body["previous_page_uri"].is_null(), page == 0);
            for r in body["usage_records"].as_array().unwrap() {
                let key = (
                    r["category"].as_str().unwrap().to_owned(),
                    r["start_date"].as_str().unwrap().to_owned(),
                );
                assert!(seen.insert(key.clone()), "{key:?} listed twice");
            }
            pages.push(body.clone());
            match body["next_page_uri"].as_str() {
                Some(next) => url = format!("{}{next}", s.base),
                None => break,
            }
        }
        assert_eq!(pages.len(), 9);
        assert_eq!(seen.len(), 825);
        assert_eq!(pages[8]["usage_records"].as_array().unwrap().len(), 25);
        // Page=N reaches the same page directly; previous_page_uri goes back.
        let (_, third) = json_of(get_basic(&format!("{first}&Page=2"), PARENT, PARENT_TOKEN));
        assert_eq!(third["usage_records"], pages[2]["usage_records"]);
        let prev = pages[3]["previous_page_uri"].as_str().unwrap();
        let (_, back) = json_of(get_basic(
            &format!("{}{prev}", s.base),
            PARENT,
            PARENT_TOKEN,
        ));
        assert_eq!(back["usage_records"], pages[2]["usage_records"]);
        // The last page link is right, and a page past the end is empty.
        let last = pages[0]["last_page_uri"].as_str().unwrap();
        let (_, l) = json_of(get_basic(
            &format!("{}{last}", s.base),
            PARENT,
            PARENT_TOKEN,
        ));
        assert_eq!(l["usage_records"], pages[8]["usage_records"]);
        let (st, past) = json_of(get_basic(&format!("{first}&Page=50"), PARENT, PARENT_TOKEN));
        assert_eq!(st, 200);
        assert_eq!(past["usage_records"], json!([]));
        assert_eq!(past["next_page_uri"], Value::Null);
    }
);

/// The scenario's API with the clock at 2025-02-02T11:30:00Z.
fn served_before_noon(store: &TestStore) -> Server {
    scenario(store, NOW - 3 * 3600 - 1800).0
}

// "Last 24h" is the last 24 hours, not the current UTC day: at 11:30 it holds
// yesterday's 12:00 SMS (p4) and today's 06:00 one (p5), and not the call of
// today 12:00 (p6) that a day's total would count.
both_stores!(
    agentphone_last_24_hours_are_hours,
    served_before_noon,
    |s: &Server| {
        let (st, body) = json_of(get_bearer(&format!("{}/v1/usage", s.base), PARENT_KEY));
        assert_eq!(st, 200);
        assert_eq!(body["stats"]["messagesLast24h"], 2, "{body}");
        assert_eq!(body["stats"]["callsLast24h"], 0, "{body}");
        assert_eq!(body["stats"]["messagesLast7d"], 2, "{body}");
    }
);

both_stores!(agentphone_usage, served, |s: &Server| {
    let u = |p: &str| format!("{}/v1/usage{p}", s.base);
    api_error(client().get(u("")).send().unwrap(), 401);
    api_error(get_bearer(&u(""), "ap_not_a_key_at_all"), 401);

    let (st, body) = json_of(get_bearer(&u(""), PARENT_KEY));
    assert_eq!(st, 200);
    assert_eq!(
        body,
        json!({
            "plan": {
                "name": "agentphone",
                "limits": {
                    "numbers": 10,
                    "messagesPerMonth": 10000,
                    "voiceMinutesPerMonth": 10000,
                    "maxCallDurationMinutes": 60,
                    "concurrentCalls": 5
                }
            },
            "numbers": {"used": 2, "active": 2, "limit": 10, "remaining": 8},
            "stats": {
                "totalMessages": 2,
                "messagesLast24h": 1,
                "messagesLast7d": 2,
                "messagesLast30d": 2,
                "totalCalls": 4,
                "callsLast24h": 1,
                "callsLast7d": 4,
                "callsLast30d": 4,
                "totalWebhookDeliveries": 0,
                "successfulWebhookDeliveries": 0,
                "failedWebhookDeliveries": 0
            },
            "periodStart": "2025-02-01T00:00:00Z",
            "periodEnd": "2025-03-01T00:00:00Z"
        })
    );

    let (_, daily) = json_of(get_bearer(&u("/daily?days=4"), PARENT_KEY));
    assert_eq!(
        daily,
        json!({"data": [
            {"date": "2025-01-30", "messages": 0, "calls": 1, "webhooks": 0},
            {"date": "2025-01-31", "messages": 0, "calls": 1, "webhooks": 0},
            {"date": "2025-02-01", "messages": 1, "calls": 1, "webhooks": 0},
            {"date": "2025-02-02", "messages": 1, "calls": 1, "webhooks": 0},
        ], "days": 4})
    );
    let (_, d30) = json_of(get_bearer(&u("/daily"), PARENT_KEY));
    assert_eq!(d30["days"], 30);
    assert_eq!(d30["data"].as_array().unwrap().len(), 30);

    let (_, monthly) = json_of(get_bearer(&u("/monthly?months=2"), PARENT_KEY));
    assert_eq!(
        monthly,
        json!({"data": [
            {"month": "2025-01", "messages": 0, "calls": 2, "webhooks": 0},
            {"month": "2025-02", "messages": 2, "calls": 2, "webhooks": 0},
        ], "months": 2})
    );
    let (_, m6) = json_of(get_bearer(&u("/monthly"), PARENT_KEY));
    assert_eq!(m6["data"].as_array().unwrap().len(), 6);
    assert_eq!(m6["data"][0]["month"], "2024-09");

    for (path, param, range) in [
        ("/daily?days=0", "days", "1 to 365"),
        ("/daily?days=366", "days", "1 to 365"),
        ("/daily?days=week", "days", "1 to 365"),
        ("/monthly?months=0", "months", "1 to 24"),
        ("/monthly?months=25", "months", "1 to 24"),
        ("/monthly?months=2.5", "months", "1 to 24"),
    ] {
        let e = api_error(get_bearer(&u(path), PARENT_KEY), 400);
        assert_eq!(e["param"], param, "{path}");
        assert!(
            e["message"].as_str().unwrap().contains(range),
            "{path}: {e}"
        );
    }

    let (_, numbers) = json_of(get_bearer(&u("/by-number"), PARENT_KEY));
    let rows: Vec<(String, i64, i64)> = numbers["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["phoneNumber"].as_str().unwrap().to_owned(),
                r["messages"].as_i64().unwrap(),
                r["calls"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("+14155550101".to_owned(), 1, 2),
            ("+14155550102".to_owned(), 1, 2)
        ]
    );

    let (_, month) = json_of(get_bearer(&u("/by-agent?period=month"), PARENT_KEY));
    assert_eq!(
        month,
        json!({
            "data": [
                {"agentId": "agent-a", "agentName": "agent-a", "messages": 0, "calls": 1, "totalSeconds": 0, "isOrphan": false},
                {"agentId": "agent-b", "agentName": "agent-b", "messages": 1, "calls": 1, "totalSeconds": 1, "isOrphan": false},
                {"agentId": null, "agentName": "Unassigned", "messages": 1, "calls": 0, "totalSeconds": 0, "isOrphan": true},
            ],
            "period": "month",
            "periodStart": "2025-02-01T00:00:00Z",
            "periodEnd": "2025-03-01T00:00:00Z"
        })
    );
    let (_, year) = json_of(get_bearer(&u("/by-agent?period=year"), PARENT_KEY));
    assert_eq!(year["data"][0]["totalSeconds"], 90);
    assert_eq!(year["data"][2]["calls"], 1);
    assert_eq!(year["data"][2]["totalSeconds"], 30);
    for (q, param) in [
        ("", "period"),
        ("?period=fortnight", "period"),
        ("?period=week&tz=America/New_York", "tz"),
    ] {
        let e = api_error(get_bearer(&u(&format!("/by-agent{q}")), PARENT_KEY), 400);
        assert_eq!(e["param"], param, "{q}: {e}");
    }
});

both_stores!(admin_accounts_and_keys, served, |s: &Server| {
    use reqwest::Method;
    api_error(
        client()
            .get(format!("{}/admin/accounts", s.base))
            .send()
            .unwrap(),
        401,
    );
    let (_, list) = json_of(admin(&s.base, Method::GET, "/accounts", None));
    assert_eq!(list["accounts"].as_array().unwrap().len(), 3);

    // A new subaccount of the parent, with generated credentials.
    let (st, created) = json_of(admin(
        &s.base,
        Method::POST,
        "/accounts",
        Some(json!({"parent_sid": PARENT, "friendly_name": "New sub"})),
    ));
    assert_eq!(st, 201, "{created}");
    let sid = created["sid"].as_str().unwrap().to_owned();
    let token = created["auth_token"].as_str().unwrap().to_owned();
    let own = records_url(&s.base, &sid, ".json?Category=calls");
    assert_eq!(get_basic(&own, &sid, &token).status(), 200);
    assert_eq!(get_basic(&own, PARENT, PARENT_TOKEN).status(), 200);
    assert_eq!(get_basic(&own, OTHER, OTHER_TOKEN).status(), 404);

    let e = api_error(
        admin(
            &s.base,
            Method::POST,
            "/accounts",
            Some(json!({"sid": "AC123"})),
        ),
        400,
    );
    assert_eq!(e["param"], "sid");
    let e = api_error(
        admin(
            &s.base,
            Method::POST,
            "/accounts",
            Some(json!({"parent_sid": "AC00000000000000000000000000000fff"})),
        ),
        400,
    );
    assert_eq!(e["param"], "parent_sid");
    api_error(
        admin(
            &s.base,
            Method::POST,
            "/accounts",
            Some(json!({"sid": sid})),
        ),
        409,
    );
    let e = api_error(
        admin(
            &s.base,
            Method::POST,
            "/accounts",
            Some(json!({"colour": "red"})),
        ),
        400,
    );
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");

    // Rotating the token.
    let (st, _) = json_of(admin(
        &s.base,
        Method::PATCH,
        &format!("/accounts/{sid}"),
        Some(json!({"auth_token": "rotated-token-123"})),
    ));
    assert_eq!(st, 200);
    assert_eq!(get_basic(&own, &sid, &token).status(), 401);
    assert_eq!(get_basic(&own, &sid, "rotated-token-123").status(), 200);

    // API keys: shown once, listed by id, revocable.
    let (st, key) = json_of(admin(
        &s.base,
        Method::POST,
        &format!("/accounts/{sid}/api-keys"),
        None,
    ));
    assert_eq!(st, 201);
    let k = key["key"].as_str().unwrap();
    let usage = format!("{}/v1/usage", s.base);
    assert_eq!(get_bearer(&usage, k).status(), 200);
    let (_, keys) = json_of(admin(
        &s.base,
        Method::GET,
        &format!("/accounts/{sid}/api-keys"),
        None,
    ));
    assert_eq!(keys["api_keys"][0]["key_id"], key["key_id"]);
    assert!(
        !keys.to_string().contains(k),
        "the key itself is never listed"
    );
    let del = admin(
        &s.base,
        Method::DELETE,
        &format!(
            "/accounts/{sid}/api-keys/{}",
            key["key_id"].as_str().unwrap()
        ),
        None,
    );
    assert_eq!(del.status(), 204);
    assert_eq!(get_bearer(&usage, k).status(), 401);

    // Deleting: not while subaccounts exist.
    let e = api_error(
        admin(
            &s.base,
            Method::DELETE,
            &format!("/accounts/{PARENT}"),
            None,
        ),
        409,
    );
    assert!(e["message"].as_str().unwrap().contains(SUB), "{e}");
    assert_eq!(
        admin(&s.base, Method::DELETE, &format!("/accounts/{sid}"), None).status(),
        204
    );
    api_error(
        admin(&s.base, Method::GET, &format!("/accounts/{sid}"), None),
        404,
    );
    assert_eq!(get_basic(&own, PARENT, PARENT_TOKEN).status(), 404);
});

both_stores!(openapi_is_served, served, |s: &Server| {
    let r = client()
        .get(format!("{}/openapi.yaml", s.base))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    assert_eq!(text, tallyd::api::OPENAPI_YAML);
    for path in [
        "/2010-04-01/Accounts/{AccountSid}/Usage/Records.json:",
        "/2010-04-01/Accounts/{AccountSid}/Usage/Records/{Subresource}.json:",
        "/v1/usage:",
        "/v1/usage/daily:",
        "/v1/usage/monthly:",
        "/v1/usage/by-number:",
        "/v1/usage/by-agent:",
        "/admin/accounts:",
        "/admin/accounts/{sid}:",
        "/admin/accounts/{sid}/api-keys:",
        "/admin/accounts/{sid}/api-keys/{key_id}:",
        "/admin/accounts/{sid}/webhook:",
        "/openapi.yaml:",
    ] {
        assert!(
            text.contains(&format!("\n  {path}\n")),
            "{path} is not documented"
        );
    }
});

#[test]
fn openapi_document_is_valid() {
    ensure_python_requirements("openapi_spec_validator");
    let out = std::process::Command::new("python3")
        .args([
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/validate_openapi.py"
            ),
            concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The scenario plus SMS from more numbers than a page keeps apart (item 9).
fn many_numbers(store: &TestStore) -> Server {
    let server = served(store);
    let (_, tariff) = config(&store.url());
    let n = tallyd::store::page::MAX_BREAKDOWN_ENTRIES + 2;
    let cdrs: Vec<String> = (0..n)
        .map(|i| {
            let number = format!("+1999{i:07}");
            sms(
                &format!("many{i}"),
                PARENT,
                "2025-02-02T10:00:00Z",
                "outbound",
                1,
                Some(&number),
                None,
            )
        })
        .collect();
    assert_eq!(flush_cdrs(&store.url(), &tariff, &cdrs, AS_OF), n);
    server
}

both_stores!(
    numbers_past_the_page_bound_are_counted_as_other,
    many_numbers,
    |s: &Server| {
        let max = tallyd::store::page::MAX_BREAKDOWN_ENTRIES;
        let (st, numbers) = json_of(get_bearer(
            &format!("{}/v1/usage/by-number", s.base),
            PARENT_KEY,
        ));
        assert_eq!(st, 200);
        let data = numbers["data"].as_array().unwrap();
        assert_eq!(data.len(), max + 1, "the bound, and one entry for the rest");
        let other: Vec<&Value> = data.iter().filter(|d| d["numberId"] == "other").collect();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0]["phoneNumber"], Value::Null);
        // The scenario's 2 numbers and max - 2 new ones fit; 4 new ones did not.
        assert_eq!(other[0]["messages"], 4);
        let messages: i64 = data.iter().map(|d| d["messages"].as_i64().unwrap()).sum();
        assert_eq!(
            messages,
            (max + 2) as i64 + 2,
            "every message is still counted"
        );
        let (_, usage) = json_of(get_bearer(&format!("{}/v1/usage", s.base), PARENT_KEY));
        assert_eq!(usage["numbers"]["used"], max);
        assert_eq!(usage["numbers"]["active"], max);
        assert_eq!(usage["stats"]["totalMessages"], (max + 2) as i64 + 2);
    }
);
