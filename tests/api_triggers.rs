//! The Twilio Usage Triggers API over HTTP, against SQLite and PostgreSQL:
//! create, list (paging, filters), fetch, update, delete; `current_value` and
//! relative `TriggerValue`s read from the scenario's stored usage; every
//! refusal; tenants and subaccounts; and the official Twilio Python helper
//! library managing triggers (`tests/python/twilio_triggers_check.py`).
//!
//! The scenario's usage (`common::scenario_cdrs`, clock at 2025-02-02 15:00 UTC)
//! gives the parent, without its subaccount: calls all time 4 calls, 121 s
//! (90 + 30 + 0 + 1), $0.315; totalprice in February $0.09 (0.06 + 0.02 +
//! 0.01); SMS on 2025-02-02: 1 message.

mod common;

use std::process::Command;

use common::*;
use reqwest::Method;
use serde_json::Value;
use tallyd::api::ApiState;
use tallyd::store::Store;

fn triggers_url(base: &str, sid: &str, rest: &str) -> String {
    format!("{base}/2010-04-01/Accounts/{sid}/Usage/Triggers{rest}")
}

/// A form request with Basic auth.
fn send(
    method: Method,
    url: &str,
    (user, pass): (&str, &str),
    form: &[(&str, &str)],
) -> reqwest::blocking::Response {
    let mut r = client().request(method, url).basic_auth(user, Some(pass));
    if !form.is_empty() {
        r = r.form(form);
    }
    r.send().unwrap()
}

const P: (&str, &str) = (PARENT, PARENT_TOKEN);
const S: (&str, &str) = (SUB, SUB_TOKEN);
const O: (&str, &str) = (OTHER, OTHER_TOKEN);
const HOOK: &str = "https://hooks.example.com/usage?x=1";

fn create(base: &str, account: &str, who: (&str, &str), form: &[(&str, &str)]) -> Value {
    let (st, body) = json_of(send(
        Method::POST,
        &triggers_url(base, account, ".json"),
        who,
        form,
    ));
    assert_eq!(st, 201, "{body}");
    body
}

/// The scenario with `[webhooks] allow_loopback` as given.
fn scenario_with(store: &TestStore, allow_loopback: bool) -> (Server, ApiState) {
    if !allow_loopback {
        return scenario(store, NOW);
    }
    let (mut cfg, tariff) = config(&store.url());
    cfg.webhooks.allow_loopback = true;
    let state = ApiState::seeded(&cfg, &tariff, Store::open(&cfg.store.url).unwrap())
        .unwrap()
        .with_fixed_clock(NOW);
    flush_cdrs(&store.url(), &tariff, &scenario_cdrs(), AS_OF);
    (serve(state.clone()), state)
}

/// The API over the scenario, and its state (the trigger book, the store).
type Served = (Server, ApiState);

fn filled(store: &TestStore) -> Served {
    scenario(store, NOW)
}

