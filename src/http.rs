//! The daemon's HTTP server: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! plus the usage APIs mounted from [`crate::api`] when present.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::flush::FlushHealth;
use crate::ingest::IngestHealth;
use crate::metrics::Exposition;

#[derive(Clone)]
pub struct Probes {
    pub metrics: Exposition,
    pub ingest: Arc<IngestHealth>,
    pub flush: Arc<FlushHealth>,
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

/// Ready when the store answered the last attempt and partitions are assigned.
async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    let store_up = p.flush.store_up.load(Ordering::Relaxed);
    let partitions = p.ingest.assigned_partitions();
    let paused = p.ingest.paused();
    let body = format!("store_up={store_up} partitions_assigned={partitions} paused={paused}\n");
    let code = if store_up && partitions > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}
