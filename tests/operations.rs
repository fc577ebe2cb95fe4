//! Operating tallyd: `/metrics` of the real daemon after a known run checked by
//! `promtool`; the Prometheus config, alert rules and their unit tests; the
//! Grafana dashboard's queries; the Kubernetes manifests against the real
//! config, the image and the daemon's routes; the Dockerfile's static check;
//! `--version`, `check-config` and `--log-format`.
//!
//! Needs `promtool` (Debian package `prometheus`, installed by
//! scripts/test.sh; or PROMTOOL=path) and python3.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value as Yaml;
use support::*;
use tallyd::metrics::{Kind, CATALOGUE, PLANNED};

const TOPIC: &str = "cdrs";
const DLQ: &str = "cdrs-dead-letter";
const PARTITIONS: u32 = 3;

/// Metrics the dashboard and the alert rules use that a known run does not
/// show yet, because what emits them is not wired or not written: the
/// summaries of the restructured flush/ingest code and of holds and triggers,
/// and the wallet, hold and webhook metrics. Shrink it as they come: the
/// metrics test fails when a listed metric shows up.
const EXPECTED_LATER: &[&str] = &[
    "tallyd_hold_request_to_answer_seconds",
    "tallyd_trigger_crossing_to_callback_seconds",
    "tallyd_holds_total",
    "tallyd_wallets_paused",
    "tallyd_wallets_low",
];

/// Catalogued metrics labelled by what went wrong, which appear with their
/// first error (a clean run has none), and the forwarding of wallet requests,
/// which needs a second instance.
const APPEAR_ON_ERROR: &[&str] = &[
    "tallyd_store_permanent_errors_total",
    "tallyd_partition_load_overdue_total",
    "tallyd_http_auth_failures_total",
    "tallyd_http_auth_throttled_total",
    "tallyd_http_connections_refused_total",
    "tallyd_http_connections_evicted_total",
    "tallyd_wallet_credits_total",
    "tallyd_cdr_partition_mismatch_total",
    "tallyd_wallet_forwarded_total",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn promtool() -> String {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => bin,
        _ => panic!(
            "{bin} not found: run ./scripts/test.sh (it installs Debian's prometheus package) or set PROMTOOL"
        ),
    }
}

/// Runs promtool with `args` in `dir`, `stdin` fed to it; returns its output
/// after asserting it succeeded.
fn run_promtool(dir: &Path, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// `promtool check metrics`: exit 0 and not one lint problem.
fn assert_promtool_accepts(exposition: &str) {
    let out = run_promtool(root(), &["check", "metrics"], exposition);
    assert!(
        out.trim().is_empty(),
        "promtool check metrics found problems:\n{out}\nin:\n{exposition}"
    );
}

/// Metric families of an exposition: name → TYPE, and the names with HELP.
fn families(exposition: &str) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    for line in exposition.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                types.insert(name.to_string(), kind.to_string());
            }
            (Some("#"), Some("HELP"), Some(name), _) => {
                helps.insert(name.to_string());
            }
            _ => {}
        }
    }
    (types, helps)
}

/// The `tallyd_…` metric families a PromQL expression reads (histogram and
/// summary series map to their family).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if word.starts_with("tallyd_") {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            out.insert(family.to_string());
        }
        word.clear();
    }
    out
}

fn catalogue_kind(name: &str) -> Option<Kind> {
    CATALOGUE
        .iter()
        .chain(PLANNED)
        .find(|m| m.name == name)
        .map(|m| m.kind)
}

fn kind_text(k: Kind) -> &'static str {
    match k {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
        Kind::Summary => "summary",
    }
}

/// Every `expr` of the dashboard's panels and template variables (with the
/// query the variables run).
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("config/grafana/tallyd.json")).unwrap();
    let mut exprs = vec![];
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(METRIC_SELECTOR, label)
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| panic!("variable query {q} is not label_values(…)"));
            exprs.push(inner);
        }
    }
    exprs
}

