//! Usage triggers end to end: triggers made through the Twilio-compatible
//! API of the real binary, CDRs through a real tansu broker, callbacks
//! received by a loopback receiver — each trigger fires exactly once per
//! period across `kill -9` of the daemon (SQLite) and across two instances
//! one of which is killed (PostgreSQL).

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Datelike, Utc};
use reqwest::blocking::Client;
use serde_json::{json, Value};

use common::ADMIN_TOKEN;

const TOPIC: &str = "cdrs";
const ROUNDS: usize = 40;
const ACCOUNTS: usize = 3;

fn sid(i: usize) -> String {
    format!("AC{:032x}", 0x7e1_6000 + i)
}

fn token(i: usize) -> String {
    format!("trigger-token-{i:04}-abcdefgh")
}

/// A callback the receiver got: its form parameters and signature header.
#[derive(Debug, Clone)]
struct Callback {
    params: HashMap<String, String>,
    signed: bool,
}

/// An HTTP receiver on loopback that answers 200 to every request and keeps
/// what it got.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Callback>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0;
                        let mut signed = false;
                        loop {
                            let mut h = String::new();
                            reader.read_line(&mut h).unwrap();
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            let (k, v) = h.split_once(':').unwrap();
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap();
                            }
                            if k.eq_ignore_ascii_case("x-twilio-signature") && !v.trim().is_empty()
                            {
                                signed = true;
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        let params = serde_urlencoded::from_bytes(&body).unwrap_or_default();
                        sink.lock().unwrap().push(Callback { params, signed });
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        Receiver { port, got }
    }

    fn callbacks(&self) -> Vec<Callback> {
        self.got.lock().unwrap().clone()
    }
}

/// One trigger as the test made it, and how to compute its value.
struct Made {
    sid: String,
    account: usize,
    recurring: &'static str,
    /// (category, trigger_by, value)
    what: (&'static str, &'static str, f64),
}

/// The triggers each account gets: (category, trigger_by, value, recurring).
const TRIGGERS: [(&str, &str, &str, &str); 4] = [
    ("sms", "count", "3", "daily"),
    ("calls", "usage", "2", "monthly"),
    ("totalprice", "price", "0.00001", ""),
    ("sms-outbound", "count", "5", "yearly"),
];

fn spawn(t: &support::Tansu, url: &str, log: &std::path::Path, port: u16) -> support::Daemon {
    let listen = format!("127.0.0.1:{port}");
    support::Daemon::spawn_with(
        &t.brokers(),
        url,
        "g-triggers",
        log,
        &[
            ("TALLYD_HTTP__LISTEN", listen.as_str()),
            ("TALLYD_API__ADMIN_TOKEN", ADMIN_TOKEN),
            ("TALLYD_WEBHOOKS__ALLOW_LOOPBACK", "true"),
        ],
    )
}