both_stores!(
    create_list_fetch_update_delete,
    filled,
    |(s, state): &Served| {
        let base = &s.base;
        // Relative: all-time calls count is 4, so +10 is 14.
        let once = create(
            base,
            PARENT,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "+10"),
                ("UsageCategory", "calls"),
                ("TriggerBy", "count"),
                ("FriendlyName", "ten more calls"),
                ("Ignored", "by tallyd as by Twilio"),
            ],
        );
        let sid = once["sid"].as_str().unwrap().to_owned();
        assert!(
            sid.len() == 34
                && sid.starts_with("UT")
                && sid[2..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{sid}"
        );
        let expected = serde_json::json!({
            "account_sid": PARENT,
            "api_version": "2010-04-01",
            "callback_method": "POST",
            "callback_url": HOOK,
            "current_value": "4",
            "date_created": "Sun, 02 Feb 2025 15:00:00 +0000",
            "date_fired": null,
            "date_updated": "Sun, 02 Feb 2025 15:00:00 +0000",
            "friendly_name": "ten more calls",
            "recurring": "",
            "sid": sid,
            "trigger_by": "count",
            "trigger_value": "14",
            "uri": format!("/2010-04-01/Accounts/{PARENT}/Usage/Triggers/{sid}.json"),
            "usage_category": "calls",
            "usage_record_uri": format!("/2010-04-01/Accounts/{PARENT}/Usage/Records.json?Category=calls"),
        });
        assert_eq!(once, expected);
        // Usage in minutes, exact: 121 s.
        let minutes = create(
            base,
            PARENT,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "+1"),
                ("UsageCategory", "calls"),
            ],
        );
        assert_eq!(minutes["trigger_by"], "usage");
        let current: rust_decimal::Decimal =
            minutes["current_value"].as_str().unwrap().parse().unwrap();
        assert_eq!(current * rust_decimal::Decimal::from(60), 121.into());
        let monthly = create(
            base,
            PARENT,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "5.50"),
                ("UsageCategory", "totalprice"),
                ("Recurring", "monthly"),
                ("TriggerBy", "price"),
                ("CallbackMethod", "GET"),
            ],
        );
        assert_eq!(monthly["current_value"], "0.09");
        assert_eq!(monthly["trigger_value"], "5.5");
        assert_eq!(monthly["callback_method"], "GET");
        assert_eq!(monthly["recurring"], "monthly");
        assert_eq!(
            monthly["usage_record_uri"],
            format!("/2010-04-01/Accounts/{PARENT}/Usage/Records/Monthly.json?Category=totalprice")
        );
        let daily = create(
            base,
            PARENT,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "3"),
                ("UsageCategory", "sms"),
                ("Recurring", "daily"),
                ("TriggerBy", "count"),
            ],
        );
        assert_eq!(daily["current_value"], "1");
        // A category tallyd does not count is accepted, at zero.
        let zero = create(
            base,
            PARENT,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "+2"),
                ("UsageCategory", "phonenumbers"),
                ("Recurring", "alltime"),
            ],
        );
        assert_eq!(
            (&zero["current_value"], &zero["trigger_value"]),
            (&"0".into(), &"2".into())
        );
        // The flusher's book has every trigger at once.
        let book = state.triggers().of(PARENT);
        assert_eq!(book.len(), 5);
        let in_book = book.iter().find(|t| t.sid == sid).unwrap();
        assert_eq!(in_book.trigger_value, 14.into());
        assert_eq!(in_book.trigger_by, tallyd::triggers::TriggerBy::Count);

        // Listing, oldest first (created in the same second: then by SID),
        // two per page, following the links as a client does.
        let list = |q: &str| {
            let (st, body) = json_of(send(
                Method::GET,
                &triggers_url(base, PARENT, &format!(".json{q}")),
                P,
                &[],
            ));
            assert_eq!(st, 200, "{body}");
            body
        };
        let all = list("");
        let sids = |page: &Value| -> Vec<String> {
            page["usage_triggers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["sid"].as_str().unwrap().to_owned())
                .collect()
        };
        let mut want: Vec<String> = [&once, &minutes, &monthly, &daily, &zero]
            .iter()
            .map(|t| t["sid"].as_str().unwrap().to_owned())
            .collect();
        want.sort();
        assert_eq!(sids(&all), want);
        assert_eq!(all["page_size"], 50);
        assert_eq!(all["next_page_uri"], Value::Null);
        assert_eq!(all["previous_page_uri"], Value::Null);
        assert_eq!(
            (all["start"].as_u64(), all["end"].as_u64()),
            (Some(0), Some(4))
        );
        let listed_once = all["usage_triggers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["sid"] == sid.as_str())
            .unwrap();
        assert_eq!(listed_once, &expected);
        let mut paged = Vec::new();
        let mut page = list("?PageSize=2");
        assert_eq!(
            page["first_page_uri"],
            format!("/2010-04-01/Accounts/{PARENT}/Usage/Triggers.json?PageSize=2&Page=0")
        );
        let mut pages = 1;
        loop {
            paged.extend(sids(&page));
            let Some(next) = page["next_page_uri"].as_str() else {
                break;
            };
            let (st, body) = json_of(send(Method::GET, &format!("{base}{next}"), P, &[]));
            assert_eq!(st, 200, "{body}");
            assert!(body["previous_page_uri"].is_string(), "{body}");
            page = body;
            pages += 1;
        }
        assert_eq!((paged, pages), (want.clone(), 3));
        assert_eq!(page["page"], 2);
        assert_eq!(
            (page["start"].as_u64(), page["end"].as_u64()),
            (Some(4), Some(4))
        );
        let prev = page["previous_page_uri"].as_str().unwrap();
        let (_, back) = json_of(send(Method::GET, &format!("{base}{prev}"), P, &[]));
        assert_eq!(sids(&back), want[2..4].to_vec());
        // A token from one listing is refused on another.
        let token_q = &prev[prev.find('?').unwrap()..];
        let e = twilio_error(
            send(
                Method::GET,
                &triggers_url(base, PARENT, &format!(".json{token_q}&TriggerBy=count")),
                P,
                &[],
            ),
            400,
            20001,
        );
        assert!(e.contains("PageToken"), "{e}");
        // Filters.
        assert_eq!(
            sids(&list("?Recurring=daily")),
            vec![daily["sid"].as_str().unwrap()]
        );
        let mut non_recurring = vec![
            once["sid"].as_str().unwrap(),
            minutes["sid"].as_str().unwrap(),
            zero["sid"].as_str().unwrap(),
        ];
        non_recurring.sort();
        assert_eq!(sids(&list("?Recurring=alltime")), non_recurring);
        assert_eq!(sids(&list("?Recurring=")), non_recurring);
        assert_eq!(
            sids(&list("?TriggerBy=price")),
            vec![monthly["sid"].as_str().unwrap()]
        );
        assert_eq!(
            list("?UsageCategory=calls")["usage_triggers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            list("?UsageCategory=calls&TriggerBy=usage&Recurring=monthly")["usage_triggers"],
            serde_json::json!([])
        );
        // Also without .json.
        let (st, body) = json_of(send(Method::GET, &triggers_url(base, PARENT, ""), P, &[]));
        assert_eq!((st.as_u16(), sids(&body).len()), (200, 5));

        // Fetch.
        let one = triggers_url(base, PARENT, &format!("/{sid}.json"));
        let (st, body) = json_of(send(Method::GET, &one, P, &[]));
        assert_eq!((st.as_u16(), &body), (200, &expected));

        // Update: only what is given changes.
        let (st, body) = json_of(send(
            Method::POST,
            &one,
            P,
            &[
                ("FriendlyName", "renamed"),
                ("CallbackMethod", "get"),
                ("TriggerValue", "999"),
            ],
        ));
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["friendly_name"], "renamed");
        assert_eq!(body["callback_method"], "GET");
        assert_eq!(body["callback_url"], HOOK);
        assert_eq!(body["trigger_value"], "14", "TriggerValue is not updatable");
        let (st, body) = json_of(send(
            Method::POST,
            &one,
            P,
            &[("CallbackUrl", "https://other.example.net/cb")],
        ));
        assert_eq!(st, 200, "{body}");
        assert_eq!(
            (
                body["callback_url"].as_str(),
                body["friendly_name"].as_str()
            ),
            (Some("https://other.example.net/cb"), Some("renamed"))
        );
        let in_book = state
            .triggers()
            .of(PARENT)
            .into_iter()
            .find(|t| t.sid == sid)
            .unwrap();
        assert_eq!(in_book.friendly_name, "renamed");
        assert_eq!(in_book.callback_url, "https://other.example.net/cb");
        assert_eq!(
            in_book.callback_method,
            tallyd::triggers::CallbackMethod::Get
        );

        // Delete.
        let r = send(Method::DELETE, &one, P, &[]);
        assert_eq!(r.status(), 204);
        assert!(r.text().unwrap().is_empty());
        twilio_error(send(Method::GET, &one, P, &[]), 404, 20404);
        twilio_error(send(Method::DELETE, &one, P, &[]), 404, 20404);
        twilio_error(
            send(Method::POST, &one, P, &[("FriendlyName", "x")]),
            404,
            20404,
        );
        assert!(state.triggers().of(PARENT).iter().all(|t| t.sid != sid));
        assert_eq!(state.triggers().len(), 4);
        let stored = state.store().with_conn(|c| c.all_triggers()).unwrap();
        assert_eq!(stored.len(), 4);
    }
);