/// Every `expr` of the alert rules.
fn rule_exprs() -> Vec<String> {
    let rules: Yaml = serde_yaml::from_str(&read("config/prometheus/tallyd.rules.yml")).unwrap();
    let mut exprs = vec![];
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            exprs.push(r["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

fn get(port: u16, path: &str) -> (u16, String) {
    let r = reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")).unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// The Kubernetes example: every document of the files directly in
/// config/kubernetes/, by kind.
fn manifests() -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(root().join("config/kubernetes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde::Deserialize::deserialize(doc).unwrap();
                let kind = yaml_str(&v, &["kind"]).to_string();
                assert!(out.insert(kind.clone(), v).is_none(), "two {kind}s");
            }
        }
    }
    out
}

fn yaml<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| &v[*k])
}

fn yaml_str<'a>(v: &'a Yaml, path: &[&str]) -> &'a str {
    yaml(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string in {v:?}"))
}

fn container<'a>(deployment: &'a Yaml, name: &str) -> &'a Yaml {
    yaml(deployment, &["spec", "template", "spec", "containers"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The image's facts, from the Dockerfile checker (one parser for both).
fn image_facts() -> serde_json::Value {
    let out = Command::new("python3")
        .arg(root().join("scripts/check_dockerfile.py"))
        .arg("facts")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn metrics_of_a_known_run_pass_promtool_and_serve_the_rules_dashboard_and_probes() {
    let dir = test_dir();
    let t = Tansu::start();
    t.create_topic(TOPIC, PARTITIONS);
    t.create_topic(DLQ, 1);
    const N: u64 = 3_000;
    generate(&t.brokers(), TOPIC, N, 21, &dir.path().join("cdrs.jsonl"));
    let url = format!("sqlite://{}/tallyd.db", dir.path().display());
    let log = dir.path().join("tallyd.log");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::spawn_with(
        &t.brokers(),
        &url,
        "g-ops",
        &log,
        &[("TALLYD_HTTP__LISTEN", &listen)],
    );
    wait_flushed(&url, TOPIC, N, Duration::from_secs(120), &log);
    // The consumer publishes the flush's outcome, its pacing and the lag a
    // moment after the offsets land.
    wait_metric(
        port,
        "tallyd_pending_cells",
        0.0,
        Duration::from_secs(30),
        "nothing left pending",
    );
    let expected: Vec<&str> = CATALOGUE
        .iter()
        .map(|m| m.name)
        .filter(|n| !EXPECTED_LATER.contains(n) && !APPEAR_ON_ERROR.contains(n))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exposition = loop {
        let (_, text) = get(port, "/metrics");
        let (types, _) = families(&text);
        if expected.iter().all(|n| types.contains_key(*n)) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // The Kubernetes probes and scrape path answer on the real daemon.
    let k8s = manifests();
    let deployment = &k8s["Deployment"];
    let tallyd = container(deployment, "tallyd");
    for (probe, want) in [("livenessProbe", 200), ("readinessProbe", 200)] {
        let path = yaml_str(tallyd, &[probe, "httpGet", "path"]);
        assert_eq!(get(port, path).0, want, "{probe} {path}");
    }
    let scrape_path = yaml_str(
        deployment,
        &[
            "spec",
            "template",
            "metadata",
            "annotations",
            "prometheus.io/path",
        ],
    );
    assert_eq!(
        get(port, scrape_path).1.lines().count(),
        exposition.lines().count()
    );
    d.stop();

    assert_promtool_accepts(&exposition);
    let (types, helps) = families(&exposition);
    for (name, kind) in &types {
        assert!(helps.contains(name), "{name} has no HELP");
        let want = catalogue_kind(name).unwrap_or_else(|| panic!("{name} is not catalogued"));
        assert_eq!(kind, kind_text(want), "TYPE of {name}");
    }
    // Everything catalogued shows after a run, except what is not wired yet
    // and what only an error brings.
    for m in CATALOGUE {
        if APPEAR_ON_ERROR.contains(&m.name) {
            continue;
        }
        assert_eq!(
            types.contains_key(m.name),
            !EXPECTED_LATER.contains(&m.name),
            "{}: in /metrics after a known run, or listed in EXPECTED_LATER, not both",
            m.name
        );
    }
    for name in EXPECTED_LATER.iter().chain(APPEAR_ON_ERROR) {
        assert!(
            catalogue_kind(name).is_some(),
            "{name} is in neither CATALOGUE nor PLANNED"
        );
    }
    // What the run did shows in the numbers.
    let sample = |line_start: &str| -> f64 {
        exposition
            .lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {line_start}"))
    };
    let consumed: f64 = ["counted", "duplicate", "rejected"]
        .iter()
        .map(|o| sample(&format!("tallyd_cdrs_total{{outcome=\"{o}\"}} ")))
        .sum();
    assert_eq!(consumed, N as f64);
    assert!(sample("tallyd_cdrs_total{outcome=\"rejected\"} ") > 0.0);
    assert!(sample("tallyd_flushes_total ") >= 1.0);
    assert_eq!(sample("tallyd_partitions_assigned "), PARTITIONS as f64);
    assert_eq!(sample("tallyd_store_up "), 1.0);
    for p in 0..PARTITIONS {
        assert_eq!(
            sample(&format!("tallyd_consumer_lag{{partition=\"{p}\"}} ")),
            0.0
        );
    }

    // The dashboard and the alert rules read metrics that exist.
    for (what, exprs) in [
        ("dashboard", dashboard_exprs()),
        ("alert rules", rule_exprs()),
    ] {
        let used: BTreeSet<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
        assert!(used.len() > 5, "{what}: found only {used:?}");
        for name in &used {
            assert!(
                types.contains_key(name)
                    || EXPECTED_LATER.contains(&name.as_str())
                    || APPEAR_ON_ERROR.contains(&name.as_str()),
                "the {what} use {name}, which /metrics does not show after a known run"
            );
        }
    }
}

#[test]
fn the_exposition_with_every_summary_passes_promtool() {
    use tallyd::metrics::SUMMARIES;
    let exposition = tallyd::metrics::install();
    metrics::counter!(tallyd::metrics::FLUSHES_TOTAL).increment(1);
    metrics::histogram!(tallyd::metrics::FLUSH_DURATION_SECONDS).record(0.02);
    for (i, s) in SUMMARIES.iter().enumerate() {
        let mut local = s.local();
        for ms in 1..=200u64 {
            local.record(Duration::from_millis(ms * (i as u64 + 1)));
        }
    }
    let text = exposition.render();
    assert_promtool_accepts(&text);
    let (types, helps) = families(&text);
    for s in SUMMARIES {
        assert_eq!(types.get(s.name()).map(String::as_str), Some("summary"));
        assert!(helps.contains(s.name()));
        for q in ["0.5", "0.9", "0.99", "0.999"] {
            assert!(
                text.contains(&format!("{}{{quantile=\"{q}\"}} 0.", s.name())),
                "{} quantile {q} in:\n{text}",
                s.name()
            );
        }
        assert!(text.contains(&format!("{}_count 200\n", s.name())));
    }
    // The histogram's buckets and the counters started at zero are there too.
    assert!(text.contains("tallyd_flush_duration_seconds_bucket{le=\"0.05\"} 1"));
    assert!(text.contains("tallyd_store_errors_total 0"));
    assert!(text.contains("tallyd_cdrs_rejected_total{reason=\"bad_account_sid\"} 0"));
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = root().join("config/prometheus");
    let out = run_promtool(&dir, &["check", "config", "prometheus.yml"], "");
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    let out = run_promtool(&dir, &["check", "rules", "tallyd.rules.yml"], "");
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_promtool(&dir, &["test", "rules", "tallyd.rules.test.yml"], "");
    assert!(out.contains("SUCCESS"), "{out}");
    // The unit tests cover at least the lag and flush-age alerts, firing and not.
    let tests = read("config/prometheus/tallyd.rules.test.yml");
    for alert in ["TallydConsumerLagGrowing", "TallydFlushTooOld"] {
        assert!(
            tests.matches(&format!("alertname: {alert}")).count() >= 2,
            "{alert}"
        );
    }
    // Every alert the issue asks for is there.
    let rules = read("config/prometheus/tallyd.rules.yml");
    for alert in [
        "TallydConsumerLagGrowing",
        "TallydFlushTooOld",
        "TallydStoreDown",
        "TallydStorePermanentErrors",
        "TallydDeadLettersRising",
        "TallydWebhookDeliveriesFailing",
        "TallydWalletsPaused",
        "TallydNoPartitionsAssigned",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}\n")),
            "{alert} missing"
        );
    }
}

#[test]
fn dashboard_queries_are_promql_and_panels_are_well_formed() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("config/grafana/tallyd.json")).unwrap();
    assert_eq!(dash["uid"], "tallyd");
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel id {} twice",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{}",
            p["title"]
        );
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{}",
                p["title"]
            );
        }
    }
    // The panels the issue lists.
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "CDRs by outcome",
        "Consumer lag per partition",
        "Flush duration",
        "Last flush age",
        "Dead letters by reason",
        "Hold requests by outcome",
        "Wallets paused and low",
        "Webhook deliveries by outcome",
        "CDR event time → counted",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
    // Each query parses as PromQL: promtool checks them as recording rules,
    // with Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        rules += &format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        );
    }
    let dir = test_dir();
    std::fs::write(dir.path().join("dashboard.rules.yml"), &rules).unwrap();
    let out = run_promtool(dir.path(), &["check", "rules", "dashboard.rules.yml"], "");
    assert!(out.contains("SUCCESS"), "{out}\n{rules}");
}