/// Sends a request until a daemon on one of `ports` answers it with other
/// than a 5xx or a connection error (daemons are started and killed meanwhile).
fn send(
    http: &Client,
    ports: &[&AtomicU16],
    build: impl Fn(&Client, String) -> reqwest::blocking::RequestBuilder,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        for port in ports {
            let base = format!("http://127.0.0.1:{}", port.load(Ordering::Acquire));
            if let Ok(r) = build(http, base).timeout(Duration::from_secs(5)).send() {
                let status = r.status().as_u16();
                if status < 500 {
                    return (status, r.json().unwrap_or(Value::Null));
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no daemon answered for 4 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn setup(http: &Client, ports: &[&AtomicU16], receiver: &Receiver) -> Vec<Made> {
    let mut made = Vec::new();
    for a in 0..ACCOUNTS {
        let (s, r) = send(http, ports, |c, base| {
            c.post(format!("{base}/admin/accounts"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"sid": sid(a), "auth_token": token(a)}))
        });
        assert_eq!(s, 201, "{r}");
        for (category, by, value, recurring) in TRIGGERS {
            let callback = format!("http://127.0.0.1:{}/usage/{a}", receiver.port);
            let (s, r) = send(http, ports, |c, base| {
                c.post(format!(
                    "{base}/2010-04-01/Accounts/{}/Usage/Triggers.json",
                    sid(a)
                ))
                .basic_auth(sid(a), Some(token(a)))
                .form(&[
                    ("CallbackUrl", callback.as_str()),
                    ("UsageCategory", category),
                    ("TriggerBy", by),
                    ("TriggerValue", value),
                    ("Recurring", recurring),
                ])
            });
            assert_eq!(s, 201, "{r}");
            made.push(Made {
                sid: r["sid"].as_str().unwrap().to_owned(),
                account: a,
                recurring,
                what: (category, by, value.parse().unwrap()),
            });
        }
    }
    made
}

/// One CDR the driver sent: account, UTC day (`YYYY-MM-DD`), kind, seconds.
struct Sent {
    account: usize,
    day: chrono::NaiveDate,
    call: Option<u32>,
}

/// Produces the run's CDRs: per round and account an outbound SMS and, every
/// fourth round, a 45-second call; the first half today, the second tomorrow
/// (two daily periods, perhaps two months or years).
fn drive(brokers: &str, progress: &AtomicUsize) -> Vec<Sent> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let today = Utc::now();
    let mut sent = Vec::new();
    for round in 0..ROUNDS {
        progress.store(round, Ordering::Release);
        let at = if round < ROUNDS / 2 {
            today
        } else {
            today + chrono::Duration::days(1)
        };
        for a in 0..ACCOUNTS {
            let mut cdrs = vec![(
                json!({"id": format!("SM{a}-{round}"), "account_sid": sid(a), "kind": "sms",
                    "timestamp": at.to_rfc3339(), "direction": "outbound"}),
                None,
            )];
            if round % 4 == 0 {
                cdrs.push((
                    json!({"id": format!("CA{a}-{round}"), "account_sid": sid(a), "kind": "call",
                        "timestamp": at.to_rfc3339(), "direction": "outbound",
                        "status": "completed", "duration": 50, "billsec": 45}),
                    Some(45),
                ));
            }
            for (cdr, call) in cdrs {
                let payload = cdr.to_string();
                while let Err((e, _)) =
                    producer.send(BaseRecord::to(TOPIC).key(&sid(a)).payload(&payload))
                {
                    assert!(matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ));
                    producer.poll(Duration::from_millis(50));
                }
                sent.push(Sent {
                    account: a,
                    day: at.date_naive(),
                    call,
                });
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    sent
}

/// The period key a trigger fires under for a CDR on `day`.
fn period(recurring: &str, day: chrono::NaiveDate) -> String {
    match recurring {
        "daily" => day.format("%Y-%m-%d").to_string(),
        "monthly" => day.format("%Y-%m").to_string(),
        "yearly" => format!("{:04}", day.year()),
        _ => "all".into(),
    }
}

/// The (trigger SID, period key) pairs that must fire, computed from what was
/// sent: every period whose value reached the trigger's.
fn expected(made: &[Made], sent: &[Sent]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for m in made {
        let mut value: BTreeMap<String, f64> = BTreeMap::new();
        for s in sent.iter().filter(|s| s.account == m.account) {
            let (category, by, _) = m.what;
            let counts = matches!(
                (category, s.call),
                ("sms" | "sms-outbound", None) | ("calls", Some(_)) | ("totalprice", _)
            );
            if !counts {
                continue;
            }
            let add = match (by, s.call) {
                ("count", _) => 1.0,
                ("usage", Some(secs)) => secs as f64 / 60.0,
                ("usage", None) => 1.0,
                // Every CDR here has a price above the trigger's value.
                _ => 1.0,
            };
            *value.entry(period(m.recurring, s.day)).or_default() += add;
        }
        for (p, v) in value {
            if v >= m.what.2 {
                out.insert((m.sid.clone(), p));
            }
        }
    }
    out
}

/// Waits until every expected firing was delivered, then checks each
/// (trigger, period) came with one idempotency token and nothing else came.
fn check_callbacks(receiver: &Receiver, expect: &BTreeSet<(String, String)>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let fired = |cbs: &[Callback]| -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut by: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for c in cbs {
            let tok = c.params["IdempotencyToken"].clone();
            let period = tok.rsplit_once("-FIRES-").unwrap().1;
            let period = period.split_once('-').unwrap().1.to_owned();
            by.entry((c.params["UsageTriggerSid"].clone(), period))
                .or_default()
                .insert(tok);
        }
        by
    };
    loop {
        let got = fired(&receiver.callbacks());
        if expect.iter().all(|k| got.contains_key(k)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every firing delivered: expected {expect:#?}, got {got:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Anything late or repeated would come now.
    std::thread::sleep(Duration::from_secs(2));
    let cbs = receiver.callbacks();
    let got = fired(&cbs);
    let keys: BTreeSet<_> = got.keys().cloned().collect();
    assert_eq!(
        &keys, expect,
        "fired exactly the periods that reached their value"
    );
    for (k, tokens) in &got {
        assert_eq!(tokens.len(), 1, "{k:?} fired once: {tokens:?}");
    }
    for c in &cbs {
        assert!(c.signed, "every callback is signed: {c:?}");
        let (current, trigger): (f64, f64) = (
            c.params["CurrentValue"].parse().unwrap(),
            c.params["TriggerValue"].parse().unwrap(),
        );
        assert!(current >= trigger, "{c:?}");
    }
    eprintln!(
        "{} firings delivered in {} callbacks (repeats of a token are allowed: at least once)",
        got.len(),
        cbs.len()
    );
}

/// A run of CDRs with triggers on every account while daemons are killed:
/// `instances` = 1 restarts the killed daemon; 2 runs two instances and
/// kills one for good.
fn fire_once_per_period(url: &str, instances: usize) {
    use rand::{Rng, SeedableRng};
    let dir = support::test_dir();
    let log = dir.path().join("tallyd.log");
    let t = support::Tansu::start();
    t.create_topic(TOPIC, 4);
    t.create_topic("cdrs-dead-letter", 1);
    let receiver = Receiver::start();
    let ports: Vec<AtomicU16> = (0..instances)
        .map(|_| AtomicU16::new(support::free_port()))
        .collect();
    let port_refs: Vec<&AtomicU16> = ports.iter().collect();
    let mut daemons: Vec<support::Daemon> = ports
        .iter()
        .map(|p| spawn(&t, url, &log, p.load(Ordering::Relaxed)))
        .collect();
    let http = Client::new();
    let made = setup(&http, &port_refs, &receiver);
    let progress = AtomicUsize::new(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(instances as u64);
    let sent = std::thread::scope(|s| {
        let driver = s.spawn(|| drive(&t.brokers(), &progress));
        let kills: &[usize] = if instances == 1 {
            &[ROUNDS / 4, ROUNDS / 2 + 3, 3 * ROUNDS / 4]
        } else {
            &[ROUNDS / 3]
        };
        for &at in kills {
            while progress.load(Ordering::Acquire) < at && !driver.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            let victim = daemons.len() - 1;
            daemons[victim].kill9();
            if instances == 1 {
                ports[0].store(support::free_port(), Ordering::Release);
                daemons[0] = spawn(&t, url, &log, ports[0].load(Ordering::Relaxed));
            } else {
                daemons.pop();
                // Requests go to the survivor from now on.
                ports[victim].store(ports[0].load(Ordering::Relaxed), Ordering::Release);
            }
        }
        driver.join().unwrap()
    });
    support::wait_flushed(
        url,
        TOPIC,
        sent.len() as u64,
        Duration::from_secs(240),
        &log,
    );
    let expect = expected(&made, &sent);
    // Every account: its daily trigger twice (today, tomorrow), its once
    // trigger once, and the others at least once.
    assert!(expect.len() >= ACCOUNTS * 5, "{expect:?}");
    check_callbacks(&receiver, &expect);
    // The API shows each trigger's last firing.
    for m in &made {
        let (s, r) = send(&http, &port_refs, |c, base| {
            c.get(format!(
                "{base}/2010-04-01/Accounts/{}/Usage/Triggers/{}.json",
                sid(m.account),
                m.sid
            ))
            .basic_auth(sid(m.account), Some(token(m.account)))
        });
        assert_eq!(s, 200, "{r}");
        assert!(r["date_fired"].is_string(), "{} fired: {r}", m.sid);
    }
    for mut d in daemons {
        d.stop();
    }
}

#[test]
fn each_trigger_fires_once_per_period_across_kill_9() {
    let dir = support::test_dir();
    let url = format!("sqlite://{}/tallyd.db", dir.path().display());
    fire_once_per_period(&url, 1);
}

#[test]
fn two_instances_one_killed_each_trigger_fires_once() {
    let schema = support::PgSchema::new("triggers2");
    fire_once_per_period(&schema.url, 2);
}