both_stores!(
    refusals_name_the_parameter,
    filled,
    |(s, state): &Served| {
        let base = &s.base;
        let url = triggers_url(base, PARENT, ".json");
        let ok = [
            ("CallbackUrl", HOOK),
            ("TriggerValue", "10"),
            ("UsageCategory", "calls"),
        ];
        let with = |k: &str, v: &str| -> Vec<(String, String)> {
            ok.iter()
                .filter(|(n, _)| *n != k)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .chain([(k.to_owned(), v.to_owned())])
                .collect()
        };
        let without = |k: &str| -> Vec<(String, String)> {
            ok.iter()
                .filter(|(n, _)| *n != k)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let long = "x".repeat(5000);
        for (form, want) in [
            (without("CallbackUrl"), "CallbackUrl is required"),
            (without("TriggerValue"), "TriggerValue is required"),
            (without("UsageCategory"), "UsageCategory is required"),
            (
                with("CallbackUrl", "not a url"),
                "CallbackUrl \"not a url\" is not a valid URL",
            ),
            (
                with("CallbackUrl", "http://127.0.0.1:8080/hook"),
                "loopback",
            ),
            (with("CallbackUrl", "http://localhost/hook"), "loopback"),
            (with("CallbackUrl", "http://10.0.0.7/hook"), "private"),
            (with("CallbackUrl", "http://[::1]/hook"), "loopback"),
            (
                with("CallbackUrl", &format!("https://example.com/{long}")),
                "bytes long",
            ),
            (with("TriggerValue", "-1"), "TriggerValue \"-1\""),
            (with("TriggerValue", "ten"), "TriggerValue \"ten\""),
            (with("TriggerValue", &long), "TriggerValue \"xxx"),
            (
                with("UsageCategory", "calls-everywhere"),
                "UsageCategory \"calls-everywhere\"",
            ),
            (with("Recurring", "weekly"), "Recurring \"weekly\""),
            (with("TriggerBy", "minutes"), "TriggerBy \"minutes\""),
            (with("CallbackMethod", "PATCH"), "CallbackMethod \"PATCH\""),
            (
                with("FriendlyName", &"f".repeat(65)),
                "FriendlyName is 65 characters",
            ),
        ] {
            let r = client()
                .post(&url)
                .basic_auth(PARENT, Some(PARENT_TOKEN))
                .form(&form)
                .send()
                .unwrap();
            let msg = twilio_error(r, 400, 20001);
            assert!(msg.contains(want), "{want}: {msg}");
            assert!(
                msg.len() < 600,
                "an error does not echo unbounded input: {msg}"
            );
        }
        assert!(
            state.triggers().is_empty(),
            "nothing refused reached the book"
        );
        assert_eq!(
            state
                .store()
                .with_conn(|c| c.count_triggers(PARENT))
                .unwrap(),
            0
        );

        // Credentials first: a bad request without them is a 401.
        let r = client()
            .post(&url)
            .form(&without("CallbackUrl"))
            .send()
            .unwrap();
        twilio_error(r, 401, 20003);
        twilio_error(
            send(Method::POST, &url, (PARENT, "wrong-token-000000"), &ok),
            401,
            20003,
        );
        // A body over the API's limit, a method the resource has not.
        let r = client()
            .post(&url)
            .basic_auth(PARENT, Some(PARENT_TOKEN))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("FriendlyName={}", "n".repeat(3 << 20)))
            .send()
            .unwrap();
        twilio_error(r, 413, 20413);
        twilio_error(send(Method::PUT, &url, P, &ok), 405, 20004);
        // A body that is not a form of the parameters (bytes that are not
        // UTF-8 are decoded lossily, as by any form parser).
        let r = client()
            .post(&url)
            .basic_auth(PARENT, Some(PARENT_TOKEN))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(vec![b'C', b'=', 0xff, 0xfe])
            .send()
            .unwrap();
        let msg = twilio_error(r, 400, 20001);
        assert!(msg.contains("CallbackUrl is required"), "{msg}");
        // List parameters.
        for (q, want) in [
            ("?PageSize=0", "PageSize"),
            ("?Page=x", "Page"),
            ("?PageToken=abc", "PageToken"),
            ("?Recurring=hourly", "Recurring"),
            ("?TriggerBy=minutes", "TriggerBy"),
            ("?UsageCategory=nope", "UsageCategory"),
        ] {
            let msg = twilio_error(send(Method::GET, &format!("{url}{q}"), P, &[]), 400, 20001);
            assert!(msg.contains(want), "{q}: {msg}");
        }
        // Unknown and malformed trigger SIDs are 404s.
        for tail in [
            "/UT00000000000000000000000000000000.json",
            "/UT00.json",
            "/nope",
            "/UT00000000000000000000000000000000",
        ] {
            let u = triggers_url(base, PARENT, tail);
            for m in [Method::GET, Method::DELETE] {
                twilio_error(send(m, &u, P, &[]), 404, 20404);
            }
            twilio_error(
                send(Method::POST, &u, P, &[("FriendlyName", "x")]),
                404,
                20404,
            );
        }
        // Update checks its parameters too.
        let t = create(base, PARENT, P, &ok);
        let one = triggers_url(
            base,
            PARENT,
            &format!("/{}.json", t["sid"].as_str().unwrap()),
        );
        for (form, want) in [
            (vec![("CallbackUrl", "http://192.168.1.1/x")], "CallbackUrl"),
            (vec![("CallbackMethod", "DELETE")], "CallbackMethod"),
            (vec![("FriendlyName", &*"y".repeat(100))], "FriendlyName"),
        ] {
            let msg = twilio_error(send(Method::POST, &one, P, &form), 400, 20001);
            assert!(msg.contains(want), "{msg}");
        }
        let (_, after) = json_of(send(Method::GET, &one, P, &[]));
        assert_eq!(after, t, "a refused update changes nothing");
    }
);