#[test]
fn kubernetes_manifests_match_the_config_the_image_and_the_monitoring() {
    let k8s = manifests();
    let facts = image_facts();
    let deployment = &k8s["Deployment"];
    let pod = yaml(deployment, &["spec", "template"]);
    let tallyd = container(deployment, "tallyd");
    let secret = &k8s["Secret"];
    let config_map = &k8s["ConfigMap"];

    // Its environment: literal values or keys of the Secret, all TALLYD_SECTION__KEY,
    // but for the pod's address (the downward API), which values may refer to.
    let mut env = vec![];
    let pod_ip = "10.1.2.3";
    for e in tallyd["env"].as_sequence().unwrap() {
        let name = yaml_str(e, &["name"]);
        if name == "POD_IP" {
            assert_eq!(
                yaml_str(e, &["valueFrom", "fieldRef", "fieldPath"]),
                "status.podIP"
            );
            continue;
        }
        assert!(
            name.starts_with("TALLYD_") && name.contains("__"),
            "{name}: tallyd reads TALLYD_SECTION__KEY"
        );
        let value = match e["value"].as_str() {
            Some(v) => v.replace("$(POD_IP)", pod_ip),
            None => {
                let r = yaml(e, &["valueFrom", "secretKeyRef"]);
                assert_eq!(
                    yaml_str(r, &["name"]),
                    yaml_str(secret, &["metadata", "name"])
                );
                yaml_str(secret, &["stringData", yaml_str(r, &["key"])]).to_string()
            }
        };
        env.push((name.to_string(), value));
    }
    assert!(
        env.iter().any(|(k, _)| k == "TALLYD_STORE__URL"),
        "store URL from the Secret"
    );

    // The ConfigMap's file, with that environment, is a config tallyd accepts:
    // every variable names a real key (unknown keys are rejected).
    let volumes = yaml(pod, &["spec", "volumes"]).as_sequence().unwrap();
    let mounts = tallyd["volumeMounts"].as_sequence().unwrap();
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .map(|m| yaml_str(m, &["mountPath"]))
            .unwrap_or_else(|| panic!("volume {volume} is not mounted in tallyd"))
    };
    let config_volume = volumes
        .iter()
        .find(|v| {
            v["configMap"]["name"].as_str() == Some(yaml_str(config_map, &["metadata", "name"]))
        })
        .expect("a volume of the ConfigMap");
    let (key, toml_text) = {
        let data = yaml(config_map, &["data"]).as_mapping().unwrap();
        assert_eq!(data.len(), 1);
        let (k, v) = data.iter().next().unwrap();
        (k.as_str().unwrap(), v.as_str().unwrap())
    };
    let config_path = format!("{}/{key}", mount_of(yaml_str(config_volume, &["name"])));
    let args: Vec<&str> = tallyd["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    assert_eq!(
        args[args.iter().position(|a| *a == "--config").unwrap() + 1],
        config_path
    );
    // Mounted where the image keeps its own config, which it replaces.
    assert_eq!(config_path, facts["config"].as_str().unwrap());
    let (cfg, _) =
        tallyd::config::Config::from_toml(toml_text, Path::new("configmap.yaml"), env.clone())
            .unwrap_or_else(|e| panic!("the ConfigMap's config with the Deployment's env: {e}"));
    assert!(
        cfg.store.url.starts_with("postgres://"),
        "replicas share PostgreSQL"
    );
    // Each replica is reached by the others at its own address and port.
    let listen_port = cfg.http.listen.rsplit(':').next().unwrap();
    assert_eq!(
        cfg.http.advertised(),
        format!("http://{pod_ip}:{listen_port}"),
        "replicas forward wallet requests to each other's pod address"
    );
    // Its price list is the shipped one.
    let rating = |t: &str| t.parse::<toml::Table>().unwrap()["rating"].clone();
    assert_eq!(rating(toml_text), rating(tallyd::config::SHIPPED));
    // The real binary takes the Deployment's arguments (as check-config).
    let dir = test_dir();
    let file = dir.path().join(key);
    std::fs::write(&file, toml_text).unwrap();
    let mut check_args: Vec<&str> = args.clone();
    check_args[0] = "check-config";
    let at = check_args.iter().position(|a| *a == "--config").unwrap() + 1;
    check_args[at] = file.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(&check_args)
        .env_clear()
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tallyd {check_args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Ports: the config listens on all interfaces at the container's port, which
    // the probes, the scrape annotations and the PodMonitor use.
    let port = &tallyd["ports"].as_sequence().unwrap()[0];
    let (port_name, port_number) = (
        yaml_str(port, &["name"]),
        port["containerPort"].as_u64().unwrap(),
    );
    assert_eq!(cfg.http.listen, format!("0.0.0.0:{port_number}"));
    for probe in ["livenessProbe", "readinessProbe"] {
        let p = yaml(tallyd, &[probe, "httpGet", "port"]);
        assert!(
            p.as_str() == Some(port_name) || p.as_u64() == Some(port_number),
            "{probe} port {p:?}"
        );
    }
    assert_eq!(
        yaml_str(tallyd, &["livenessProbe", "httpGet", "path"]),
        "/healthz"
    );
    assert_eq!(
        yaml_str(tallyd, &["readinessProbe", "httpGet", "path"]),
        "/readyz"
    );
    let annotations = yaml(pod, &["metadata", "annotations"]);
    assert_eq!(yaml_str(annotations, &["prometheus.io/scrape"]), "true");
    assert_eq!(
        yaml_str(annotations, &["prometheus.io/port"]),
        port_number.to_string()
    );
    assert_eq!(yaml_str(annotations, &["prometheus.io/path"]), "/metrics");
    let pm_text = read("config/kubernetes/prometheus-operator/podmonitor.yaml");
    let pm: Yaml = serde_yaml::from_str(&pm_text).unwrap();
    let endpoint = &yaml(&pm, &["spec", "podMetricsEndpoints"])[0];
    assert_eq!(yaml_str(endpoint, &["port"]), port_name);
    assert_eq!(yaml_str(endpoint, &["path"]), "/metrics");
    for (k, v) in yaml(&pm, &["spec", "selector", "matchLabels"])
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            &pod["metadata"]["labels"][k.as_str().unwrap()],
            v,
            "PodMonitor selects the pod"
        );
    }
    // job="tallyd", as the alert rules expect.
    let relabel = &endpoint["relabelings"][0];
    assert_eq!(
        (
            yaml_str(relabel, &["targetLabel"]),
            yaml_str(relabel, &["replacement"])
        ),
        ("job", "tallyd")
    );
    assert!(read("config/prometheus/tallyd.rules.yml").contains("up{job=\"tallyd\"}"));
    assert!(read("config/prometheus/prometheus.yml").contains("job_name: tallyd\n"));

    // Runs as the image's non-root user, with the image's data directory.
    let sc = &tallyd["securityContext"];
    let user = facts["user"].as_str().unwrap();
    assert_eq!(
        format!(
            "{}:{}",
            sc["runAsUser"].as_u64().unwrap(),
            sc["runAsGroup"].as_u64().unwrap()
        ),
        user
    );
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(yaml(sc, &["capabilities", "drop"])[0].as_str(), Some("ALL"));
    assert_eq!(
        mounts
            .iter()
            .filter(|m| m["mountPath"].as_str() == facts["workdir"].as_str())
            .count(),
        1,
        "the image's data directory {} is a volume",
        facts["workdir"]
    );
    for r in ["cpu", "memory"] {
        assert!(
            yaml(tallyd, &["resources", "requests", r])
                .as_str()
                .is_some(),
            "requests.{r}"
        );
    }
    // Time for the final flush on SIGTERM.
    assert!(
        yaml(pod, &["spec", "terminationGracePeriodSeconds"])
            .as_u64()
            .unwrap()
            >= 30
    );
    // Beside a switch that writes to the topic tallyd reads.
    let switch = container(deployment, "switch");
    let switch_env = |n: &str| {
        switch["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(n))
            .map(|e| yaml_str(e, &["value"]).to_string())
            .unwrap()
    };
    assert_eq!(switch_env("CDR_KAFKA_TOPIC"), cfg.kafka.topic);
    assert_eq!(switch_env("CDR_KAFKA_BROKERS"), cfg.kafka.brokers);
    assert_eq!(
        switch_env("BILLING_URL"),
        format!("http://127.0.0.1:{port_number}")
    );
}

