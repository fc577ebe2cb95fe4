//! The store layer seen from outside: a daemon started while its store is down
//! waits for it (answering `/healthz`, saying why in `/readyz`) and consumes
//! exactly once it comes up; the API's pooled PostgreSQL connections survive
//! their backends being killed.

mod common;
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::*;

const TOPIC: &str = "cdrs";

/// From the first connection on, forwards every connection to `port` to
/// `upstream` (both on loopback), byte for byte, until the test ends.
fn forward(port: u16, upstream: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("forwarder port");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .ok()?;
    Some((r.status().as_u16(), r.text().unwrap_or_default()))
}

#[test]
fn a_store_down_at_start_is_waited_for_then_consumption_is_exact() {
    let dir = test_dir();
    let pg = PgSchema::new("down_at_start");
    let store_port = free_port();
    // The daemon reaches PostgreSQL through a port nothing listens on yet.
    let (host, upstream) = ("127.0.0.1:", 5432);
    assert!(pg.url.contains(&format!("{host}{upstream}")), "{}", pg.url);
    let url = pg
        .url
        .replace(&format!("{host}{upstream}"), &format!("{host}{store_port}"));
    let t = Tansu::start();
    t.create_topic(TOPIC, 2);
    t.create_topic("cdrs-dead-letter", 1);
    let http = free_port();
    let log = dir.path().join("tallyd.log");
    let listen = format!("127.0.0.1:{http}");
    let mut d = Daemon::spawn_with(
        &t.brokers(),
        &url,
        "g-down",
        &log,
        &[("TALLYD_HTTP__LISTEN", &listen)],
    );
    const N: u64 = 3_000;
    let lines = generate(&t.brokers(), TOPIC, N, 23, &dir.path().join("cdrs.jsonl"));
    let (truth, _) = ground_truth(&lines);

    // Alive, not ready, and saying why.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, body) = loop {
        if let Some((200, _)) = get(http, "/healthz") {
            if let Some(r) = get(http, "/readyz") {
                if r.1.contains("store_error=") {
                    break r;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no /readyz with the store's error; log {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("started=false"), "{body}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon exited; log {}",
        log.display()
    );

    // The store comes up: the daemon prepares it and consumes everything.
    forward(store_port, upstream);
    wait_flushed(&pg.url, TOPIC, N, Duration::from_secs(180), &log);
    let (code, body) = get(http, "/readyz").expect("readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("started=true"), "{body}");
    d.stop();
    assert_exact(&pg.url, &truth);
    assert_offsets(&pg.url, TOPIC, N);
}

#[test]
fn pooled_postgres_connections_whose_backends_were_killed_are_replaced() {
    let Some(base) = common::postgres_base() else {
        return;
    };
    let app = format!("tallyd_killed_{}", std::process::id());
    let sep = if base.contains('?') { '&' } else { '?' };
    let store = common::TestStore::postgres(&format!("{base}{sep}application_name={app}"));
    let (server, _) = common::scenario(&store, common::NOW);
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Usage/Records/AllTime.json",
        server.base,
        common::PARENT
    );
    let get = || {
        reqwest::blocking::Client::new()
            .get(&url)
            .basic_auth(common::PARENT, Some(common::PARENT_TOKEN))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // Several requests at once leave several connections in the pool.
    let codes: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(get)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(codes, [200; 4]);
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let killed: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) k",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "no pooled connection to kill");
    for _ in 0..8 {
        assert_eq!(
            get(),
            200,
            "a request after the backends were killed failed"
        );
    }
}