both_stores!(
    other_tenants_and_subaccounts,
    filled,
    |(s, state): &Served| {
        let base = &s.base;
        let mine = create(
            base,
            PARENT,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "1"),
                ("UsageCategory", "sms"),
            ],
        );
        let ut = mine["sid"].as_str().unwrap();
        let unknown = "UT0123456789abcdef0123456789abcdef";
        // Another tenant: the parent's trigger under the parent's path, or
        // under its own, is answered exactly as a trigger that does not exist.
        for account in [PARENT, OTHER] {
            for m in [Method::GET, Method::DELETE, Method::POST] {
                let answer = |sid: &str| {
                    let path = format!("/2010-04-01/Accounts/{account}/Usage/Triggers/{sid}.json");
                    let r = send(
                        m.clone(),
                        &format!("{base}{path}"),
                        O,
                        &[("FriendlyName", "mine now")],
                    );
                    let msg = twilio_error(r, 404, 20404);
                    assert_eq!(msg, format!("The requested resource {path} was not found"));
                };
                answer(ut);
                answer(unknown);
            }
        }
        let msg = twilio_error(
            send(Method::GET, &triggers_url(base, PARENT, ".json"), O, &[]),
            404,
            20404,
        );
        assert!(msg.contains(PARENT), "{msg}");
        twilio_error(
            send(
                Method::POST,
                &triggers_url(base, PARENT, ".json"),
                O,
                &[
                    ("CallbackUrl", HOOK),
                    ("TriggerValue", "1"),
                    ("UsageCategory", "sms"),
                ],
            ),
            404,
            20404,
        );
        let (_, other_list) = json_of(send(
            Method::GET,
            &triggers_url(base, OTHER, ".json"),
            O,
            &[],
        ));
        assert_eq!(other_list["usage_triggers"], serde_json::json!([]));
        let (st, still) = json_of(send(
            Method::GET,
            &triggers_url(base, PARENT, &format!("/{ut}.json")),
            P,
            &[],
        ));
        assert_eq!(
            (st.as_u16(), &still["friendly_name"]),
            (200, &"".into()),
            "untouched"
        );

        // A parent manages its subaccount's triggers; the subaccount sees
        // them, and never its parent's.
        let sub_t = create(
            base,
            SUB,
            P,
            &[
                ("CallbackUrl", HOOK),
                ("TriggerValue", "+1"),
                ("UsageCategory", "calls"),
                ("TriggerBy", "count"),
            ],
        );
        assert_eq!(sub_t["account_sid"], SUB);
        // The subaccount's own usage: one call (s1), not the parent's.
        assert_eq!(
            (&sub_t["current_value"], &sub_t["trigger_value"]),
            (&"1".into(), &"2".into())
        );
        let sub_ut = sub_t["sid"].as_str().unwrap();
        let (st, sub_list) = json_of(send(Method::GET, &triggers_url(base, SUB, ".json"), S, &[]));
        assert_eq!(st, 200);
        assert_eq!(sub_list["usage_triggers"][0]["sid"], sub_ut);
        assert_eq!(sub_list["usage_triggers"].as_array().unwrap().len(), 1);
        twilio_error(
            send(Method::GET, &triggers_url(base, PARENT, ".json"), S, &[]),
            404,
            20404,
        );
        twilio_error(
            send(
                Method::GET,
                &triggers_url(base, PARENT, &format!("/{ut}.json")),
                S,
                &[],
            ),
            404,
            20404,
        );
        // A subaccount's trigger is not the parent's own.
        twilio_error(
            send(
                Method::GET,
                &triggers_url(base, PARENT, &format!("/{sub_ut}.json")),
                P,
                &[],
            ),
            404,
            20404,
        );
        let (st, _) = json_of(send(
            Method::GET,
            &triggers_url(base, SUB, &format!("/{sub_ut}.json")),
            S,
            &[],
        ));
        assert_eq!(st, 200);
        assert_eq!(state.triggers().of(SUB).len(), 1);
        assert_eq!(
            send(
                Method::DELETE,
                &triggers_url(base, SUB, &format!("/{sub_ut}")),
                S,
                &[]
            )
            .status(),
            204
        );
        assert!(!state.triggers().has(SUB));
    }
);

