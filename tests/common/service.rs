//! Helpers for the service-level tests: a counting handler, scripted bodies, request
//! builders, response collection and problem assertions.

use std::{
    collections::VecDeque,
    convert::Infallible,
    fmt,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use tokio::sync::watch;
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    BoxError, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, Idempotency, IdempotencyLayer,
    IdempotencyStore, PeerAddr, Problem, ProblemKind,
};

/// The longest any single step of a test may take before it is declared hung.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The response body every test handler returns.
///
/// Its error is a concrete type rather than `BoxError`: a boxed `dyn Error` error type makes
/// the compiler fail to prove the layer's futures `Send` (a higher-ranked lifetime bug).
pub type ResBody = UnsyncBoxBody<Bytes, BodyError>;

/// The error of test bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub &'static str);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyError {}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type HandlerFn = Arc<dyn Fn(Request<Bytes>) -> BoxFuture<Response<ResBody>> + Send + Sync>;

/// The inner service: counts its calls, reads the request body whole, then runs the closure.
#[derive(Clone)]
pub struct Handler {
    calls: Arc<AtomicUsize>,
    run: HandlerFn,
}

impl Handler {
    /// A handler running `f` on each request (with its body read), counting calls.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Request<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<ResBody>> + Send + 'static,
    {
        Self {
            calls: Arc::new(AtomicUsize::new(0)),
            run: Arc::new(move |request| Box::pin(f(request))),
        }
    }

    /// A handler answering `201 Created` with `execution #N` (N counts from 1), so a replay
    /// can be told from a second execution by its body.
    pub fn counting() -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let mut handler = Self::new(move |_request| {
            let n = seen.load(Ordering::SeqCst);
            async move { created(format!("execution #{n}")) }
        });
        handler.calls = calls;
        handler
    }

    /// Like [`counting`](Self::counting), but each execution first sleeps `delay`.
    pub fn sleeping(delay: Duration) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let mut handler = Self::new(move |_request| {
            let n = seen.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                created(format!("execution #{n}"))
            }
        });
        handler.calls = calls;
        handler
    }

    /// Like [`counting`](Self::counting), but each execution waits for `gate` to open.
    pub fn gated(gate: &Gate) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let gate = gate.clone();
        let mut handler = Self::new(move |_request| {
            let n = seen.load(Ordering::SeqCst);
            let gate = gate.clone();
            async move {
                gate.pass().await;
                created(format!("execution #{n}"))
            }
        });
        handler.calls = calls;
        handler
    }

    /// How many times the handler has been called so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The shared call counter, for closures that branch on it.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.calls)
    }

    /// Builds a handler whose closure also sees the counter (the value after this call).
    pub fn with_counter<F, Fut>(f: F) -> Self
    where
        F: Fn(usize, Request<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<ResBody>> + Send + 'static,
    {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let mut handler = Self::new(move |request| f(seen.load(Ordering::SeqCst), request));
        handler.calls = calls;
        handler
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("calls", &self.calls())
            .finish()
    }
}

impl<B> tower::Service<Request<B>> for Handler
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: fmt::Debug,
{
    type Response = Response<ResBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ResBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let run = Arc::clone(&self.run);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .expect("the handler reads the request body")
                .to_bytes();
            Ok(run(Request::from_parts(parts, body)).await)
        })
    }
}

/// The layer applied to a handler: the service under test.
pub type Svc<St> = Idempotency<Handler, St>;

/// Applies `layer` to `handler`.
pub fn serve<St: IdempotencyStore>(layer: &IdempotencyLayer<St>, handler: &Handler) -> Svc<St> {
    layer.layer(handler.clone())
}

