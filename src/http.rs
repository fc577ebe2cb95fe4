//! The daemon's HTTP server: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! plus the usage APIs mounted from [`crate::api`] when present.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

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
