//! Two instances of a payments API behind one Redis: a request sent to one instance and its
//! retry sent to the other run the charge once, and the retry is replayed.
//!
//! Both servers run in this process for convenience, but share nothing except Redis: each
//! has its own `RedisStore` (its own connections) and its own ledger, as two machines
//! behind a load balancer would.
//!
//! ```sh
//! redis-server --port 6379 --save '' &          # or any Redis 6.2+; set REDIS_URL otherwise
//! cargo run --example multi_instance --features redis
//! ```
//!
//! Then, from another terminal:
//!
//! ```sh
//! KEY=$(cat /proc/sys/kernel/random/uuid)
//! # The first attempt goes to instance A...
//! curl -i localhost:3001/charges -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' -d '{"amount":1000,"currency":"eur"}'
//! # ...its retry lands on instance B: same charge id, `idempotent-replayed: true`,
//! # `x-instance: a` (the response A produced, byte for byte).
//! curl -i localhost:3002/charges -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' -d '{"amount":1000,"currency":"eur"}'
//! # Two requests at once, one to each instance: one charge, two identical responses.
//! KEY=$(cat /proc/sys/kernel/random/uuid)
//! for port in 3001 3002; do curl -s localhost:$port/charges -H "Idempotency-Key: $KEY" -H 'Content-Type: application/json' -d '{"amount":500,"currency":"eur"}' & done; wait
//! # Each instance lists the charges it executed itself.
//! curl -s localhost:3001/charges; echo; curl -s localhost:3002/charges; echo
//! ```
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`), `PORT_A` and `PORT_B`
//! (default 3001 and 3002).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode},
    response::IntoResponse,
    routing::post,
};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, RedisStore};

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
    instance: &'static str,
}

#[derive(Clone)]
struct Instance {
    name: &'static str,
    charges: Arc<Mutex<Vec<Charge>>>,
}

const X_INSTANCE: HeaderName = HeaderName::from_static("x-instance");

async fn create_charge(
    State(instance): State<Instance>,
    Json(new): Json<NewCharge>,
) -> impl IntoResponse {
    // Talking to the card network takes a while: long enough for a duplicate to arrive at the
    // other instance while this one is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut charges = instance.charges.lock().unwrap_or_else(|e| e.into_inner());
    let charge = Charge {
        id: format!(
            "ch_{}_{:x}{:04}",
            instance.name,
            now.as_millis(),
            charges.len() + 1
        ),
        amount: new.amount,
        currency: new.currency,
        created: now.as_secs(),
        instance: instance.name,
    };
    charges.push(charge.clone());
    tracing::info!(instance = instance.name, id = %charge.id, "charged");
    (
        StatusCode::CREATED,
        [(X_INSTANCE, HeaderValue::from_static(instance.name))],
        Json(charge),
    )
}

async fn list_charges(State(instance): State<Instance>) -> Json<Vec<Charge>> {
    Json(
        instance
            .charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    )
}

async fn serve(name: &'static str, port: u16, redis_url: &str) -> Result<(), BoxError> {
    // Each instance connects on its own, as a separate process would.
    let store = RedisStore::connect(redis_url).await?;
    let app = Router::new()
        .route("/charges", post(create_charge).get(list_charges))
        .with_state(Instance {
            name,
            charges: Arc::default(),
        })
        .layer(IdempotencyLayer::new(store));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("instance {name} listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn port(variable: &str, default: u16) -> u16 {
    std::env::var(variable)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "multi_instance=info,tower_idempotency=debug".into()),
        )
        .init();
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let (a, b) = (port("PORT_A", 3001), port("PORT_B", 3002));
    tokio::try_join!(serve("a", a, &redis_url), serve("b", b, &redis_url))?;
    Ok(())
}