/// A gate a handler waits at until the test opens it.
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub async fn pass(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// One step of a [`Scripted`] body.
#[derive(Debug, Clone)]
pub enum Step {
    /// A data frame.
    Data(Bytes),
    /// Return `Pending` once (waking at once): forces a streaming consumer to wait.
    Yield,
    /// Sleep before the next step.
    Sleep(Duration),
    /// A trailers frame.
    Trailers(HeaderMap),
    /// A body error.
    Error(&'static str),
    /// Panic inside `poll_frame`.
    Panic(&'static str),
}

pub fn data(bytes: impl Into<Bytes>) -> Step {
    Step::Data(bytes.into())
}

/// A body that plays a script of frames, pauses, errors and panics. Its size is unknown.
pub struct Scripted {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Scripted {
    pub fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self {
            steps: steps.into_iter().collect(),
            sleep: None,
        }
    }
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match self.steps.pop_front() {
                None => return Poll::Ready(None),
                Some(Step::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Some(Step::Yield) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(Step::Sleep(delay)) => self.sleep = Some(Box::pin(tokio::time::sleep(delay))),
                Some(Step::Trailers(map)) => return Poll::Ready(Some(Ok(Frame::trailers(map)))),
                Some(Step::Error(message)) => return Poll::Ready(Some(Err(BodyError(message)))),
                Some(Step::Panic(message)) => panic!("{message}"),
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A whole response body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ResBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A scripted response body.
pub fn scripted(steps: impl IntoIterator<Item = Step>) -> ResBody {
    Scripted::new(steps).boxed_unsync()
}

/// `201 Created` with `body`.
pub fn created(body: impl Into<Bytes>) -> Response<ResBody> {
    respond(StatusCode::CREATED, full(body))
}

pub fn respond(status: StatusCode, body: ResBody) -> Response<ResBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

/// A request body of `bytes`.
pub fn body(bytes: impl Into<Bytes>) -> Full<Bytes> {
    Full::new(bytes.into())
}

/// `POST path` with `Idempotency-Key: key` and `payload`.
pub fn keyed_post(path: &str, key: &str, payload: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(IDEMPOTENCY_KEY, key)
        .body(body(payload.to_owned()))
        .expect("a valid request")
}

/// `POST path` without a key.
pub fn post(path: &str, payload: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .body(body(payload.to_owned()))
        .expect("a valid request")
}

/// A response, read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    /// The kind the layer put into the extensions of a response it produced itself.
    pub problem: Option<ProblemKind>,
    /// The whole problem, beside its kind in the extensions.
    pub details: Option<Problem>,
}

impl Reply {
    /// Reads `response` whole; panics if its body fails or never ends.
    pub async fn read<B>(response: Response<B>) -> Self
    where
        B: Body<Data = Bytes>,
        B::Error: fmt::Debug,
    {
        let (parts, body) = response.into_parts();
        let collected = within(body.collect())
            .await
            .expect("the response body is read without error");
        let problem = parts.extensions.get::<ProblemKind>().copied();
        let details = parts.extensions.get::<Problem>().cloned();
        assert_eq!(
            problem,
            details.as_ref().map(Problem::kind),
            "a problem's kind and the problem itself come together"
        );
        Self {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
            problem,
            details,
        }
    }

    /// Whether the response carries `Idempotent-Replayed: true`.
    pub fn replayed(&self) -> bool {
        match self.headers.get_all(IDEMPOTENT_REPLAYED).iter().count() {
            0 => false,
            1 => {
                assert_eq!(self.headers[IDEMPOTENT_REPLAYED], "true");
                true
            }
            n => panic!("Idempotent-Replayed sent {n} times"),
        }
    }

    /// The headers in order, without `Idempotent-Replayed`.
    pub fn header_list(&self) -> Vec<(String, Vec<u8>)> {
        header_list(&self.headers)
            .into_iter()
            .filter(|(name, _)| name != IDEMPOTENT_REPLAYED.as_str())
            .collect()
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }

    /// Asserts that this is the layer's own `kind` problem, rendered by default.
    #[track_caller]
    pub fn assert_problem(&self, kind: ProblemKind, status: StatusCode) {
        assert_eq!(self.status, status, "status of {self:?}");
        assert_eq!(self.problem, Some(kind), "kind in the extensions");
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(self.headers[header::CACHE_CONTROL], "no-store");
        assert!(!self.replayed(), "a problem is never a replay");
        let json: serde_json::Value =
            serde_json::from_slice(&self.body).expect("a problem body is JSON");
        assert_eq!(json["type"], kind.type_uri());
        assert_eq!(json["title"], kind.title());
        assert_eq!(json["status"], status.as_u16());
        assert!(json["detail"].is_string());
        // The problem in the extensions is the one the body was written from.
        let details = self
            .details
            .as_ref()
            .expect("the problem in the extensions");
        assert_eq!(details.status(), status);
        assert_eq!(self.text(), details.to_json());
        assert_eq!(
            self.headers.contains_key(header::RETRY_AFTER),
            details.retry_after().is_some(),
            "Retry-After is sent exactly when the problem has one"
        );
    }

    /// Asserts a `Retry-After` of a positive whole number of seconds.
    #[track_caller]
    pub fn assert_retry_after(&self) {
        let value = self
            .headers
            .get(header::RETRY_AFTER)
            .unwrap_or_else(|| panic!("Retry-After expected on {self:?}"));
        let seconds: u64 = value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("Retry-After is delay-seconds");
        assert!(seconds >= 1, "Retry-After: {seconds}");
    }
}

/// The headers in order, repeats kept, as (name, value bytes).
pub fn header_list(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// Sends `request` through (a clone of) `svc` and reads the response whole.
///
/// The future clones `svc` at once and owns all it needs, so it can be spawned as it is.
pub fn send<St, B>(svc: &Svc<St>, request: Request<B>) -> BoxFuture<Reply>
where
    St: IdempotencyStore,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let response = send_raw(svc, request);
    Box::pin(async move { Reply::read(response.await).await })
}

/// The peer every request sent with [`send`] comes from, unless it names its own: the
/// tests stand for a server that gives the layer the peer's address (axum's `ConnectInfo`).
pub const TEST_PEER: PeerAddr = PeerAddr(IpAddr::V4(Ipv4Addr::LOCALHOST));

/// Sends `request` through (a clone of) `svc` and returns the response unread. A request
/// without a [`PeerAddr`] comes from [`TEST_PEER`].
pub fn send_raw<St, B>(svc: &Svc<St>, mut request: Request<B>) -> BoxFuture<RawResponse>
where
    St: IdempotencyStore,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if request.extensions().get::<PeerAddr>().is_none() {
        request.extensions_mut().insert(TEST_PEER);
    }
    send_unaddressed(svc, request)
}

/// Sends `request` as it is, from no known peer, and returns the response unread.
pub fn send_unaddressed<St, B>(svc: &Svc<St>, request: Request<B>) -> BoxFuture<RawResponse>
where
    St: IdempotencyStore,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let svc = svc.clone();
    Box::pin(async move {
        match within(svc.oneshot(request)).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    })
}

/// A response of the service under test, unread.
pub type RawResponse = Response<tower_idempotency::ResponseBody<ResBody>>;

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("the test step finished in time")
}

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A header value from raw bytes.
pub fn value(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).expect("a valid header value")
}
