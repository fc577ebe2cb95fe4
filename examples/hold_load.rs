//! Load generator of `scripts/bench-holds.sh`: places and releases holds over
//! HTTP against a running tallyd, and reports the achieved rate and the hold
//! latency quantiles (hdrhistogram, microsecond resolution).
//!
//! Usage: hold_load BASE_URL ADMIN_TOKEN ACCOUNTS CONNECTIONS SECONDS [baseline]
//!
//! With `baseline` it times `GET /healthz` the same way instead: the HTTP
//! round trip alone, the floor a hold's latency is compared with.
//!
//! It first creates ACCOUNTS accounts through the admin API (each with an API
//! key, a large top-up and room for many concurrent calls), then runs
//! CONNECTIONS closed-loop clients for SECONDS: each places a hold
//! (`POST /v1/holds`, timed) and releases it (`DELETE /v1/holds/{id}`, not
//! timed), on accounts taken in turn. Every hold answer must be a 201.
//!
//! With `HOLD_LOAD_RATE=R` (requests per second over all connections) the
//! clients run open loop instead: each sends at its share of R on a fixed
//! schedule, and a request's latency counts from when it was due, so a server
//! falling behind shows in the quantiles instead of slowing the load.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (base, admin, accounts, connections, seconds, baseline) = match &args[..] {
        [_, b, a, n, c, s] => (b, a, n, c, s, false),
        [_, b, a, n, c, s, m] if m == "baseline" => (b, a, n, c, s, true),
        _ => {
            eprintln!(
                "usage: hold_load BASE_URL ADMIN_TOKEN ACCOUNTS CONNECTIONS SECONDS [baseline]"
            );
            std::process::exit(2);
        }
    };
    let accounts: usize = accounts.parse().expect("ACCOUNTS");
    let connections: usize = connections.parse().expect("CONNECTIONS");
    let run_for = Duration::from_secs(seconds.parse().expect("SECONDS"));
    let rate: Option<f64> = std::env::var("HOLD_LOAD_RATE")
        .ok()
        .map(|r| r.parse().expect("HOLD_LOAD_RATE"));
    // Each connection's interval between requests, open loop.
    let every = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .build()
            .expect("client");
        let keys = if baseline {
            vec![String::new()]
        } else {
            setup(&http, base, admin, accounts).await
        };
        let started = Instant::now();
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                let (http, base, keys) = (http.clone(), base.clone(), keys.clone());
                tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                    let mut n = 0usize;
                    // Connections start spread over one interval.
                    let first = every.map(|e| started + e.mul_f64(c as f64 / connections as f64));
                    while started.elapsed() < run_for {
                        // When this request is due: now (closed loop) or on
                        // the schedule (open loop).
                        let t = match (first, every) {
                            (Some(first), Some(e)) => {
                                let due = first + e * n as u32;
                                tokio::time::sleep_until(due.into()).await;
                                due
                            }
                            _ => Instant::now(),
                        };
                        if baseline {
                            let r = http.get(format!("{base}/healthz")).send().await.expect("healthz");
                            let _ = r.bytes().await;
                            h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                            n += 1;
                            continue;
                        }
                        let key = &keys[(c + n * connections) % keys.len()];
                        let call_id = format!("CAload{c}x{n}");
                        let r = http
                            .post(format!("{base}/v1/holds"))
                            .bearer_auth(key)
                            .json(&json!({"call_id": call_id}))
                            .send()
                            .await
                            .expect("hold request");
                        let status = r.status();
                        let _ = r.bytes().await;
                        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                        assert_eq!(status.as_u16(), 201, "hold {call_id}");
                        let r = http
                            .delete(format!("{base}/v1/holds/{call_id}"))
                            .bearer_auth(key)
                            .send()
                            .await
                            .expect("release request");
                        assert!(r.status().is_success(), "release {call_id}: {}", r.status());
                        let _ = r.bytes().await;
                        n += 1;
                    }
                    h
                })
            })
            .collect();
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for t in tasks {
            all.add(t.await.expect("client task")).unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let q = |p: f64| all.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{} {}: {} in {:.1} s = {:.0}/s{}; latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            if baseline { "baseline (GET /healthz)" } else { "holds" },
            match rate {
                Some(r) => format!("open loop at {r:.0}/s"),
                None => "closed loop".into(),
            },
            all.len(),
            secs,
            all.len() as f64 / secs,
            if baseline { "" } else { " (each also released, untimed)" },
            q(0.5),
            q(0.99),
            q(0.999),
            all.max() as f64 / 1000.0
        );
    });
}

/// Creates the accounts; returns their API keys.
async fn setup(http: &reqwest::Client, base: &str, admin: &str, n: usize) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let sid = format!("AC{:032x}", 0x10ad_0000 + i);
        let key = format!("load_key_{i:06}");
        let limits = json!({"max_call_duration_minutes": 10, "concurrent_calls": 100_000});
        for (path, body) in [
            (
                "/admin/accounts".to_string(),
                json!({"sid": sid, "limits": limits}),
            ),
            (
                format!("/admin/accounts/{sid}/api-keys"),
                json!({"key": key}),
            ),
            (
                format!("/admin/accounts/{sid}/credits"),
                json!({"amount": "1000000.00", "idempotency_key": "load"}),
            ),
        ] {
            let r = http
                .post(format!("{base}{path}"))
                .bearer_auth(admin)
                .json(&body)
                .send()
                .await
                .expect("admin request");
            assert!(
                r.status().is_success(),
                "{path}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        keys.push(key);
    }
    keys
}
