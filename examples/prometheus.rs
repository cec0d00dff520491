//! The layer's metrics exposed to Prometheus, with the admin router beside them.
//!
//! ```sh
//! cargo run --example prometheus --features metrics,axum
//! curl -s localhost:3000/charges -H 'Idempotency-Key: k-1' -d '{"amount":100}'
//! curl -s localhost:3000/charges -H 'Idempotency-Key: k-1' -d '{"amount":100}'   # replayed
//! curl -s localhost:3000/metrics | grep '^idempotency_'
//! curl -s 'localhost:3000/admin/claims?older_than=60'                              # stuck claims
//! ```
//!
//! `PORT` overrides the port. The admin routes here have no authentication: in a real
//! service, put them behind your operators' authentication.

use std::time::Duration;

use axum::{
    Router,
    routing::{get, post},
};
use http::StatusCode;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_idempotency::{IdempotencyLayer, MemoryStore, admin::AdminRouter};

/// Histogram buckets for the `_seconds` metrics, from 50 µs (a `MemoryStore` claim) to
/// 10 s (the default wait bound): what a p99 panel and alert need.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Installs the Prometheus recorder (before any layer records anything) and keeps its
/// histograms tidy in the background.
pub fn install_recorder() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .expect("the only metrics recorder of this process");
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    handle
}

/// A payments API whose `/charges` is protected (route label `charges`), `/metrics` for
/// Prometheus to scrape, and the admin router under `/admin`.
pub fn app(metrics: PrometheusHandle, store: MemoryStore) -> Router {
    let charges = Router::new()
        .route(
            "/charges",
            post(|body: String| async move { (StatusCode::CREATED, format!("charged {body}")) }),
        )
        .layer(IdempotencyLayer::new(store.clone()).with_route_label("charges"));
    charges
        .route("/metrics", get(move || async move { metrics.render() }))
        .nest("/admin", AdminRouter::new(store).into_router())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let metrics = install_recorder();
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(metrics, MemoryStore::default())).await
}
