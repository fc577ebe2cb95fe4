//! `tallyd demo`, the README's first command, run as a user runs it: the real
//! binary in a directory that is not a checkout (so on the config built into the
//! binary), with its in-process Kafka and generated traffic, for a few seconds;
//! and that it never touches a real store. Also: every flag of the binary has
//! help text.

use std::io::Read;
use std::path::Path;
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

/// Runs `tallyd demo ARGS` in `dir` with `env` until it exits; returns its
/// status, stdout and stderr.
fn run_demo(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.arg("demo")
        .args(args)
        .current_dir(dir)
        .env("TALLYD_HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            child.kill().unwrap();
            panic!("demo {args:?} still running after 90 s");
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
    (status, stdout, stderr)
}

#[test]
fn demo_runs_outside_a_checkout_and_stores_what_it_prints() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stdout, stderr) = run_demo(
        dir.path(),
        &["--duration", "8", "--rate", "2000", "--accounts", "20"],
        &[],
    );
    assert!(
        status.success(),
        "demo failed: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("using the shipped one built into the binary"),
        "demo did not say it used the built-in config:\n{stdout}"
    );

    // The store is under ./tallyd-demo of the directory it ran in, and its
    // all-time records are what the demo printed last (after its final flush).
    let url = format!("sqlite://{}/tallyd-demo/tallyd.db", dir.path().display());
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

/// Every file below `dir`: its length and a hash of its bytes, by path.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, (usize, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            let bytes = std::fs::read(&p).unwrap();
            out.insert(p, (bytes.len(), xxhash_rust::xxh3::xxh3_64(&bytes)));
        }
    }
    out
}

#[test]
fn demo_never_touches_the_configured_store() {
    let dir = tempfile::tempdir().unwrap();
    // A production SQLite store where the shipped config points (./data).
    let prod = dir.path().join("data/tallyd.db");
    std::fs::create_dir_all(prod.parent().unwrap()).unwrap();
    drop(Store::open(&format!("sqlite://{}", prod.display())).unwrap());
    let before = snapshot(&dir.path().join("data"));
    let args = ["--duration", "2", "--rate", "500", "--accounts", "5"];
    let (status, stdout, stderr) = run_demo(dir.path(), &args, &[]);
    assert!(status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        snapshot(&dir.path().join("data")),
        before,
        "./data was changed"
    );

    // A PostgreSQL store named by the environment, with a password in its URL.
    if std::env::var("TALLYD_TEST_POSTGRES").as_deref() != Ok("skip") {
        let base = std::env::var("TALLYD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("tallyd_demo_test_{}", std::process::id());
        let mut pg = postgres::Client::connect(&base, postgres::NoTls).unwrap();
        pg.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-csearch_path%3D{schema}&password=hunter2");
        let (status, stdout, stderr) = run_demo(dir.path(), &args, &[("TALLYD_STORE__URL", &url)]);
        assert!(status.success(), "{stdout}\n{stderr}");
        let tables: i64 = pg
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
                &[&schema],
            )
            .unwrap()
            .get(0);
        pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
        assert_eq!(
            tables, 0,
            "the demo wrote into the configured PostgreSQL store"
        );
        assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    }

    // The demo's own directory holding a store the demo did not make: refused.
    let foreign = dir.path().join("elsewhere");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(&prod, foreign.join("tallyd.db")).unwrap();
    let theirs = snapshot(&foreign);
    let dir_arg = foreign.to_str().unwrap();
    let (status, stdout, stderr) =
        run_demo(dir.path(), &[&args[..], &["--dir", dir_arg]].concat(), &[]);
    assert!(!status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("was not made by tallyd demo"), "{stderr}");
    assert_eq!(snapshot(&foreign), theirs);
}

/// Every option of every subcommand has help text.
#[test]
fn every_flag_has_help_text() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&[]);
    let subcommands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(subcommands.iter().any(|c| c == "demo"), "{top}");
    for sub in subcommands {
        let text = help(&[&sub]);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            if !trimmed.starts_with('-') {
                continue;
            }
            // Help on the same line, after two spaces, or on the next line,
            // indented further.
            let same_line = trimmed
                .split_once("  ")
                .is_some_and(|(_, h)| !h.trim().is_empty());
            let indent = line.len() - trimmed.len();
            let next = lines.get(i + 1).copied().unwrap_or("");
            let next_indent = next.len() - next.trim_start().len();
            let next_line = !next.trim().is_empty() && next_indent > indent;
            assert!(
                same_line || next_line,
                "tallyd {sub}: {trimmed:?} has no help text:\n{text}"
            );
        }
    }
}
