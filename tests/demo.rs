//! `tallyd demo`, the README's first command, run as a user runs it: the real
//! binary in a directory that is not a checkout (so on the config built into the
//! binary), with its in-process Kafka and generated traffic, for a few seconds.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tallyd::store::Store;

/// The `count` of the last `totalprice` line the demo printed.
fn last_printed_total(stdout: &str) -> Option<i64> {
    stdout
        .lines()
        .rfind(|l| l.trim_start().starts_with("totalprice"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

#[test]
fn demo_runs_outside_a_checkout_and_stores_what_it_prints() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "demo",
            "--duration",
            "8",
            "--rate",
            "2000",
            "--accounts",
            "20",
        ])
        .current_dir(dir.path())
        .env("TALLYD_HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            child.kill().unwrap();
            panic!("demo --duration 8 still running after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "demo failed: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("using the shipped one built into the binary"),
        "demo did not say it used the built-in config:\n{stdout}"
    );

    // The store is under ./data of the directory it ran in, and its all-time
    // records are what the demo printed last (after its final flush).
    let url = format!("sqlite://{}/data/tallyd.db", dir.path().display());
    let store = Store::open(&url).unwrap();
    let consumed: i64 = store.load_offsets("cdrs").unwrap().values().sum();
    let stored: i64 = store
        .read_records("all")
        .unwrap()
        .iter()
        .filter(|r| r.category == "totalprice")
        .map(|r| r.count)
        .sum();
    let printed = last_printed_total(&stdout)
        .unwrap_or_else(|| panic!("no totalprice line in the demo's output:\n{stdout}"));
    assert_eq!(
        stored, printed,
        "stored all-time totalprice count vs printed"
    );
    // Every consumed message is counted once, a duplicate or dead-lettered; the
    // generator's default duplicate and malformed rates are small.
    assert!(
        consumed > 1000,
        "only {consumed} CDRs consumed in the demo's 8 s"
    );
    assert!(
        stored <= consumed && stored * 10 >= consumed * 9,
        "{stored} counted of {consumed} consumed"
    );
}
