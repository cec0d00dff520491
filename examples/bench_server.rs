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
//!   `REDIS_URL`. Default `memory`.
//! - `PORT`: the loopback port to listen on. Default 3000.
//!
//! Routes (the same in every mode):
//! - `GET /v1/charges/{id}`: not a protected method, passes through;
//! - `POST /v1/charges`: the key from `Idempotency-Key`; without one, passes through
//!   (`MissingKey::PassThrough`);
//! - `POST /v1/derived`: without a key, the key is derived from the request (the default).

// The request builders and the `service_fn` form of the handler serve the benchmarks only.
#[allow(dead_code)]
#[path = "../benches/common/handler.rs"]
mod handler;

use std::net::{Ipv4Addr, SocketAddr};

use axum::{
    Router,
    http::Method,
    routing::{get, post},
};
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
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
        #[cfg(not(feature = "redis"))]
        "redis" | "cached" => return Err("MODE=redis and cached need the `redis` feature".into()),
        other => {
            return Err(format!("unknown MODE {other:?}: bare, memory, redis or cached").into());
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
