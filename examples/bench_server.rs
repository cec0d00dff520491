//! The server `scripts/loadtest.sh` drives: the benchmarks' handler (a ~200-byte JSON charge
//! in, a ~300-byte JSON charge out) behind axum, bare or under the layer.
//!
//! ```sh
//! cargo build --release --example bench_server --features redis
//! MODE=memory PORT=3001 target/release/examples/bench_server
//! ```
//!
//! - `MODE`: `bare` (no layer), `memory` (`MemoryStore`), `redis` (`RedisStore`) or
//!   `cached` (`CachedStore` over `RedisStore`); the last two need the `redis` feature and
//!   `REDIS_URL`. Default `memory`. Two more modes are **naive baselines**, measured only to
//!   put the layer's cost in context (`benches/common/naive.rs`): `naive-moka` (a moka cache
//!   of responses) and `naive-redis` (the same over Redis: needs the `redis` feature and
//!   `REDIS_URL`).
//! - `MODE=postgres`: `PostgresStore` (the `postgres` feature and `DATABASE_URL`; the table is
//!   created if missing).
//! - `PORT`: the loopback port to listen on. Default 3000.
//!
//! Routes (the same in every mode):
//! - `GET /v1/charges/{id}`: not a protected method, passes through;
//! - `POST /v1/charges`: the key from `Idempotency-Key`; without one, passes through
//!   (`MissingKey::PassThrough`);
//! - `POST /v1/derived`: without a key, the key is derived from the request (the default).
//!
//! The naive modes protect every `POST` that has an `Idempotency-Key` and pass everything else
//! through, `POST /v1/derived` without a key included (they derive no keys).

// The request builders and the `service_fn` form of the handler serve the benchmarks only.
#[allow(dead_code)]
#[path = "../benches/common/handler.rs"]
mod handler;
// The naive baselines, shared with `benches/alloc.rs`.
#[path = "../benches/common/naive.rs"]
mod naive;

use std::net::{Ipv4Addr, SocketAddr};

use axum::{
    Router,
    http::Method,
    routing::{get, post},
};
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use naive::NaiveLayer;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore, MissingKey};

async fn charge(method: Method, body: Bytes) -> Response<Full<Bytes>> {
    handler::respond(&method, &body)
}

fn charges() -> Router {
    Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/charges/{id}", get(charge))
}

fn derived() -> Router {
    Router::new().route("/v1/derived", post(charge))
}

fn protected<St: IdempotencyStore + Sync>(store: St) -> Router {
    let keyed = IdempotencyLayer::new(store.clone()).with_missing_key(MissingKey::PassThrough);
    charges()
        .layer(keyed)
        .merge(derived().layer(IdempotencyLayer::new(store)))
}

#[cfg(feature = "redis")]
async fn redis_store() -> Result<tower_idempotency::RedisStore, Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").map_err(|_| "MODE=redis and cached need REDIS_URL")?;
    Ok(tower_idempotency::RedisStore::connect(&url).await?)
}

#[cfg(feature = "postgres")]
async fn postgres_store() -> Result<tower_idempotency::PostgresStore, Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "MODE=postgres needs DATABASE_URL")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(32)
        .connect(&url)
        .await?;
    let store = tower_idempotency::PostgresStore::new(pool);
    store.migrate().await?;
    Ok(store)
}

async fn app(mode: &str) -> Result<Router, Box<dyn std::error::Error>> {
    Ok(match mode {
        "bare" => charges().merge(derived()),
        "memory" => protected(MemoryStore::default()),
        #[cfg(feature = "redis")]
        "redis" => protected(redis_store().await?),
        #[cfg(feature = "redis")]
        "cached" => protected(tower_idempotency::CachedStore::new(
            redis_store().await?,
            64 * 1024 * 1024,
        )),
        #[cfg(feature = "postgres")]
        "postgres" => protected(postgres_store().await?),
        #[cfg(not(feature = "postgres"))]
        "postgres" => return Err("MODE=postgres needs the `postgres` feature".into()),
        "naive-moka" => charges()
            .merge(derived())
            .layer(NaiveLayer(naive::Moka::new(64 * 1024 * 1024))),
        #[cfg(feature = "redis")]
        "naive-redis" => {
            let url = std::env::var("REDIS_URL").map_err(|_| "MODE=naive-redis needs REDIS_URL")?;
            let connection = ::redis::Client::open(url)?.get_connection_manager().await?;
            charges()
                .merge(derived())
                .layer(NaiveLayer(naive::Redis(connection)))
        }
        #[cfg(not(feature = "redis"))]
        "redis" | "cached" | "naive-redis" => {
            return Err("MODE=redis, cached and naive-redis need the `redis` feature".into());
        }
        other => {
            return Err(format!(
                "unknown MODE {other:?}: bare, memory, redis, cached, postgres, naive-moka or naive-redis"
            )
            .into());
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::var("MODE").unwrap_or_else(|_| "memory".to_owned());
    let port = match std::env::var("PORT") {
        Ok(port) => port
            .parse()
            .map_err(|_| format!("PORT {port:?} is not a port"))?,
        Err(_) => 3000,
    };
    let app = app(&mode).await?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("bench_server ({mode}) listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