/// The Dockerfile checker passes on the Dockerfile and fails, naming the
/// problem, on broken variants of it.
#[test]
fn dockerfile_static_check_passes_and_catches_breakage() {
    let check = |dockerfile: Option<&Path>| {
        let mut c = Command::new("python3");
        c.arg(root().join("scripts/check_dockerfile.py")).args([
            "check",
            "--binary",
            env!("CARGO_BIN_EXE_tallyd"),
        ]);
        if let Some(d) = dockerfile {
            c.env("DOCKERFILE", d);
        }
        let out = c.output().expect("python3");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = check(None);
    assert!(ok, "{out}");
    assert!(out.starts_with("Dockerfile: ok"), "{out}");
    let real = read("Dockerfile");
    let dir = test_dir();
    for (from, to, says) in [
        (
            "COPY Cargo.toml Cargo.lock openapi.yaml ./",
            "COPY Cargo.toml Cargo.lock ./",
            "includes openapi.yaml",
        ),
        ("COPY benches ./benches\n", "", "benches/"),
        (
            "COPY src ./src",
            "COPY src ./source",
            "lands at /src/source",
        ),
        ("USER 10001:10001", "USER tallyd", "numeric non-root"),
        (
            "ENTRYPOINT [\"/usr/local/bin/tallyd\"]",
            "ENTRYPOINT [\"/usr/bin/tallyd\"]",
            "the ENTRYPOINT",
        ),
        ("EXPOSE 8080", "EXPOSE 9090", "exposed port"),
        ("VOLUME /var/lib/tallyd", "VOLUME /data", "VOLUME"),
        (
            "TALLYD_HTTP__LISTEN=0.0.0.0:8080",
            "TALLYD_HTTP__LISTEN=0.0.0.0:8080 TALLYD_KAFKA__BROKRS=x",
            "brokrs",
        ),
    ] {
        assert!(
            real.contains(from),
            "the Dockerfile no longer has {from:?}: update this test"
        );
        let broken = dir.path().join("Dockerfile");
        std::fs::write(&broken, real.replacen(from, to, 1)).unwrap();
        let (ok, out) = check(Some(&broken));
        assert!(!ok && out.contains(says), "{from:?} → {to:?}: {out}");
    }
}

#[test]
fn version_and_check_config() {
    let bin = env!("CARGO_BIN_EXE_tallyd");
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("tallyd {}", env!("CARGO_PKG_VERSION"))
    );

    let config = root().join("config/tallyd.toml");
    let run = |env: &[(&str, &str)], config: &Path| {
        let out = Command::new(bin)
            .args(["check-config", "--config", config.to_str().unwrap()])
            .env_remove("RUST_BACKTRACE")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(&[], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": ok (2 rating plans"), "{out}");
    // Nothing is started or created: a store URL in a directory that does not
    // exist is fine for the check.
    let dir = test_dir();
    let db = dir.path().join("no/such/dir/t.db");
    let url = format!("sqlite://{}", db.display());
    let (code, out) = run(
        &[
            ("TALLYD_STORE__URL", &url),
            ("TALLYD_KAFKA__BROKERS", "127.0.0.1:1"),
        ],
        &config,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        !db.parent().unwrap().exists(),
        "check-config created the store's directory"
    );

    for (env, says) in [
        (
            ("TALLYD_FLUSH__INTERVALL_MS", "5"),
            "unknown field `intervall_ms`",
        ),
        (
            ("TALLYD_STORE__URL", "mysql://u:pw@h/db"),
            "store.url = \"mysql://u:***@h/db\"",
        ),
        (
            ("TALLYD_HTTP__LISTEN", "0.0.0.0:99999"),
            "http.listen = \"0.0.0.0:99999\"",
        ),
        (
            ("TALLYD_KAFKA__DEAD_LETTER_TOPIC", "cdrs"),
            "kafka.dead_letter_topic",
        ),
        (
            ("TALLYD_FLUSH__MAX_BUSY_SHARE", "0"),
            "flush.max_busy_share = 0",
        ),
    ] {
        let (code, out) = run(&[env], &config);
        assert_eq!(code, Some(1), "{env:?}: {out}");
        assert!(
            out.contains(says) && out.contains("tallyd.toml"),
            "{env:?}: {out}"
        );
        assert!(!out.contains("pw@"), "the password is shown: {out}");
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        read("config/tallyd.toml").replace("per_minute = \"0.13\"", "per_minute = \"zero\""),
    )
    .unwrap();
    let (code, out) = run(&[], &bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("bad.toml") && out.contains("per_minute"),
        "{out}"
    );
    let (code, out) = run(&[], &dir.path().join("missing.toml"));
    assert_eq!(code, Some(1));
    assert!(out.contains("missing.toml"), "{out}");
}

