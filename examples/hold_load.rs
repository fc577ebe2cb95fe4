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
//! `HOLD_LOAD_RELEASE=0` leaves the holds granted (no `DELETE`), so R is the
//! server's whole request rate, as it is for the baseline; each account then
//! allows 10 million concurrent calls.
//!
//! The timed requests go over hyper's HTTP/1.1 client, one kept-alive
//! connection per client, with the parts that do not change (path, headers)
//! made once: the generator shares the two cores with the server, so what it
//! spends per request is taken from what is measured (~11 µs of CPU per
//! request). The untimed setup uses reqwest.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
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
    let release = std::env::var("HOLD_LOAD_RELEASE").map_or(true, |r| r != "0");
    // Each connection's interval between requests, open loop.
    let every = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
    let url = url::Url::parse(base).expect("BASE_URL");
    let host = url.host_str().expect("BASE_URL host").to_owned();
    let addr = format!("{host}:{}", url.port_or_known_default().expect("port"));
    let host = HeaderValue::from_str(&addr).expect("host header");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let keys: Vec<HeaderValue> = if baseline {
            vec![HeaderValue::from_static("")]
        } else {
            let http = reqwest::Client::new();
            let limit = if release { 100_000 } else { 10_000_000 };
            setup(&http, base, admin, accounts, limit)
                .await
                .iter()
                .map(|k| HeaderValue::from_str(&format!("Bearer {k}")).expect("key"))
                .collect()
        };
        let started = Instant::now();
        let tasks: Vec<_> = (0..connections)
            .map(|c| {
                let (keys, addr, host) = (keys.clone(), addr.clone(), host.clone());
                tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                    let mut conn = connect(&addr).await;
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
                        n += 1;
                        if baseline {
                            let req = request(Method::GET, "/healthz".into(), &host, None, None);
                            send(&mut conn, req).await;
                            h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                            continue;
                        }
                        let key = &keys[(c + n * connections) % keys.len()];
                        let call_id = format!("CAload{c}x{n}");
                        let body = format!(r#"{{"call_id":"{call_id}"}}"#);
                        let req = request(Method::POST, "/v1/holds".into(), &host, Some(key), Some(body));
                        let status = send(&mut conn, req).await;
                        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                        assert_eq!(status, StatusCode::CREATED, "hold {call_id}");
                        if release {
                            let path = format!("/v1/holds/{call_id}");
                            let req = request(Method::DELETE, path, &host, Some(key), None);
                            let status = send(&mut conn, req).await;
                            assert!(status.is_success(), "release {call_id}: {status}");
                        }
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
            match (baseline, release) {
                (true, _) => "",
                (false, true) => " (each also released, untimed)",
                (false, false) => " (none released)",
            },
            q(0.5),
            q(0.99),
            q(0.999),
            all.max() as f64 / 1000.0
        );
    });
}

/// One kept-alive HTTP/1.1 connection to `addr`, its I/O driven by a task.
async fn connect(addr: &str) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection: {e}");
        }
    });
    send
}

fn request(
    method: Method,
    path: String,
    host: &HeaderValue,
    key: Option<&HeaderValue>,
    json: Option<String>,
) -> Request<Full<Bytes>> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host.clone());
    if let Some(key) = key {
        r = r.header(header::AUTHORIZATION, key.clone());
    }
    let body = match json {
        Some(j) => {
            r = r.header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Bytes::from(j)
        }
        None => Bytes::new(),
    };
    r.body(Full::new(body)).expect("request")
}

/// Sends `req` and reads its whole answer; its status.
async fn send(conn: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> StatusCode {
    conn.ready().await.expect("connection ready");
    let r = conn.send_request(req).await.expect("request");
    let status = r.status();
    r.into_body().collect().await.expect("answer body");
    status
}

/// Creates the accounts; returns their API keys.
async fn setup(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    n: usize,
    concurrent_calls: u64,
) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let sid = format!("AC{:032x}", 0x10ad_0000 + i);
        let key = format!("load_key_{i:06}");
        let limits = json!({"max_call_duration_minutes": 10, "concurrent_calls": concurrent_calls});
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
