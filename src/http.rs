//! The daemon's HTTP server: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! plus the usage APIs mounted from [`crate::api`], served by [`serve`].
//!
//! [`serve`] is an HTTP/1.1 server that keeps clients from starving it of
//! connections or file descriptors:
//!
//! - a client has `http.header_read_timeout_secs` to send a request's headers,
//!   counted from when the connection opens or from the previous response, so a
//!   silent connection, a half-sent header and an idle keep-alive connection are
//!   all closed after it (hyper's header-read timer);
//! - a request (reading its body and answering it) gets at most
//!   `http.request_timeout_secs`, then a 408 (tower-http's timeout layer);
//! - at most `http.max_connections` connections are open (fewer if the process
//!   may not open that many files). A connection past the cap closes the open
//!   connection that has been idle longest (no request being served: silent,
//!   half-sent, or between keep-alive requests), so a new client is answered at
//!   once however many idle sockets are held; only when every connection is
//!   serving a request is the newcomer closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tower::ServiceExt;

use crate::config::HttpConfig;
use crate::flush::FlushHealth;
use crate::ingest::IngestHealth;
use crate::metrics::Exposition;
use crate::store::StoreHealth;

#[derive(Clone)]
pub struct Probes {
    pub metrics: Exposition,
    pub ingest: Arc<IngestHealth>,
    pub flush: Arc<FlushHealth>,
    pub store: Arc<StoreHealth>,
    /// Set once the store is prepared (tables migrated, accounts written) and
    /// the consumers have started.
    pub started: Arc<AtomicBool>,
}

pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(probes)
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        p.metrics.render(),
    )
}

/// Ready when the daemon has started and the store answered its last
/// operation. An instance without partitions (more instances than partitions
/// in the group) is ready too: it serves the API, and takes partitions over
/// when another instance leaves; the body says `partitions_assigned=0`. When
/// not ready, the body says why (the store's last error).
async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    let started = p.started.load(Ordering::Relaxed);
    let store_up = p.store.is_up();
    let partitions = p.ingest.assigned_partitions();
    let paused = p.ingest.paused();
    let mut body = format!(
        "started={started} store_up={store_up} partitions_assigned={partitions} paused={paused}\n"
    );
    if let Some(e) = p.store.last_error() {
        body.push_str(&format!("store_error={e}\n"));
    }
    let code = if started && store_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// The connection limits of [`serve`] (the `[http]` keys of the config).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
}

impl From<&HttpConfig> for ServerLimits {
    fn from(c: &HttpConfig) -> ServerLimits {
        ServerLimits {
            max_connections: c.max_connections,
            header_read_timeout: Duration::from_secs(c.header_read_timeout_secs),
            request_timeout: Duration::from_secs(c.request_timeout_secs),
        }
    }
}

/// Files kept free for everything but HTTP clients: store connections, Kafka
/// sockets, SQLite's files, logs.
const RESERVED_FILES: u64 = 256;

/// Raises the soft open-file limit to the hard one (as Go and many servers do at
/// start) and returns the soft limit in force.
fn raise_open_file_limit() -> Option<libc::rlim_t> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return None;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            }
        }
    }
    Some(l.rlim_cur)
}

/// `http.max_connections`, lowered so that the process keeps
/// [`RESERVED_FILES`] descriptors (or half of a small limit) for everything else.
pub fn connection_cap(configured: usize, open_files: Option<u64>) -> usize {
    let Some(files) = open_files else {
        return configured.max(1);
    };
    let room = files.saturating_sub(RESERVED_FILES).max(files / 2).max(1);
    configured.clamp(1, usize::try_from(room).unwrap_or(usize::MAX))
}

