//! The layer's metrics exposed to Prometheus, with the admin router beside them.
//!
//! ```sh
//! cargo run --example prometheus --features metrics,axum
//! curl -s localhost:3000/charges -H 'Idempotency-Key: k-1' -d '{"amount":100}'
//! curl -s localhost:3000/charges -H 'Idempotency-Key: k-1' -d '{"amount":100}'   # replayed
//! curl -s localhost:3000/metrics | grep '^idempotency_'
//! curl -s 'localhost:3000/admin/claims?older_than=60' -H "Authorization: Bearer $ADMIN_TOKEN"  # stuck claims
//! ```
//!
//! `PORT` overrides the port. The admin routes answer only requests bearing the token in
//! `ADMIN_TOKEN`; without it set, they refuse everyone (401). In a real service, authorize
//! your operators as your other internal tools do.

use std::time::Duration;

use axum::{
    Router,
    routing::{get, post},
};
use http::{StatusCode, header, request::Parts};
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
/// Prometheus to scrape, and the admin router under `/admin`, for bearers of `admin_token`
/// only (nobody when it is `None`).
pub fn app(metrics: PrometheusHandle, store: MemoryStore, admin_token: Option<String>) -> Router {
    let layer = IdempotencyLayer::new(store).with_route_label("charges");
    let admin = AdminRouter::for_layer(&layer, move |parts: &Parts| {
        match (&admin_token, bearer(parts)) {
            (Some(token), Some(sent)) if same(token.as_bytes(), sent) => Ok("admin".to_owned()),
            _ => Err(StatusCode::UNAUTHORIZED),
        }
    });
    let charges = Router::new()
        .route(
            "/charges",
            post(|body: String| async move { (StatusCode::CREATED, format!("charged {body}")) }),
        )
        .layer(layer);
    charges
        .route("/metrics", get(move || async move { metrics.render() }))
        .nest("/admin", admin.into_router())
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(parts: &Parts) -> Option<&[u8]> {
    let value = parts.headers.get(header::AUTHORIZATION)?.as_bytes();
    value.strip_prefix(b"Bearer ")
}

/// Compares a secret in time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let metrics = install_recorder();
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let admin_token = std::env::var("ADMIN_TOKEN")
        .ok()
        .filter(|token| !token.is_empty());
    axum::serve(listener, app(metrics, MemoryStore::default(), admin_token)).await
}