both_stores!(
    an_account_has_at_most_1000_triggers,
    filled,
    |(s, state): &Served| {
        let form = [
            ("CallbackUrl", HOOK),
            ("TriggerValue", "1"),
            ("UsageCategory", "sms"),
        ];
        let first = create(&s.base, PARENT, P, &form);
        let mut t = state
            .store()
            .with_conn(|c| c.all_triggers())
            .unwrap()
            .pop()
            .unwrap();
        state
            .store()
            .with_conn(|c| {
                c.transaction(|c| {
                    for i in 1..995 {
                        t.sid = format!("UT{i:032x}");
                        c.insert_trigger(&t)?;
                    }
                    Ok(())
                })
            })
            .unwrap();
        // Ten creates at once for the last five places: five get them.
        let url = triggers_url(&s.base, PARENT, ".json");
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..10)
                .map(|_| scope.spawn(|| send(Method::POST, &url, P, &form).status().as_u16()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let created = statuses.iter().filter(|s| **s == 201).count();
        let refused = statuses.iter().filter(|s| **s == 400).count();
        assert_eq!((created, refused), (5, 5), "{statuses:?}");
        assert_eq!(
            state
                .store()
                .with_conn(|c| c.count_triggers(PARENT))
                .unwrap(),
            1000
        );
        assert_eq!(
            state.triggers().of(PARENT).len(),
            6,
            "five created and the first"
        );
        let msg = twilio_error(send(Method::POST, &url, P, &form), 400, 20001);
        assert!(msg.contains("1000"), "{msg}");
        // Other accounts are not limited by it; deleting one makes room.
        create(&s.base, OTHER, O, &form);
        let one = triggers_url(
            &s.base,
            PARENT,
            &format!("/{}.json", first["sid"].as_str().unwrap()),
        );
        assert_eq!(send(Method::DELETE, &one, P, &[]).status(), 204);
        create(&s.base, PARENT, P, &form);
    }
);

#[test]
fn loopback_callbacks_need_allow_loopback() {
    let form = [
        ("CallbackUrl", "http://127.0.0.1:8123/hook"),
        ("TriggerValue", "1"),
        ("UsageCategory", "calls"),
    ];
    let store = TestStore::sqlite();
    let (s, _) = scenario_with(&store, false);
    let msg = twilio_error(
        send(
            Method::POST,
            &triggers_url(&s.base, PARENT, ".json"),
            P,
            &form,
        ),
        400,
        20001,
    );
    assert!(
        msg.contains("CallbackUrl") && msg.contains("allow"),
        "{msg}"
    );
    let store = TestStore::sqlite();
    let (s, state) = scenario_with(&store, true);
    let t = create(&s.base, PARENT, P, &form);
    assert_eq!(t["callback_url"], "http://127.0.0.1:8123/hook");
    // Private addresses stay refused.
    let msg = twilio_error(
        send(
            Method::POST,
            &triggers_url(&s.base, PARENT, ".json"),
            P,
            &[("CallbackUrl", "http://10.1.2.3/"), form[1], form[2]],
        ),
        400,
        20001,
    );
    assert!(msg.contains("private"), "{msg}");
    assert_eq!(state.triggers().len(), 1);
}

/// A create that fails answers having stored nothing: the current value is
/// read before the insert (it was read after the commit, so a failed read
/// answered 500/503 "nothing was changed, retry" with the trigger stored,
/// and the client's retry made a second one).
#[test]
fn a_failed_create_stores_nothing() {
    let store = TestStore::sqlite();
    let (s, state) = scenario_with(&store, false);
    // The account's usage pages no longer decode.
    state
        .store()
        .with_conn(|c| {
            c.execute(
                "UPDATE usage_pages SET data = $1 WHERE account_sid = $2",
                &[
                    tallyd::store::Param::Bytes(b"not a page"),
                    tallyd::store::Param::Text(PARENT),
                ],
            )
        })
        .unwrap();
    let form = [
        ("CallbackUrl", HOOK),
        ("TriggerValue", "100"),
        ("UsageCategory", "calls"),
        ("Recurring", "daily"),
    ];
    let r = send(
        Method::POST,
        &triggers_url(&s.base, PARENT, ".json"),
        P,
        &form,
    );
    assert!(r.status().is_server_error(), "{}", r.status());
    let stored = state
        .store()
        .with_conn(|c| c.count_triggers(PARENT))
        .unwrap();
    assert_eq!(stored, 0);
    assert_eq!(state.triggers().len(), 0);
}

fn run_twilio_client(store: TestStore) {
    ensure_python_requirements("twilio");
    let (server, state) = scenario(&store, NOW);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/twilio_triggers_check.py"
    );
    let out = Command::new("python3")
        .args([script, &server.base, PARENT, PARENT_TOKEN])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "twilio client check failed\n{stdout}\n{stderr}"
    );
    for step in ["create", "list", "fetch", "update", "delete"] {
        assert!(stdout.contains(&format!("ok: {step}")), "{step}: {stdout}");
    }
    // The script deleted what it created but one trigger it keeps.
    let left = state.store().with_conn(|c| c.all_triggers()).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].friendly_name, "kept by the helper library");
    let in_book: Vec<_> = state
        .triggers()
        .of(PARENT)
        .iter()
        .map(|t| (**t).clone())
        .collect();
    assert_eq!(in_book, left);
}

