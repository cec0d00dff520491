//! What the benchmarks share: the cases, the requests each sends, the services compared
//! (the bare handler and the layer over it on each store), and a way to drive them.
#![allow(dead_code)]

pub mod handler;
pub mod naive;
// The tests' helper: a `redis-server` of our own on a free loopback port, stopped on drop.
#[cfg(feature = "redis")]
#[path = "../../tests/common/redis_server.rs"]
pub mod redis_server;

use std::{convert::Infallible, fmt};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::task::JoinSet;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore, MissingKey,
    RequestBody, ResponseBody,
};

/// The body of every request the benchmarks send.
pub type ReqBody = Full<Bytes>;

/// How many requests a burst sends at once, all with the same key.
pub const BURST: usize = 64;

/// What a benchmark sends, and how the layer is set up for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// `GET`: not a protected method.
    GetPassThrough,
    /// `POST` without a key, the layer set to `MissingKey::PassThrough`.
    PostPassThrough,
    /// `POST` with a fresh key each time: the handler runs under a claim.
    FirstExecution,
    /// `POST` with the same key and body each time: replayed from the store.
    Replay,
    /// `POST` without a key and a fresh body each time: a derived key, executed.
    DerivedFirst,
    /// [`BURST`] concurrent `POST`s with one fresh key: one execution, the others wait and
    /// get the replay.
    Burst,
}

impl Case {
    pub const ALL: [Case; 6] = [
        Case::GetPassThrough,
        Case::PostPassThrough,
        Case::FirstExecution,
        Case::Replay,
        Case::DerivedFirst,
        Case::Burst,
    ];

    /// Its name in reports (and criterion's group name).
    pub fn name(self) -> &'static str {
        match self {
            Case::GetPassThrough => "pass_through_get",
            Case::PostPassThrough => "pass_through_post",
            Case::FirstExecution => "first_execution",
            Case::Replay => "replay",
            Case::DerivedFirst => "derived_first_execution",
            Case::Burst => "burst_64_same_key",
        }
    }

    /// Requests sent per iteration.
    pub fn requests(self) -> usize {
        if self == Case::Burst { BURST } else { 1 }
    }

    /// The layer this case runs under, over `store`.
    pub fn layer<St: IdempotencyStore>(self, store: St) -> IdempotencyLayer<St> {
        let layer = IdempotencyLayer::new(store);
        match self {
            Case::PostPassThrough => layer.with_missing_key(MissingKey::PassThrough),
            _ => layer,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The bare handler as a service.
pub fn bare() -> impl Service<
    Request<ReqBody>,
    Response = Response<ReqBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(handler::handle::<ReqBody>)
}

/// The handler under `case`'s layer over `store`.
pub fn layered<St: IdempotencyStore>(
    case: Case,
    store: St,
) -> impl Service<
    Request<ReqBody>,
    Response = Response<ResponseBody<ReqBody>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    case.layer(store)
        .layer(service_fn(handler::handle::<RequestBody<ReqBody>>))
}

/// Makes the requests of each iteration: fresh keys and bodies where the case wants them,
/// unique to this process run (so a Redis that outlived a run never replays them).
#[derive(Debug)]
pub struct Requests {
    run: u64,
    next: u64,
}

impl Default for Requests {
    fn default() -> Self {
        Self::new()
    }
}

impl Requests {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            run: u64::from(std::process::id()) << 32 | u64::from(nanos),
            next: 0,
        }
    }

    fn key(&mut self) -> HeaderValue {
        self.next += 1;
        let (run, n) = (self.run, self.next);
        // The shape of a UUID, as clients send.
        let key = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            run >> 32,
            run & 0xffff,
            (run >> 16) & 0xfff,
            n >> 48 & 0xfff,
            n & 0xffff_ffff_ffff
        );
        HeaderValue::try_from(key).expect("a visible-ASCII key")
    }

    /// The requests of one iteration of `case`.
    pub fn next(&mut self, case: Case) -> Vec<Request<ReqBody>> {
        match case {
            Case::GetPassThrough => vec![request(Method::GET, Bytes::new(), None)],
            Case::PostPassThrough => vec![request(Method::POST, handler::charge_request(0), None)],
            Case::FirstExecution => {
                let key = self.key();
                vec![request(Method::POST, handler::charge_request(0), Some(key))]
            }
            Case::Replay => {
                let key = HeaderValue::from_static("8e03978e-40d5-43e8-bc93-6894a57f9324");
                vec![request(Method::POST, handler::charge_request(0), Some(key))]
            }
            Case::DerivedFirst => {
                self.next += 1;
                let body = handler::charge_request(self.run ^ self.next << 20);
                vec![request(Method::POST, body, None)]
            }
            Case::Burst => {
                let key = self.key();
                (0..BURST)
                    .map(|_| request(Method::POST, handler::charge_request(0), Some(key.clone())))
                    .collect()
            }
        }
    }
}

