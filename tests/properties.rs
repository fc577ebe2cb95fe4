//! Properties of the in-process path that must hold for any input.
//!
//! Random but well-formed CDR sets are serialised to JSON and run through
//! `pipeline::ingest`, as the consumer does; the deltas are then taken and expanded
//! as the flusher does. The records must agree with the rollup tree (docs/contract.md §2),
//! with the period tree (day ⊂ month ⊂ year ⊂ all-time) and with a model computed
//! straight from the generated CDRs, and must not depend on CDR order, shard count
//! or concurrent writers. The compiled integer rating must equal the `Decimal`
//! reference for any tariff, and the decoder must answer every byte string with a
//! CDR or a reason, never a panic.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use tallyd::calendar::{Day, Period};
use tallyd::category::Category;
use tallyd::cdr::{
    decode, decode_with_serde_json, AccountSid, CallStatus, MessageKind, Mode, RejectReason, Usage,
};
use tallyd::config::Config;
use tallyd::counters::{Deltas, RecordKey, Tally};
use tallyd::dedup::DedupWindow;
use tallyd::pipeline::{ingest, ingest_batch, NoDedup, Outcome};
use tallyd::rating::{reference_price, PlanConfig, RateConfig, RatingConfig, Tariff, PRICE_SCALE};

/// Accounts the generated CDRs belong to; the last is on the `callingbox` plan in
/// the shipped config, the others on the default `agentphone` plan.
const ACCOUNTS: [&str; 3] = [
    "AC0123456789abcdef0123456789abcdef",
    "ACffffffffffffffffffffffffffff0001",
    "AC00000000000000000000000000000c11",
];

fn shipped_tariff() -> Tariff {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    Config::from_toml(&text, &path, []).unwrap().1
}

/// One generated CDR, kept structured so the test can compute what it should add.
#[derive(Debug, Clone)]
struct GenCdr {
    account: usize,
    /// Seconds since 2024-12-30T00:00:00Z: the range crosses a month and a year.
    offset: i64,
    inbound: bool,
    phone_number: Option<u8>,
    agent_id: Option<u8>,
    usage: GenUsage,
}

#[derive(Debug, Clone)]
enum GenUsage {
    Call {
        number_type: Option<&'static str>,
        status: &'static str,
        duration: u32,
        billsec: u32,
        mode: Option<&'static str>,
    },
    Message {
        mms: bool,
        number_type: Option<&'static str>,
        segments: Option<u32>,
    },
}

fn gen_usage() -> impl Strategy<Value = GenUsage> {
    let call = (
        proptest::option::of(prop::sample::select(vec![
            "local", "mobile", "tollfree", "sip", "client",
        ])),
        prop::sample::select(vec!["completed", "no-answer", "busy", "failed", "canceled"]),
        0u32..4000,
        0u32..=100,
        proptest::option::of(prop::sample::select(vec!["webhook", "hosted"])),
    )
        .prop_map(
            |(number_type, status, duration, pct, mode)| GenUsage::Call {
                number_type,
                status,
                duration,
                billsec: (duration as u64 * pct as u64 / 100) as u32,
                mode,
            },
        );
    let message = (
        any::<bool>(),
        proptest::option::of(prop::sample::select(vec![
            "longcode",
            "shortcode",
            "tollfree",
        ])),
        proptest::option::of(1u32..10),
    )
        .prop_map(|(mms, number_type, segments)| GenUsage::Message {
            mms,
            number_type,
            segments,
        });
    prop_oneof![call, message]
}

fn gen_cdr() -> impl Strategy<Value = GenCdr> {
    (
        0..ACCOUNTS.len(),
        0i64..(40 * 86_400),
        any::<bool>(),
        proptest::option::of(0u8..3),
        proptest::option::of(0u8..3),
        gen_usage(),
    )
        .prop_map(
            |(account, offset, inbound, phone_number, agent_id, usage)| GenCdr {
                account,
                offset,
                inbound,
                phone_number,
                agent_id,
                usage,
            },
        )
}

