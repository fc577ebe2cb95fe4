//! A deterministic load generator of realistic synthetic CDRs, with a configurable
//! share of re-sent duplicates and malformed messages. The same seed gives the same
//! messages, so a test can write them to a JSON-lines file and compute the ground
//! truth independently of the daemon.

use std::io::Write;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::calendar::Day;

#[derive(Debug, Clone)]
pub struct GeneratorSettings {
    pub seed: u64,
    /// Distinct accounts (the first one is the CallingBox plan account of the shipped config).
    pub accounts: usize,
    /// Share of messages that re-send an earlier CDR unchanged (0.0–1.0).
    pub duplicate_rate: f64,
    /// Share of messages that are malformed (0.0–1.0).
    pub malformed_rate: f64,
    /// Share of CDRs that arrive late: their event time falls on one of the `days`
    /// days ending with `last_day`. The others happen on `last_day` itself, as a
    /// switch's near-real-time stream does.
    pub late_rate: f64,
    /// How many days back late CDRs reach.
    pub days: u32,
    pub last_day: Day,
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        GeneratorSettings {
            seed: 1,
            accounts: 1000,
            duplicate_rate: 0.01,
            malformed_rate: 0.001,
            late_rate: 0.02,
            days: 30,
            last_day: Day::today(),
        }
    }
}

/// One message: key = account SID, payload = the CDR bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub key: String,
    pub payload: Vec<u8>,
}

pub struct Generator {
    s: GeneratorSettings,
    rng: ChaCha8Rng,
    accounts: Vec<String>,
    numbers: Vec<Vec<String>>,
    recent: Vec<Generated>,
    seq: u64,
}

const AGENTS: [&str; 6] = [
    "agt_sales",
    "agt_support",
    "agt_billing",
    "agt_triage",
    "agt_night",
    "agt_vip",
];

impl Generator {
    pub fn new(s: GeneratorSettings) -> Generator {
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
        let mut accounts = vec!["AC00000000000000000000000000000c11".to_string()];
        while accounts.len() < s.accounts.max(1) {
            accounts.push(format!("AC{:032x}", rng.gen::<u128>()));
        }
        let numbers = (0..accounts.len())
            .map(|_| {
                (0..rng.gen_range(1..=3))
                    .map(|_| format!("+1415{:07}", rng.gen_range(0..10_000_000)))
                    .collect()
            })
            .collect();
        Generator {
            s,
            rng,
            accounts,
            numbers,
            recent: Vec::new(),
            seq: 0,
        }
    }

    pub fn accounts(&self) -> &[String] {
        &self.accounts
    }

    fn valid(&mut self) -> Generated {
        self.seq += 1;
        let a = self.rng.gen_range(0..self.accounts.len());
        let sid = self.accounts[a].clone();
        let number = self.numbers[a]
            .choose(&mut self.rng)
            .expect("at least one number")
            .clone();
        let back = if self.rng.gen_bool(self.s.late_rate.clamp(0.0, 1.0)) {
            self.rng.gen_range(0..self.s.days.max(1)) as i32
        } else {
            0
        };
        let day = Day(self.s.last_day.0 - back);
        let secs = self.rng.gen_range(0..86_400);
        let (y, m, d) = day.ymd();
        let ts = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let direction = if self.rng.gen_bool(0.5) {
            "inbound"
        } else {
            "outbound"
        };
        let agent = if self.rng.gen_bool(0.7) {
            format!(
                r#","agent_id":"{}""#,
                AGENTS.choose(&mut self.rng).expect("agents")
            )
        } else {
            String::new()
        };
        let peer = format!(
            "+1{:010}",
            self.rng.gen_range(2_000_000_000u64..9_999_999_999)
        );
        let payload = match self.rng.gen_range(0..100) {
            0..=59 => {
                let nt = [
                    ("local", 50),
                    ("mobile", 25),
                    ("tollfree", 10),
                    ("sip", 10),
                    ("client", 5),
                ]
                .choose_weighted(&mut self.rng, |x| x.1)
                .expect("weights")
                .0;
                let (status, billsec, duration) = match self.rng.gen_range(0..10) {
                    0 => ("no-answer", 0, self.rng.gen_range(10..45)),
                    1 => ("busy", 0, self.rng.gen_range(1..8)),
                    2 => ("failed", 0, 0),
                    _ => {
                        let b = self.rng.gen_range(0..900);
                        ("completed", b, b + self.rng.gen_range(0..30))
                    }
                };
                let mode = match self.rng.gen_range(0..3) {
                    0 => r#","mode":"hosted""#,
                    1 => r#","mode":"webhook""#,
                    _ => "",
                };
                format!(
                    r#"{{"id":"CA{:016x}{:016x}","account_sid":"{sid}","kind":"call","timestamp":"{ts}","direction":"{direction}","phone_number":"{number}","peer":"{peer}","number_type":"{nt}","status":"{status}","duration":{duration},"billsec":{billsec}{mode}{agent},"switch":"sw-01","codec":"PCMU"}}"#,
                    self.s.seed, self.seq
                )
            }
            p => {
                let kind = if p < 92 { "sms" } else { "mms" };
                let nt = *["longcode", "longcode", "longcode", "shortcode", "tollfree"]
                    .choose(&mut self.rng)
                    .expect("types");
                let segments = self.rng.gen_range(1..=4);
                format!(
                    r#"{{"id":"SM{:016x}{:016x}","account_sid":"{sid}","kind":"{kind}","timestamp":"{ts}","direction":"{direction}","phone_number":"{number}","peer":"{peer}","number_type":"{nt}","segments":{segments},"status":"delivered"{agent},"switch":"sw-01"}}"#,
                    self.s.seed, self.seq
                )
            }
        };
        Generated {
            key: sid,
            payload: payload.into_bytes(),
        }
    }