#[test]
fn twilio_client_manages_triggers_sqlite() {
    run_twilio_client(TestStore::sqlite());
}

#[test]
fn twilio_client_manages_triggers_postgres() {
    if let Some(base) = postgres_base() {
        run_twilio_client(TestStore::postgres(&base));
    }
}

#[test]
fn openapi_documents_the_five_operations() {
    let doc: serde_yaml::Value = serde_yaml::from_str(tallyd::api::OPENAPI_YAML).unwrap();
    let paths = &doc["paths"];
    let list = &paths["/2010-04-01/Accounts/{AccountSid}/Usage/Triggers.json"];
    let one = &paths["/2010-04-01/Accounts/{AccountSid}/Usage/Triggers/{UsageTriggerSid}.json"];
    for (path, method, id) in [
        (list, "get", "listUsageTriggers"),
        (list, "post", "createUsageTrigger"),
        (one, "get", "fetchUsageTrigger"),
        (one, "post", "updateUsageTrigger"),
        (one, "delete", "deleteUsageTrigger"),
    ] {
        assert_eq!(
            path[method]["operationId"].as_str(),
            Some(id),
            "{method} {id}"
        );
    }
    // Every field the API sends is documented.
    let fields = &doc["components"]["schemas"]["UsageTrigger"]["properties"];
    for f in [
        "account_sid",
        "api_version",
        "callback_method",
        "callback_url",
        "current_value",
        "date_created",
        "date_fired",
        "date_updated",
        "friendly_name",
        "recurring",
        "sid",
        "trigger_by",
        "trigger_value",
        "uri",
        "usage_category",
        "usage_record_uri",
    ] {
        assert!(!fields[f].is_null(), "{f} is not documented");
    }
}