const START: i64 = 1_735_516_800; // 2024-12-30T00:00:00Z

impl GenCdr {
    fn json(&self, id: usize) -> Vec<u8> {
        let ts = chrono::DateTime::from_timestamp(START + self.offset, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut m = Map::new();
        m.insert("id".into(), json!(format!("ev-{id}")));
        m.insert("account_sid".into(), json!(ACCOUNTS[self.account]));
        m.insert("timestamp".into(), json!(ts));
        let dir = if self.inbound { "inbound" } else { "outbound" };
        m.insert("direction".into(), json!(dir));
        if let Some(n) = self.phone_number {
            m.insert("phone_number".into(), json!(format!("+1415555010{n}")));
        }
        if let Some(a) = self.agent_id {
            m.insert("agent_id".into(), json!(format!("agent-{a}")));
        }
        m.insert("ignored".into(), json!({"nested": [1, "two", null]}));
        match &self.usage {
            GenUsage::Call {
                number_type,
                status,
                duration,
                billsec,
                mode,
            } => {
                m.insert("kind".into(), json!("call"));
                if let Some(t) = number_type {
                    m.insert("number_type".into(), json!(t));
                }
                m.insert("status".into(), json!(status));
                m.insert("duration".into(), json!(duration));
                m.insert("billsec".into(), json!(billsec));
                if let Some(md) = mode {
                    m.insert("mode".into(), json!(md));
                }
            }
            GenUsage::Message {
                mms,
                number_type,
                segments,
            } => {
                m.insert("kind".into(), json!(if *mms { "mms" } else { "sms" }));
                if let Some(t) = number_type {
                    m.insert("number_type".into(), json!(t));
                }
                if let Some(s) = segments {
                    m.insert("segments".into(), json!(s));
                }
            }
        }
        serde_json::to_vec(&Value::Object(m)).unwrap()
    }

    /// The leaf, computed from docs/contract.md §2 independently of `Cdr::leaf`.
    fn leaf(&self) -> Category {
        use Category::*;
        match &self.usage {
            GenUsage::Call { number_type, .. } => {
                match (number_type.unwrap_or("local"), self.inbound) {
                    ("sip", true) => CallsSipInbound,
                    ("sip", false) => CallsSipOutbound,
                    ("client", _) => CallsClient,
                    (_, false) => CallsOutbound,
                    ("local", true) => CallsInboundLocal,
                    ("mobile", true) => CallsInboundMobile,
                    ("tollfree", true) => CallsInboundTollfree,
                    other => unreachable!("{other:?}"),
                }
            }
            GenUsage::Message {
                mms, number_type, ..
            } => {
                let short = *number_type == Some("shortcode");
                match (mms, self.inbound, short) {
                    (false, true, false) => SmsInboundLongcode,
                    (false, true, true) => SmsInboundShortcode,
                    (false, false, false) => SmsOutboundLongcode,
                    (false, false, true) => SmsOutboundShortcode,
                    (true, true, false) => MmsInboundLongcode,
                    (true, true, true) => MmsInboundShortcode,
                    (true, false, false) => MmsOutboundLongcode,
                    (true, false, true) => MmsOutboundShortcode,
                }
            }
        }
    }

    /// Billed seconds or segments.
    fn usage(&self) -> u64 {
        match &self.usage {
            GenUsage::Call {
                status, billsec, ..
            } if *status == "completed" => *billsec as u64,
            GenUsage::Call { .. } => 0,
            GenUsage::Message { segments, .. } => segments.unwrap_or(1) as u64,
        }
    }

    fn day(&self) -> Day {
        Day::from_unix(START + self.offset)
    }
}

/// Ingests the messages dealt round-robin over `parts` deltas (as partitions
/// of one flush are), then merges them.
fn run(msgs: &[Vec<u8>], tariff: &Tariff, parts: usize) -> Deltas {
    let mut deltas: Vec<Deltas> = (0..parts).map(|_| Deltas::default()).collect();
    for (i, m) in msgs.iter().enumerate() {
        match ingest(m, tariff, &mut deltas[i % parts], &mut NoDedup) {
            Ok(Outcome::Counted(_)) => {}
            other => panic!("{other:?} for {}", String::from_utf8_lossy(m)),
        }
    }
    let mut all = Deltas::default();
    for d in deltas {
        all.merge(d);
    }
    all
}

type Records = hashbrown::HashMap<RecordKey, Tally, rustc_hash::FxBuildHasher>;

fn get(r: &Records, account: AccountSid, category: Category, period: Period) -> Tally {
    r.get(&RecordKey {
        account,
        category,
        period,
    })
    .copied()
    .unwrap_or_default()
}

fn sum(ts: impl IntoIterator<Item = Tally>) -> Tally {
    let mut s = Tally::default();
    for t in ts {
        s.add(t);
    }
    s
}

/// Every rollup equals the sum of its children, for every account and period.
fn check_rollups(r: &Records) -> Result<(), TestCaseError> {
    use Category::*;
    let rules: [(Category, &[Category]); 10] = [
        (Calls, &[CallsInbound, CallsOutbound]),
        (
            CallsInbound,
            &[CallsInboundLocal, CallsInboundMobile, CallsInboundTollfree],
        ),
        (CallsSip, &[CallsSipInbound, CallsSipOutbound]),
        (SmsInbound, &[SmsInboundLongcode, SmsInboundShortcode]),
        (SmsOutbound, &[SmsOutboundLongcode, SmsOutboundShortcode]),
        (Sms, &[SmsInbound, SmsOutbound]),
        (MmsInbound, &[MmsInboundLongcode, MmsInboundShortcode]),
        (MmsOutbound, &[MmsOutboundLongcode, MmsOutboundShortcode]),
        (Mms, &[MmsInbound, MmsOutbound]),
        (TotalPrice, &[Calls, CallsSip, CallsClient, Sms, Mms]),
    ];
    let cells: std::collections::BTreeSet<(AccountSid, Period)> =
        r.keys().map(|k| (k.account, k.period)).collect();
    for (a, p) in cells {
        for (parent, children) in rules {
            let whole = get(r, a, parent, p);
            let parts = sum(children.iter().map(|c| get(r, a, *c, p)));
            prop_assert_eq!(whole, parts, "{} at {:?} for {}", parent, p, a);
        }
        let leaf_price: i64 = Category::ALL[..Category::LEAVES]
            .iter()
            .map(|c| get(r, a, *c, p).price)
            .sum();
        prop_assert_eq!(get(r, a, TotalPrice, p).price, leaf_price);
    }
    Ok(())
}

/// Days add up to their month, months to their year, years to all-time.
fn check_periods(r: &Records) -> Result<(), TestCaseError> {
    let mut months: BTreeMap<(AccountSid, Category, Period), Tally> = BTreeMap::new();
    let mut years: BTreeMap<(AccountSid, Category, Period), Tally> = BTreeMap::new();
    let mut all: BTreeMap<(AccountSid, Category, Period), Tally> = BTreeMap::new();
    for (k, t) in r {
        let coarser = match k.period {
            Period::Day(d) => (&mut months, Period::Month(d.month())),
            Period::Month(m) => (&mut years, Period::Year(m.year())),
            Period::Year(_) => (&mut all, Period::AllTime),
            Period::AllTime => continue,
        };
        coarser
            .0
            .entry((k.account, k.category, coarser.1))
            .or_default()
            .add(*t);
    }
    for sums in [months, years, all] {
        for ((a, c, p), t) in sums {
            prop_assert_eq!(get(r, a, c, p), t, "{} {:?} for {}", c, p, a);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn rollups_periods_and_model_agree(cdrs in prop::collection::vec(gen_cdr(), 0..80)) {
        let tariff = shipped_tariff();
        let msgs: Vec<_> = cdrs.iter().enumerate().map(|(i, c)| c.json(i)).collect();
        let deltas = run(&msgs, &tariff, 16);
        let records = deltas.expand();
        check_rollups(&records)?;
        check_periods(&records)?;

        // Leaf-day counts and usage match a model built from the generated CDRs.
        let mut model: BTreeMap<(AccountSid, Category, Period), (u64, u64)> = BTreeMap::new();
        for c in &cdrs {
            let account = AccountSid::parse(ACCOUNTS[c.account]).unwrap();
            let m = model.entry((account, c.leaf(), Period::Day(c.day()))).or_default();
            m.0 += 1;
            m.1 += c.usage();
        }
        let leaf_days = records
            .iter()
            .filter(|(k, _)| k.category.is_leaf() && matches!(k.period, Period::Day(_)))
            .count();
        prop_assert_eq!(leaf_days, model.len());
        for ((a, c, p), (count, usage)) in model {
            let t = get(&records, a, c, p);
            prop_assert_eq!((t.count, t.usage), (count, usage), "{} {:?}", c, p);
        }
        let calls = cdrs.iter().filter(|c| matches!(c.usage, GenUsage::Call { .. })).count();
        let all_calls: u64 = ACCOUNTS
            .iter()
            .map(|a| {
                let a = AccountSid::parse(a).unwrap();
                [Category::Calls, Category::CallsSip, Category::CallsClient]
                    .iter()
                    .map(|c| get(&records, a, *c, Period::AllTime).count)
                    .sum::<u64>()
            })
            .sum();
        prop_assert_eq!(all_calls, calls as u64);
    }

    #[test]
    fn totals_do_not_depend_on_order_or_shards(
        (cdrs, shuffled) in prop::collection::vec(gen_cdr(), 0..60)
            .prop_flat_map(|v| {
                let idx: Vec<usize> = (0..v.len()).collect();
                (Just(v), Just(idx).prop_shuffle())
            })
    ) {
        let tariff = shipped_tariff();
        let msgs: Vec<_> = cdrs.iter().enumerate().map(|(i, c)| c.json(i)).collect();
        let reordered: Vec<_> = shuffled.iter().map(|&i| msgs[i].clone()).collect();

        let serial = run(&msgs, &tariff, 1);
        prop_assert_eq!(&serial, &run(&reordered, &tariff, 1));
        prop_assert_eq!(&serial, &run(&msgs, &tariff, 16));
        prop_assert_eq!(serial.expand(), run(&reordered, &tariff, 16).expand());

        // Two consumer threads counting at once, merged at the flush.
        let halves: Vec<Deltas> = std::thread::scope(|s| {
            let handles: Vec<_> = [0, 1]
                .map(|half| {
                    let (msgs, tariff) = (&reordered, &tariff);
                    s.spawn(move || {
                        let mut d = Deltas::default();
                        for m in msgs.iter().skip(half).step_by(2) {
                            ingest(m, tariff, &mut d, &mut NoDedup).unwrap();
                        }
                        d
                    })
                })
                .into_iter()
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut merged = Deltas::default();
        for d in halves {
            merged.merge(d);
        }
        prop_assert_eq!(serial.expand(), merged.expand());
    }

    /// The daemon's batched path (waves of prefetches, then the updates) counts
    /// exactly what message-by-message ingestion counts, with the same outcome per
    /// message, duplicates and malformed messages included, whatever the batch cut.
    #[test]
    fn batched_ingest_equals_one_by_one(
        cdrs in prop::collection::vec(gen_cdr(), 1..120),
        extras in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8), 0..40),
        cut in 1usize..50,
    ) {
        let tariff = shipped_tariff();
        let mut msgs: Vec<Vec<u8>> = cdrs.iter().enumerate().map(|(i, c)| c.json(i)).collect();
        // Re-sent duplicates and broken copies at random places.
        for (at, what) in extras {
            let copy = msgs[at.index(msgs.len())].clone();
            let m = match what {
                0 => copy,
                1 => copy[..copy.len() / 2].to_vec(),
                _ => b"{\"id\":7}".to_vec(),
            };
            msgs.insert(at.index(msgs.len() + 1), m);
        }

        let mut one_window = DedupWindow::new(Day(20_000));
        let mut one = Deltas::default();
        let expected: Vec<_> = msgs
            .iter()
            .map(|m| ingest(m, &tariff, &mut one, &mut one_window))
            .collect();

        let mut batch_window = DedupWindow::new(Day(20_000));
        let mut batched = Deltas::default();
        let mut got = Vec::new();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        for chunk in refs.chunks(cut) {
            let base = got.len();
            ingest_batch(chunk, &tariff, &mut batched, &mut batch_window, &mut (), |i, r| {
                assert_eq!(i, got.len() - base);
                got.push(r);
            });
        }
        prop_assert_eq!(&expected, &got);
        prop_assert_eq!(&one, &batched);
        prop_assert_eq!(one_window.take_fresh(), batch_window.take_fresh());
    }
}

// ---- rating: compiled integers vs the Decimal reference ----

/// A decimal with up to `max_scale` decimal places and a mantissa below `max`.
fn money(max: i64, max_scale: u32) -> impl Strategy<Value = Decimal> {
    (0..max, 0..=max_scale).prop_map(|(m, s)| Decimal::new(m, s))
}

fn gen_rate(per_minute: bool) -> impl Strategy<Value = RateConfig> {
    (
        money(10_000_000, 6),
        prop::sample::select(vec![1u32, 6, 60]),
        proptest::option::of(prop::sample::select(vec![1u32, 6, 30, 60, 120])),
        proptest::option::of(money(100_000, 5)),
        proptest::option::of(money(100_000, 5)),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            move |(price, increment, first_increment, minimum, connect_fee, bill_unanswered)| {
                RateConfig {
                    per_minute: per_minute.then_some(price),
                    per_unit: (!per_minute).then_some(price),
                    increment: Some(increment),
                    first_increment,
                    minimum,
                    connect_fee,
                    bill_unanswered,
                    modes: BTreeMap::new(),
                }
            },
        )
}

fn one_plan(rates: Vec<(&str, RateConfig)>) -> Tariff {
    let plan = PlanConfig {
        currency: "usd".into(),
        rates: rates.into_iter().map(|(c, r)| (c.to_owned(), r)).collect(),
    };
    Tariff::compile(&RatingConfig {
        default_plan: "p".into(),
        plans: [("p".to_owned(), plan)].into(),
        accounts: BTreeMap::new(),
    })
    .unwrap()
}

fn as_price(d: Decimal) -> i64 {
    let mut d = d;
    d.rescale(PRICE_SCALE);
    i64::try_from(d.mantissa()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn compiled_call_price_equals_reference(
        rate in prop_oneof![gen_rate(true), gen_rate(false)],
        hosted_per_minute in proptest::option::of(money(10_000_000, 6)),
        status in prop::sample::select(vec![
            CallStatus::Completed, CallStatus::NoAnswer, CallStatus::Busy,
            CallStatus::Failed, CallStatus::Canceled,
        ]),
        billsec in prop_oneof![0u32..200, 0u32..100_000],
        hosted in any::<bool>(),
    ) {
        let mut with_modes = rate.clone();
        if let Some(p) = hosted_per_minute {
            with_modes.modes.insert(
                "hosted".into(),
                RateConfig { per_minute: Some(p), ..RateConfig::default() },
            );
        }
        let tariff = one_plan(vec![("calls", with_modes)]);
        let mode = hosted.then_some(Mode::Hosted);
        let usage = Usage::Call {
            number_type: tallyd::cdr::CallNumberType::Local,
            status,
            duration: billsec,
            billsec,
            mode,
        };
        let charge = tariff.plans()[0].rate(&usage, Category::CallsOutbound);
        // The hosted override replaces the price pair and inherits everything else.
        let effective = match (hosted, hosted_per_minute) {
            (true, Some(p)) => RateConfig { per_minute: Some(p), per_unit: None, ..rate },
            _ => rate,
        };
        let answered = status == CallStatus::Completed && billsec > 0;
        let expected = reference_price(&effective, answered, billsec, None);
        prop_assert_eq!(charge.price, as_price(expected), "{:?}", effective);
        prop_assert_eq!(charge.usage, if answered { billsec as u64 } else { 0 });
    }

    #[test]
    fn compiled_message_price_equals_reference(
        rate in gen_rate(false),
        segments in 1u32..2000,
        mms in any::<bool>(),
    ) {
        let tariff = one_plan(vec![("sms", rate.clone()), ("mms", rate.clone())]);
        let (kind, leaf) = if mms {
            (MessageKind::Mms, Category::MmsOutboundShortcode)
        } else {
            (MessageKind::Sms, Category::SmsInboundLongcode)
        };
        let usage = Usage::Message {
            kind,
            number_type: tallyd::cdr::MessageNumberType::Longcode,
            segments,
        };
        let charge = tariff.plans()[0].rate(&usage, leaf);
        let expected = reference_price(&rate, true, 0, Some(segments));
        prop_assert_eq!(charge.price, as_price(expected), "{:?}", rate);
        prop_assert_eq!(charge.usage, segments as u64);
    }
}

// ---- decoder: every byte string gets a CDR or a reason ----

fn check_answer(bytes: &[u8]) -> Result<(), TestCaseError> {
    // The fast path and serde_json must agree on every input.
    prop_assert_eq!(decode(bytes), decode_with_serde_json(bytes));
    match decode(bytes) {
        Ok(cdr) => {
            prop_assert!(!cdr.id.is_empty());
        }
        Err(r) => {
            prop_assert!(RejectReason::ALL.contains(&r.reason));
            prop_assert!(!r.message.is_empty());
            let structural = matches!(
                r.reason,
                RejectReason::InvalidJson | RejectReason::NotAnObject
            );
            prop_assert_eq!(r.field.is_none(), structural, "{:?}", r);
            if let Some(f) = r.field {
                prop_assert!(r.message.contains(f), "{:?}", r);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn gen_mutation() -> impl Strategy<Value = Mutation> {
    let tokens = prop::sample::select(vec![
        b"\"".to_vec(),
        b"\\".to_vec(),
        b"\\u".to_vec(),
        b"\\ud800".to_vec(),
        b"{".to_vec(),
        b"}".to_vec(),
        b"[".to_vec(),
        b",".to_vec(),
        b":".to_vec(),
        b"-".to_vec(),
        b"1e999".to_vec(),
        b"-0".to_vec(),
        b"18446744073709551616".to_vec(),
        b"null".to_vec(),
        b"\xff".to_vec(),
        b"\xc3\xa9".to_vec(),
        b"\0".to_vec(),
        b" ".to_vec(),
    ]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<usize>(),
            prop_oneof![tokens, prop::collection::vec(any::<u8>(), 1..8)]
        )
            .prop_map(|(i, t)| Mutation::Insert(i, t)),
        (any::<usize>(), 1usize..12).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if let Some(x) = bytes.get_mut(i % len) {
                    *x = *b;
                }
            }
            Mutation::Insert(i, t) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, t.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn decode_answers_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check_answer(&bytes)?;
    }

    #[test]
    fn decode_answers_mutated_cdrs(
        cdr in gen_cdr(),
        mutations in prop::collection::vec(gen_mutation(), 1..4),
    ) {
        let valid = cdr.json(7);
        prop_assert!(decode(&valid).is_ok());
        check_answer(&mutate(valid, &mutations))?;
    }
}
