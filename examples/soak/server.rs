//! One instance: a payments API behind the layer on a `RedisStore` of its own, or (with
//! `DATABASE_URL` and the feature `postgres`) a `PostgresStore`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use serde::Deserialize;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, MissingKey, RedisStore, redis::Durability,
};

use crate::{BoxError, env, env_or};

/// The header naming the client's attempt, so that an execution can be traced to the
/// request that caused it. Headers are not part of the fingerprint.
pub const X_ATTEMPT: HeaderName = HeaderName::from_static("x-attempt");
const X_INSTANCE: HeaderName = HeaderName::from_static("x-instance");

/// Derived keys must outlive the run, or the final check would find them expired.
const DERIVED_WINDOW: Duration = Duration::from_secs(60 * 60);

#[derive(Deserialize)]
struct NewCharge {
    order: String,
    amount: u64,
}

/// What this instance executed: (order, attempt) per execution, and how many run now.
#[derive(Default)]
struct Ledger {
    executions: Mutex<Vec<(String, String)>>,
    running: AtomicUsize,
    serial: AtomicU64,
}

#[derive(Clone)]
struct Instance {
    name: HeaderValue,
    ledger: Arc<Ledger>,
}

/// Counts a running execution until dropped.
struct Running(Arc<Ledger>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn charge(State(instance): State<Instance>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(new) = serde_json::from_slice::<NewCharge>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let attempt = headers
        .get(X_ATTEMPT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let ledger = &instance.ledger;
    ledger.running.fetch_add(1, Ordering::SeqCst);
    let _running = Running(Arc::clone(ledger));
    ledger
        .executions
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((new.order.clone(), attempt));
    // The card network.
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..=100))).await;
    let serial = ledger.serial.fetch_add(1, Ordering::SeqCst);
    let name = instance.name.to_str().unwrap_or("?");
    let charge = serde_json::json!({
        "id": format!("ch_{name}_{serial:08}"),
        "order": new.order,
        "amount": new.amount,
        "instance": name,
    });
    (
        StatusCode::CREATED,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (X_INSTANCE, instance.name.clone()),
        ],
        charge.to_string(),
    )
        .into_response()
}

/// `running N`, then one `order attempt` line per execution.
async fn executions(State(instance): State<Instance>) -> String {
    let ledger = &instance.ledger;
    let executions = ledger
        .executions
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut text = format!("running {}\n", ledger.running.load(Ordering::SeqCst));
    for (order, attempt) in executions.iter() {
        text.push_str(order);
        text.push(' ');
        text.push_str(attempt);
        text.push('\n');
    }
    text
}

pub async fn run() -> Result<ExitCode, BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_idempotency=warn".into()),
        )
        .with_ansi(false)
        .init();
    let name = env("NAME")?;
    let port: u16 = env_or("PORT", 3001)?;
    let instance = Instance {
        name: HeaderValue::from_str(&name)?,
        ledger: Arc::default(),
    };
    let replicas: u32 = env_or("DURABILITY", 0)?;
    let durability = Durability::replicas(replicas);
    // On PostgreSQL (the postgres mode of scripts/soak.sh), through Sentinel (the failover
    // mode), or on one redis-server.
    let protected = if let Ok(url) = std::env::var("DATABASE_URL") {
        on_postgres(&url).await?
    } else {
        match std::env::var("SENTINELS") {
            Ok(sentinels) => protected(
                RedisStore::connect_sentinel(sentinels.split(','), &env("SERVICE")?)
                    .await?
                    .with_durability(durability),
            ),
            Err(_) => protected(
                RedisStore::connect(&env("REDIS_URL")?)
                    .await?
                    .with_durability(durability),
            ),
        }
    };
    let app = protected
        .merge(Router::new().route("/executions", get(executions)))
        .with_state(instance);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The port bound, which the kernel chose when `PORT=0`.
    let addr = listener.local_addr()?;
    println!("soak server {name} listening on http://{addr}");
    // Keyless requests are scoped by the client's address (the layer reads it with the `axum`
    // feature): without it, they would run unprotected.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).await?;
    Ok(ExitCode::SUCCESS)
}

/// The payments route behind the layer on a `PostgresStore` at `url`, its table created.
#[cfg(feature = "postgres")]
async fn on_postgres(url: &str) -> Result<Router<Instance>, BoxError> {
    use tower_idempotency::PostgresStore;
    // Connected lazily: a database down at a request costs that request a 503, and the pool
    // connects again once it is back.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(32)
        .connect_lazy(url)?;
    let store = PostgresStore::new(pool);
    store.migrate().await?;
    Ok(protected(store))
}

#[cfg(not(feature = "postgres"))]
async fn on_postgres(_url: &str) -> Result<Router<Instance>, BoxError> {
    Err("DATABASE_URL is set: build with the feature `postgres`".into())
}

/// The payments route behind the layer, on `store`.
fn protected<St: IdempotencyStore>(store: St) -> Router<Instance> {
    Router::new().route("/charges", post(charge)).layer(
        IdempotencyLayer::new(store).with_missing_key(MissingKey::Fingerprint(DERIVED_WINDOW)),
    )
}