/// Longest a request's URI may be before it is answered 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most bytes of request headers (names and values) before a 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper's read buffer: a request head larger than this is refused by hyper
/// itself (a bare 431), before tallyd sees it.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting,
/// closes idle connections, and lets requests in progress finish (for at most
/// the request timeout).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = connection_cap(limits.max_connections, raise_open_file_limit());
    if cap < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            used = cap,
            "http.max_connections lowered to what the open-file limit leaves room for"
        );
    }
    let app = app
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(axum::middleware::from_fn(crate::api::error::json_errors));
    let conns = Arc::new(Connections::new(cap));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(READ_BUFFER_BYTES);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it
                    // was accepted: wait a moment instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Some(slot) = conns.admit() else {
            metrics::counter!(crate::metrics::HTTP_CONNECTIONS_REFUSED_TOTAL).increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service_slot = slot.clone();
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let busy = service_slot.busy();
            let app = app.clone();
            async move {
                let response = app.oneshot(req.map(Body::new)).await?;
                // The connection counts as serving until its response body is
                // written (hyper drops the body then), not only until the
                // handler returns.
                Ok::<_, Infallible>(response.map(|b| {
                    Body::new(b.map_frame(move |f| {
                        let _ = &busy;
                        f
                    }))
                }))
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        let conns = conns.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
                },
                _ = slot.closed.notified() => {}
            }
            conns.remove(slot.id);
        });
    }
    drop(listener);
    conns.close_idle();
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still running at shutdown were cut off");
    }
    Ok(())
}

/// One open connection, as the accept loop sees it.
struct Slot {
    id: u64,
    /// Requests being served on it (0 or 1 with HTTP/1.1).
    in_flight: AtomicUsize,
    /// When it last went idle, in ms since the server started.
    idle_since: AtomicU64,
    /// Told to close (evicted, or the server is stopping while it is idle).
    closed: tokio::sync::Notify,
    epoch: Instant,
}

impl Slot {
    fn busy(self: &Arc<Slot>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

/// Marks a connection as serving a request while held.
struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since
            .store(s.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections and the cap on them.
struct Connections {
    cap: usize,
    open: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Connections {
    fn new(cap: usize) -> Connections {
        Connections {
            cap,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A slot for a new connection; at the cap, the longest-idle connection is
    /// closed to make room. `None` when every open connection is serving.
    fn admit(&self) -> Option<Arc<Slot>> {
        let mut open = self.open.lock();
        if open.len() >= self.cap {
            let oldest = open
                .values()
                .filter(|s| s.in_flight.load(Ordering::Acquire) == 0)
                .min_by_key(|s| s.idle_since.load(Ordering::Relaxed))
                .map(|s| s.id)?;
            let evicted = open.remove(&oldest).expect("found above");
            evicted.closed.notify_one();
            metrics::counter!(crate::metrics::HTTP_CONNECTIONS_EVICTED_TOTAL).increment(1);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            id,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            closed: tokio::sync::Notify::new(),
            epoch: self.epoch,
        });
        open.insert(id, slot.clone());
        metrics::gauge!(crate::metrics::HTTP_CONNECTIONS).set(open.len() as f64);
        Some(slot)
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock();
        open.remove(&id);
        metrics::gauge!(crate::metrics::HTTP_CONNECTIONS).set(open.len() as f64);
    }

    /// Closes every connection not serving a request (at shutdown).
    fn close_idle(&self) {
        let mut open = self.open.lock();
        open.retain(|_, s| {
            let idle = s.in_flight.load(Ordering::Acquire) == 0;
            if idle {
                s.closed.notify_one();
            }
            !idle
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_files_for_the_rest() {
        assert_eq!(connection_cap(4096, Some(1024)), 768);
        assert_eq!(connection_cap(4096, Some(300)), 150);
        assert_eq!(connection_cap(4096, Some(1_048_576)), 4096);
        assert_eq!(connection_cap(100, None), 100);
        assert_eq!(connection_cap(0, Some(1024)), 1);
    }

    #[test]
    fn a_full_house_evicts_the_longest_idle_connection() {
        let c = Connections::new(2);
        let a = c.admit().unwrap();
        let b = c.admit().unwrap();
        let _serving = a.busy();
        b.idle_since.store(5, Ordering::Relaxed);
        // a serves a request, so b (idle) makes room.
        let third = c.admit().unwrap();
        assert!(!c.open.lock().contains_key(&b.id));
        // Both remaining are a (serving) and third (idle): third goes next.
        let _fourth = c.admit().unwrap();
        assert!(!c.open.lock().contains_key(&third.id));
        assert!(c.open.lock().contains_key(&a.id));
        // With every connection serving, a newcomer is refused.
        let _also = c.open.lock().values().next().unwrap().busy();
        let _all: Vec<Busy> = c.open.lock().values().map(|s| s.busy()).collect();
        assert!(c.admit().is_none());
    }
}
