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
//!   put the layer's cost in context (see [`naive`]): `naive-moka` (a moka cache of responses)
//!   and `naive-redis` (the same over Redis: needs the `redis` feature and `REDIS_URL`).
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
        "naive-moka" => naive::moka(charges().merge(derived())),
        #[cfg(feature = "redis")]
        "naive-redis" => naive::redis(charges().merge(derived())).await?,
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

/// Naive idempotency middlewares, **baselines for measurement only: do not copy them.**
///
/// They are what an idempotency middleware often looks like when written in a few lines, as
/// peers do: look the raw `Idempotency-Key` up, replay on a hit, otherwise run the handler and
/// store its buffered response. The load test measures them beside the layer so that its cost
/// reads against "a middleware that only caches" rather than against nothing. They have none
/// of what makes the layer correct:
/// - no claim: concurrent duplicates all run the handler (a double click charges twice);
/// - no fingerprint: the same key with another body replays the first response;
/// - no scope: the key alone addresses the record, whoever sends it;
/// - whatever the handler answered (a `500` included) is stored, a panic or a disconnect
///   stores nothing, and a Redis error is answered `503`;
/// - only `Idempotent-Replayed`, status, headers and body survive (no trailers).
///
/// Requests that are not a `POST` with a key pass through untouched (no cache lookup).
mod naive {
    use std::time::Duration;

    use axum::{
        Router,
        body::{Body, to_bytes},
        extract::{Request, State},
        http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
        middleware::{Next, from_fn_with_state},
        response::{IntoResponse, Response},
    };
    use bytes::Bytes;

    const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
    const BODY_LIMIT: usize = 1024 * 1024;
    const TTL: Duration = Duration::from_secs(24 * 60 * 60);

    type Stored = (StatusCode, HeaderMap, Bytes);

    /// The raw key of a `POST` that has one (as a string, the way naive code reads it).
    fn key(request: &Request) -> Option<String> {
        if request.method() != Method::POST {
            return None;
        }
        let value = request.headers().get("idempotency-key")?;
        value.to_str().ok().map(str::to_owned)
    }

    fn replay((status, mut headers, body): Stored) -> Response {
        headers.insert(REPLAYED, HeaderValue::from_static("true"));
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// Runs the handler and buffers its whole response (≤ 1 MiB).
    async fn execute(request: Request, next: Next) -> Result<(Stored, Response), Response> {
        let (parts, body) = next.run(request).await.into_parts();
        let Ok(body) = to_bytes(body, BODY_LIMIT).await else {
            return Err(StatusCode::INTERNAL_SERVER_ERROR.into_response());
        };
        let stored = (parts.status, parts.headers.clone(), body.clone());
        Ok((stored, Response::from_parts(parts, Body::from(body))))
    }

    type MokaCache = moka::sync::Cache<String, Stored>;

    /// `MODE=naive-moka`: a `moka::sync::Cache` of responses by raw key (moka's defaults,
    /// TinyLFU; 64 MiB weighed as body length + 200; 24 h to live).
    pub fn moka(app: Router) -> Router {
        let cache: MokaCache = moka::sync::Cache::builder()
            .max_capacity(64 * 1024 * 1024)
            .weigher(|_key: &String, (_, _, body): &Stored| {
                u32::try_from(body.len() + 200).unwrap_or(u32::MAX)
            })
            .time_to_live(TTL)
            .build();
        app.layer(from_fn_with_state(cache, moka_middleware))
    }

    async fn moka_middleware(
        State(cache): State<MokaCache>,
        request: Request,
        next: Next,
    ) -> Response {
        let Some(key) = key(&request) else {
            return next.run(request).await;
        };
        if let Some(stored) = cache.get(&key) {
            return replay(stored);
        }
        match execute(request, next).await {
            Ok((stored, response)) => {
                cache.insert(key, stored);
                response
            }
            Err(response) => response,
        }
    }

    /// `MODE=naive-redis`: the same over Redis through a `ConnectionManager`: a replay is one
    /// `GET`, a first execution a `GET` (miss) then a `SET … PX` (two round trips).
    #[cfg(feature = "redis")]
    pub async fn redis(app: Router) -> Result<Router, Box<dyn std::error::Error>> {
        let url = std::env::var("REDIS_URL").map_err(|_| "MODE=naive-redis needs REDIS_URL")?;
        let connection = ::redis::Client::open(url)?.get_connection_manager().await?;
        Ok(app.layer(from_fn_with_state(connection, redis_middleware)))
    }

    #[cfg(feature = "redis")]
    async fn redis_middleware(
        State(mut redis): State<::redis::aio::ConnectionManager>,
        request: Request,
        next: Next,
    ) -> Response {
        let Some(key) = key(&request) else {
            return next.run(request).await;
        };
        let key = format!("naive-idem:{key}");
        let found = ::redis::cmd("GET")
            .arg(&key)
            .query_async::<Option<Vec<u8>>>(&mut redis)
            .await;
        match found {
            Ok(Some(bytes)) => match decode(&bytes) {
                Some(stored) => return replay(stored),
                None => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            },
            Ok(None) => {}
            Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
        let (stored, response) = match execute(request, next).await {
            Ok(executed) => executed,
            Err(response) => return response,
        };
        let set = ::redis::cmd("SET")
            .arg(&key)
            .arg(encode(&stored))
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query_async::<()>(&mut redis)
            .await;
        match set {
            Ok(()) => response,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }

    /// status (u16) · header count (u32) · per header: name length (u32), name, value
    /// length (u32), value · body (the rest). Big-endian.
    #[cfg(feature = "redis")]
    fn encode((status, headers, body): &Stored) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + body.len());
        out.extend_from_slice(&status.as_u16().to_be_bytes());
        out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            for part in [name.as_str().as_bytes(), value.as_bytes()] {
                out.extend_from_slice(&(part.len() as u32).to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out.extend_from_slice(body);
        out
    }

    #[cfg(feature = "redis")]
    fn decode(mut bytes: &[u8]) -> Option<Stored> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = bytes.split_at_checked(n)?;
            *bytes = rest;
            Some(head)
        }
        fn int<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
            take(bytes, N)?.try_into().ok()
        }
        fn len(bytes: &mut &[u8]) -> Option<usize> {
            usize::try_from(u32::from_be_bytes(int(bytes)?)).ok()
        }
        let status = StatusCode::from_u16(u16::from_be_bytes(int(&mut bytes)?)).ok()?;
        let count = len(&mut bytes)?;
        let mut headers = HeaderMap::with_capacity(count.min(64));
        for _ in 0..count {
            let n = len(&mut bytes)?;
            let name = HeaderName::from_bytes(take(&mut bytes, n)?).ok()?;
            let n = len(&mut bytes)?;
            let value = HeaderValue::from_bytes(take(&mut bytes, n)?).ok()?;
            headers.append(name, value);
        }
        Some((status, headers, Bytes::copy_from_slice(bytes)))
    }
}