/// Starts `tallyd run` with `args` against a broker that is not there (the
/// daemon keeps retrying it and serves HTTP), reads its stderr until it listens,
/// stops it; returns the stderr lines.
fn daemon_log_lines(args: &[&str]) -> Vec<String> {
    let dir = test_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(args)
        .args([
            "run",
            "--config",
            root().join("config/tallyd.toml").to_str().unwrap(),
        ])
        .env(
            "TALLYD_KAFKA__BROKERS",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "TALLYD_STORE__URL",
            format!("sqlite://{}/t.db", dir.path().display()),
        )
        .env("TALLYD_HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut lines = vec![];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines.iter().any(|l: &String| l.contains("HTTP listening")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("tallyd did not log that it listens; stderr: {lines:#?}");
            }
        }
    }
    signal(&child, libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
}

#[test]
fn json_logs_on_request_and_no_colour_codes_off_a_terminal() {
    let lines = daemon_log_lines(&["--log-format", "json"]);
    let mut listening = false;
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "no {field} in {l}");
        }
        if v["message"] == "HTTP listening" {
            listening = true;
            assert_eq!(v["level"], "INFO");
            assert!(v["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{l}");
        }
    }
    assert!(
        listening && lines.iter().any(|l| l.contains("\"message\":\"stopped\"")),
        "{lines:#?}"
    );

    // Text, the default, into a pipe: no ANSI escapes.
    let lines = daemon_log_lines(&[]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("INFO") && l.contains("HTTP listening")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in {lines:#?}"
    );
}