// The daemon serves the API (real clock), and failed authentications on the
// triggers' paths count against the client's quota as on every other path:
// past it, even the right credentials get 429.
#[test]
fn the_daemon_serves_triggers_and_throttles_guesses() {
    let store = TestStore::sqlite();
    let t = Tallyd::start(
        &store.url(),
        &[("TALLYD_API__AUTH_FAILURES_PER_MINUTE", "3")],
    );
    let url = triggers_url(&t.base, PARENT, ".json");
    let form = [
        ("CallbackUrl", HOOK),
        ("TriggerValue", "+5"),
        ("UsageCategory", "calls"),
    ];
    let created = create(&t.base, PARENT, P, &form);
    assert_eq!(created["trigger_value"], "5", "no usage stored yet");
    let today = chrono::Utc::now().format("%d %b %Y").to_string();
    assert!(
        created["date_created"].as_str().unwrap().contains(&today),
        "{created}"
    );
    let one = triggers_url(
        &t.base,
        PARENT,
        &format!("/{}.json", created["sid"].as_str().unwrap()),
    );
    let (st, fetched) = json_of(send(Method::GET, &one, P, &[]));
    assert_eq!((st.as_u16(), &fetched), (200, &created));
    for _ in 0..3 {
        twilio_error(
            send(Method::POST, &url, (PARENT, "guessed-token"), &form),
            401,
            20003,
        );
    }
    let r = send(Method::DELETE, &one, (PARENT, "guessed-token"), &[]);
    assert!(r.headers().contains_key("retry-after"));
    twilio_error(r, 429, 20429);
    twilio_error(send(Method::DELETE, &one, P, &[]), 429, 20429);
    twilio_error(
        get_basic(&records_url(&t.base, PARENT, ".json"), PARENT, PARENT_TOKEN),
        429,
        20429,
    );
    t.stop();
    let left = Store::open(&store.url())
        .unwrap()
        .with_conn(|c| c.all_triggers())
        .unwrap();
    assert_eq!(left.len(), 1, "the throttled DELETE deleted nothing");
}

fn filled_with_url(store: &TestStore) -> (Server, ApiState, String) {
    let (s, state) = scenario(store, NOW);
    (s, state, store.url())
}

