//! A payments API whose `POST /charges` is safe to retry.
//!
//! ```sh
//! cargo run --example quickstart --features axum
//! ```
//!
//! The `axum` feature lets the layer read what axum knows of a request: the path the client
//! sent (`OriginalUri`, under `nest`) and the peer's address (`ConnectInfo`, when served with
//! connect info as below), which scopes requests sent without a key.
//!
//! Then, from another terminal (see the README for what each prints):
//!
//! ```sh
//! KEY=8e03978e-40d5-43e8-bc93-6894a57f9324
//! curl -i localhost:3000/charges -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' -d '{"amount":1000,"currency":"eur"}'
//! curl -i localhost:3000/charges -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' -d '{"amount":1000,"currency":"eur"}'
//! curl -i localhost:3000/charges -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' -d '{"amount":9999,"currency":"eur"}'
//! curl -s localhost:3000/charges
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[derive(Deserialize)]
struct NewCharge {
    amount: u64,
    currency: String,
}

#[derive(Clone, Serialize)]
struct Charge {
    id: String,
    amount: u64,
    currency: String,
    created: u64,
}

#[derive(Clone, Default)]
struct Ledger {
    charges: Arc<Mutex<Vec<Charge>>>,
}

async fn create_charge(
    State(ledger): State<Ledger>,
    Json(new): Json<NewCharge>,
) -> (StatusCode, Json<Charge>) {
    // Talking to the card network takes a while: long enough for a double click to arrive
    // while the first request is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut charges = ledger.charges.lock().unwrap_or_else(|e| e.into_inner());
    let charge = Charge {
        id: format!("ch_{:x}{:04}", now.as_millis(), charges.len() + 1),
        amount: new.amount,
        currency: new.currency,
        created: now.as_secs(),
    };
    charges.push(charge.clone());
    tracing::info!(id = %charge.id, amount = charge.amount, "charged");
    (StatusCode::CREATED, Json(charge))
}

async fn list_charges(State(ledger): State<Ledger>) -> Json<Vec<Charge>> {
    Json(
        ledger
            .charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    )
}

fn app() -> Router {
    Router::new()
        .route("/charges", post(create_charge).get(list_charges))
        .with_state(Ledger::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "quickstart=info,tower_idempotency=debug".into()),
        )
        .init();
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{addr}");
    // With the peer's address, a form posted without a key is deduplicated per client (a
    // double click from one browser, over one connection or two); without it, such a request
    // could not be told from another client's and would run unprotected.
    let app = app().into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).await
}