/// A request with the head a typical API client sends.
pub fn request(method: Method, body: Bytes, key: Option<HeaderValue>) -> Request<ReqBody> {
    let uri = if method == Method::GET {
        "/v1/charges/ch_1"
    } else {
        "/v1/charges"
    };
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "api.example.com")
        .header(header::USER_AGENT, "bench-client/1.0")
        .header(header::ACCEPT, "application/json")
        .header(
            header::AUTHORIZATION,
            "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc",
        );
    if !body.is_empty() {
        builder = builder
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len());
    }
    if let Some(key) = key {
        builder = builder.header(IDEMPOTENCY_KEY, key);
    }
    builder.body(Full::new(body)).expect("a valid request")
}

/// What came back: the status, whether it was a replay, and the body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Bytes,
}

/// Sends one request through `service` (a clone, as a server makes per request) and reads
/// the response body to its end (as a client does).
pub async fn call<S, B>(service: S, request: Request<ReqBody>) -> Answer
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: fmt::Debug,
{
    let response = service.oneshot(request).await.expect("the service answers");
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a readable body")
        .to_bytes();
    Answer {
        status,
        replayed,
        body,
    }
}

/// Sends one iteration's requests: one at a time, or a burst of concurrent ones (each on its
/// own task, as a server runs each connection).
pub async fn run<S, B>(service: &S, requests: Vec<Request<ReqBody>>) -> Vec<Answer>
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: fmt::Debug,
{
    if requests.len() == 1 {
        let mut answers = Vec::with_capacity(1);
        for request in requests {
            answers.push(call(service.clone(), request).await);
        }
        return answers;
    }
    let mut tasks = JoinSet::new();
    for request in requests {
        tasks.spawn(call(service.clone(), request));
    }
    tasks.join_all().await
}

/// Checks that an iteration took the path its case names (not a timing check: a benchmark
/// of the wrong path would measure nothing useful).
pub fn check(case: Case, layered: bool, answers: &[Answer]) {
    let expected = if case == Case::GetPassThrough {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    for answer in answers {
        assert_eq!(
            answer.status,
            expected,
            "{case}: unexpected answer {:?}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let replays = answers.iter().filter(|a| a.replayed).count();
    let expected_replays = match (case, layered) {
        (Case::Replay, true) => 1,
        (Case::Burst, true) => BURST - 1,
        _ => 0,
    };
    assert_eq!(
        replays, expected_replays,
        "{case}: replays in one iteration"
    );
}

/// A `redis-server` of the benchmark's own, or `None` (with a note on standard error) when
/// `redis-server` is not installed: the Redis rows are then left out, not failed.
#[cfg(feature = "redis")]
pub fn redis_server() -> Option<redis_server::RedisServer> {
    match redis_server::installed() {
        Ok(()) => Some(redis_server::RedisServer::start()),
        Err(tool) => {
            eprintln!("skipping the Redis measurements: `{tool}` is not installed");
            None
        }
    }
}

/// [`redis_server`] and a `RedisStore` connected to it.
#[cfg(feature = "redis")]
pub fn redis_store(
    runtime: &tokio::runtime::Runtime,
) -> Option<(redis_server::RedisServer, tower_idempotency::RedisStore)> {
    let server = redis_server()?;
    match runtime.block_on(tower_idempotency::RedisStore::connect(&server.url())) {
        Ok(store) => Some((server, store)),
        Err(error) => {
            eprintln!("skipping the Redis measurements: {error}");
            None
        }
    }
}