    fn malformed(&mut self) -> Generated {
        let base = self.valid();
        let text = String::from_utf8(base.payload).expect("generated UTF-8");
        let bad = match self.rng.gen_range(0..7) {
            0 => text[..text.len() / 2].to_string(),
            1 => text.replace(&base.key, "ACnot-a-sid"),
            2 => text.replacen("\"timestamp\":\"", "\"timestamp\":\"yesterday ", 1),
            3 => text.replacen("\"direction\":\"", "\"direction\":\"sideways", 1),
            4 => text.replacen("\"kind\":\"", "\"kind\":\"fax", 1),
            5 => text.replacen("\"id\":", "\"ident\":", 1),
            _ if text.contains("\"billsec\"") => {
                text.replacen("\"billsec\":", "\"billsec\":100000", 1)
            }
            _ => text.replacen("\"segments\":", "\"segments\":-", 1),
        };
        Generated {
            key: base.key,
            payload: bad.into_bytes(),
        }
    }
}

impl Iterator for Generator {
    type Item = Generated;
    fn next(&mut self) -> Option<Generated> {
        let roll: f64 = self.rng.gen();
        if roll < self.s.duplicate_rate && !self.recent.is_empty() {
            let i = self.rng.gen_range(0..self.recent.len());
            return Some(self.recent[i].clone());
        }
        if roll < self.s.duplicate_rate + self.s.malformed_rate {
            return Some(self.malformed());
        }
        let g = self.valid();
        // Remember a window of recent CDRs to re-send as duplicates.
        if self.recent.len() < 4096 {
            self.recent.push(g.clone());
        } else {
            let i = self.rng.gen_range(0..self.recent.len());
            self.recent[i] = g.clone();
        }
        Some(g)
    }
}

/// Counts messages the broker did not take, and keeps the first reason.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.first_error
                .lock()
                .unwrap()
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// Produces `count` generated messages to `topic`, at most `rate` per second
/// (0 = as fast as possible), optionally writing each payload as a line of `file`.
///
/// The producer is idempotent, so the topic holds each generated message exactly
/// once even when the broker is slow and requests are retried: ground truth
/// computed from the file then matches the topic offset for offset. Returns an
/// error if any message was not delivered.
pub fn produce(
    client: &ClientConfig,
    topic: &str,
    generator: Generator,
    count: u64,
    rate: u64,
    mut file: Option<&mut dyn Write>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<u64> {
    let mut cfg = client.clone();
    cfg.set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "0")
        .set("enable.idempotence", "true");
    let producer: BaseProducer<Deliveries> = cfg.create_with_context(Deliveries::default())?;
    let started = Instant::now();
    let mut sent = 0u64;
    for g in generator.take(count as usize) {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        if let Some(f) = file.as_deref_mut() {
            f.write_all(&g.payload)?;
            f.write_all(b"\n")?;
        }
        let mut record = BaseRecord::to(topic)
            .key(g.key.as_bytes())
            .payload(&g.payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        sent += 1;
        if sent % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
        if rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    // Wait for every delivery; a slow broker only makes this take longer.
    let deadline = Instant::now() + Duration::from_secs(600);
    while producer.in_flight_count() > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} messages still undelivered after 10 minutes",
            producer.in_flight_count()
        );
        producer.poll(Duration::from_millis(100));
    }
    let failed = producer
        .context()
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        let why = producer.context().first_error.lock().unwrap().take();
        anyhow::bail!(
            "{failed} of {sent} messages were not delivered to {topic}: {}",
            why.unwrap_or_default()
        );
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdr::decode;

    #[test]
    fn deterministic_with_duplicates_and_malformed() {
        let s = GeneratorSettings {
            seed: 7,
            accounts: 50,
            duplicate_rate: 0.05,
            malformed_rate: 0.05,
            late_rate: 0.5,
            days: 10,
            last_day: Day::from_ymd(2025, 1, 31),
        };
        let a: Vec<_> = Generator::new(s.clone()).take(5000).collect();
        let b: Vec<_> = Generator::new(s).take(5000).collect();
        assert_eq!(a, b);
        let bad = a.iter().filter(|g| decode(&g.payload).is_err()).count();
        assert!((100..=400).contains(&bad), "malformed: {bad}");
        let mut ids = std::collections::HashSet::new();
        let dups = a
            .iter()
            .filter_map(|g| decode(&g.payload).ok())
            .filter(|c| !ids.insert(c.id.to_string()))
            .count();
        assert!((100..=400).contains(&dups), "duplicates: {dups}");
        let sizes: Vec<usize> = a.iter().map(|g| g.payload.len()).collect();
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((250..=400).contains(&mean), "mean CDR size {mean}");
    }
}
