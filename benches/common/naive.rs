//! Naive idempotency middlewares, **baselines for measurement only: do not copy them.**
//!
//! They are what an idempotency middleware often looks like when written in a few lines, as
//! peers do: look the raw `Idempotency-Key` up, replay on a hit, otherwise run the handler and
//! store its buffered response. The load script (`examples/bench_server.rs`) and
//! `benches/alloc.rs` measure them beside the layer so that its cost reads against "a
//! middleware that only caches" rather than against nothing. They have none of what makes the
//! layer correct:
//! - no claim: concurrent duplicates all run the handler (a double click charges twice);
//! - no fingerprint: the same key with another body replays the first response;
//! - no scope: the key alone addresses the record, whoever sends it;
//! - whatever the handler answered (a `500` included) is stored, a panic or a disconnect
//!   stores nothing, and a Redis error (or stored bytes it cannot read) is answered `503`;
//! - only `Idempotent-Replayed`, status, headers and body survive (no trailers).
//!
//! Requests that are not a `POST` with a key pass through untouched (no cache lookup). One
//! tower [`Layer`] over any service, so that the load script's axum server and the benchmarks'
//! bare handler run the same code.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use tower::{Layer, Service};

const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const BODY_LIMIT: usize = 1024 * 1024;
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A stored response: status, headers, body.
pub type Stored = (StatusCode, HeaderMap, Bytes);

/// Where the responses are kept.
pub trait Cache: Clone + Send + Sync + 'static {
    /// The response stored under `key`; `Err` if the cache cannot be reached or its bytes
    /// cannot be read.
    fn get(&mut self, key: &str) -> impl Future<Output = Result<Option<Stored>, ()>> + Send;
    /// Stores `stored` under `key`.
    fn put(&mut self, key: String, stored: Stored) -> impl Future<Output = Result<(), ()>> + Send;
}

/// The naive middleware over `C`.
#[derive(Clone)]
pub struct NaiveLayer<C>(pub C);

impl<S, C: Clone> Layer<S> for NaiveLayer<C> {
    type Service = Naive<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Naive {
            inner,
            cache: self.0.clone(),
        }
    }
}

/// See [`NaiveLayer`].
#[derive(Clone)]
pub struct Naive<S, C> {
    inner: S,
    cache: C,
}

/// What the naive middleware answers: the inner body passed through, or a buffered one.
pub type NaiveBody<B> = Either<B, Full<Bytes>>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, C, ReqB, ResB> Service<Request<ReqB>> for Naive<S, C>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    C: Cache,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<NaiveBody<ResB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let Some(key) = key(&request) else {
            let passed = self.inner.call(request);
            return Box::pin(async move { Ok(passed.await?.map(Either::Left)) });
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let mut cache = self.cache.clone();
        Box::pin(async move {
            match cache.get(&key).await {
                Ok(Some(stored)) => return Ok(replay(stored)),
                Ok(None) => {}
                Err(()) => return Ok(status(StatusCode::SERVICE_UNAVAILABLE)),
            }
            let (parts, body) = inner.call(request).await?.into_parts();
            let Ok(body) = Limited::new(body, BODY_LIMIT).collect().await else {
                return Ok(status(StatusCode::INTERNAL_SERVER_ERROR));
            };
            let body = body.to_bytes();
            let stored = (parts.status, parts.headers.clone(), body.clone());
            if cache.put(key, stored).await.is_err() {
                return Ok(status(StatusCode::SERVICE_UNAVAILABLE));
            }
            Ok(Response::from_parts(parts, Either::Right(Full::new(body))))
        })
    }
}

/// The raw key of a `POST` that has one (as a string, the way naive code reads it).
fn key<B>(request: &Request<B>) -> Option<String> {
    if request.method() != Method::POST {
        return None;
    }
    let value = request.headers().get("idempotency-key")?;
    value.to_str().ok().map(str::to_owned)
}

fn replay<B>((status, mut headers, body): Stored) -> Response<NaiveBody<B>> {
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn status<B>(status: StatusCode) -> Response<NaiveBody<B>> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = status;
    response
}

/// A `moka::sync::Cache` of responses by raw key (moka's defaults, TinyLFU; `capacity` bytes
/// weighed as body length + 200; 24 h to live).
#[cfg(feature = "moka")]
#[derive(Clone)]
pub struct Moka(moka::sync::Cache<String, Stored>);

#[cfg(feature = "moka")]
impl Moka {
    /// A cache of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_key: &String, (_, _, body): &Stored| {
                u32::try_from(body.len() + 200).unwrap_or(u32::MAX)
            })
            .time_to_live(TTL)
            .build();
        Self(cache)
    }
}

#[cfg(feature = "moka")]
impl Cache for Moka {
    async fn get(&mut self, key: &str) -> Result<Option<Stored>, ()> {
        Ok(self.0.get(key))
    }

    async fn put(&mut self, key: String, stored: Stored) -> Result<(), ()> {
        self.0.insert(key, stored);
        Ok(())
    }
}

/// The same over Redis through a `ConnectionManager`: a replay is one `GET`, a first
/// execution a `GET` (miss) then a `SET … PX` (two round trips).
#[cfg(feature = "redis")]
#[derive(Clone)]
pub struct Redis<C = redis::aio::ConnectionManager>(pub C);

#[cfg(feature = "redis")]
impl<C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static> Cache for Redis<C> {
    async fn get(&mut self, key: &str) -> Result<Option<Stored>, ()> {
        let found = redis::cmd("GET")
            .arg(format!("naive-idem:{key}"))
            .query_async::<Option<Vec<u8>>>(&mut self.0)
            .await
            .map_err(drop)?;
        found.map(|bytes| decode(&bytes).ok_or(())).transpose()
    }

    async fn put(&mut self, key: String, stored: Stored) -> Result<(), ()> {
        redis::cmd("SET")
            .arg(format!("naive-idem:{key}"))
            .arg(encode(&stored))
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .query_async::<()>(&mut self.0)
            .await
            .map_err(drop)
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