/// Counts `cdrs` and flushes them as the daemon does, with the triggers the
/// book holds for their accounts; records the firings in the book.
fn flush_with_book(url: &str, state: &ApiState, cdrs: &[String]) -> usize {
    use tallyd::counters::Deltas;
    use tallyd::dedup::DedupWindow;
    use tallyd::pipeline::{ingest, Outcome};
    let (_, tariff) = config(url);
    let mut counters = Deltas::default();
    let mut seen = DedupWindow::new(tallyd::calendar::Day(0));
    for c in cdrs {
        assert!(matches!(
            ingest(c.as_bytes(), &tariff, &mut counters, &mut seen),
            Ok(Outcome::Counted(_))
        ));
    }
    let batch = tallyd::store::FlushBatch {
        as_of: AS_OF.to_owned(),
        pages: tallyd::flush::expand::pages(vec![counters], &tariff),
        triggers: state.triggers().of(PARENT),
        consumed_at_ms: NOW * 1000,
        ..Default::default()
    };
    let (outcome, report) = state.store().write_flush_firing(&batch).unwrap();
    assert_eq!(outcome, tallyd::store::FlushOutcome::Applied);
    state
        .triggers()
        .record_flush(&report.observed, &report.fired);
    report.fired.len()
}

// A trigger made through the API is evaluated by the next flush: it fires
// once, the API shows when and the value now, an update through the API
// keeps the firing, and a trigger not crossed stays unfired.
both_stores!(api_triggers_fire_in_the_flush, filled_with_url, |(
    s,
    state,
    url,
): &(
    Server,
    ApiState,
    String
)| {
    let base = &s.base;
    // SMS on 2025-02-02: 1 so far, so this fires at the second.
    let daily = create(
        base,
        PARENT,
        P,
        &[
            ("CallbackUrl", HOOK),
            ("TriggerValue", "+1"),
            ("UsageCategory", "sms"),
            ("TriggerBy", "count"),
            ("Recurring", "daily"),
        ],
    );
    let calm = create(
        base,
        PARENT,
        P,
        &[
            ("CallbackUrl", HOOK),
            ("TriggerValue", "100"),
            ("UsageCategory", "calls"),
            ("TriggerBy", "count"),
        ],
    );
    let sms_now = sms(
        "t1",
        PARENT,
        "2025-02-02T14:00:00Z",
        "outbound",
        1,
        None,
        None,
    );
    assert_eq!(flush_with_book(url, state, &[sms_now]), 1);
    let fetch = |t: &Value| {
        let u = triggers_url(
            base,
            PARENT,
            &format!("/{}.json", t["sid"].as_str().unwrap()),
        );
        let (st, body) = json_of(send(Method::GET, &u, P, &[]));
        assert_eq!(st, 200, "{body}");
        body
    };
    let fired = fetch(&daily);
    assert_eq!(fired["current_value"], "2");
    let when = fired["date_fired"]
        .as_str()
        .unwrap_or_else(|| panic!("{fired}"));
    assert!(
        chrono::DateTime::parse_from_rfc2822(when).is_ok() && when.ends_with(" +0000"),
        "{when}"
    );
    assert_eq!(fetch(&calm)["date_fired"], Value::Null);
    let outbox = state
        .store()
        .with_conn(|c| c.query("SELECT source_sid, url, method FROM webhook_outbox", &[]))
        .unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0][0].text(), daily["sid"].as_str().unwrap());
    assert_eq!((outbox[0][1].text(), outbox[0][2].text()), (HOOK, "POST"));
    // Renaming it keeps the firing, in the store and in the book.
    let u = triggers_url(
        base,
        PARENT,
        &format!("/{}.json", daily["sid"].as_str().unwrap()),
    );
    let (st, renamed) = json_of(send(Method::POST, &u, P, &[("FriendlyName", "daily sms")]));
    assert_eq!(st, 200, "{renamed}");
    assert_eq!(renamed["date_fired"], fired["date_fired"]);
    let in_book = state
        .triggers()
        .of(PARENT)
        .into_iter()
        .find(|t| t.sid == daily["sid"].as_str().unwrap())
        .unwrap();
    assert_eq!(in_book.fired_period.as_deref(), Some("2025-02-02"));
    assert_eq!(in_book.friendly_name, "daily sms");
    // The same day does not fire again.
    let again = sms(
        "t2",
        PARENT,
        "2025-02-02T14:30:00Z",
        "outbound",
        1,
        None,
        None,
    );
    assert_eq!(flush_with_book(url, state, &[again]), 0);
    assert_eq!(fetch(&daily)["current_value"], "3");
});
