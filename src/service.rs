//! [`Idempotency`]: the request flow, top to bottom.
//!
//! 1. Unprotected method → pass through (no allocation, no store call, body untouched).
//! 2. Find the key: the key header (invalid → 400), else a configured key source, else the
//!    missing-key policy (pass through, 400, or derive the key from the request).
//! 3. Read the body up to the limit (over → 413) and fingerprint it.
//! 4. Claim the key atomically. Completed → replay (or 409/422 on another fingerprint); in
//!    flight → wait for it or 409; free → run the handler (`execute`); store down → 503 or,
//!    fail-open, run unprotected.

use std::{
    fmt,
    pin::pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header, request::Parts};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    body::{Chunks, RequestBody, ResponseBody},
    config::{Config, FailMode, IDEMPOTENT_REPLAYED, MissingKey, WaitMode},
    error::{BoxError, StoreError},
    execute::execute,
    expiry,
    fingerprint::Fingerprint,
    future::{Detach, ResponseFuture},
    jsonrpc,
    key::{IdempotencyKey, KeyRef},
    lease::Lease,
    observe::{AbandonedAction, Op, Outcome, RecordResult},
    problem::Problem,
    record::Record,
    recovery::Recovery,
    store::{Claim, IdempotencyStore},
};

/// Middleware that runs a request's handler at most once per idempotency key and replays the
/// first response to every retry. Made by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// The inner service receives [`RequestBody`]: the original body for requests passed
/// through, the bytes the layer read otherwise. A request that runs under a client-sent key
/// carries it as an [`IdempotencyKey`] in its extensions (to hand on to a payment provider,
/// say). Its errors pass through unchanged; the layer's own rejections are problem
/// responses. The layer needs a tokio runtime: the unfinished work of a client that went away,
/// and streamed response bodies, continue on tokio tasks.
#[derive(Clone)]
pub struct Idempotency<S, St> {
    inner: S,
    store: St,
    config: Arc<Config>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, store: St, config: Arc<Config>) -> Self {
        Self {
            inner,
            store,
            config,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, taking the middleware apart.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Where the key comes from, as far as the request head tells.
enum KeyPlan {
    Client(IdempotencyKey),
    /// A key source that reads the body; the missing-key policy applies if it finds nothing.
    FromBody,
    /// No key: derive one from the request.
    Derived,
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        if !config.protects(request.method()) {
            return ResponseFuture::pass_through(self.inner.call(request.map(RequestBody::new)));
        }
        let plan = match IdempotencyKey::from_headers(request.headers(), &config.header_name) {
            Ok(Some(key)) => KeyPlan::Client(key),
            Err(error) => return refuse(config, request, Problem::invalid_key(&error)),
            Ok(None) => {
                let from_source = config
                    .key_source
                    .as_ref()
                    .map(|source| source.extract_from_headers(request.headers()));
                match from_source {
                    Some(Some(Ok(Some(key)))) => KeyPlan::Client(key),
                    Some(Some(Err(error))) => {
                        return refuse(config, request, Problem::invalid_key(&error));
                    }
                    Some(None) => KeyPlan::FromBody,
                    Some(Some(Ok(None))) | None => match config.missing_key {
                        MissingKey::PassThrough => {
                            return ResponseFuture::pass_through(
                                self.inner.call(request.map(RequestBody::new)),
                            );
                        }
                        MissingKey::Required => {
                            let problem = Problem::missing_key(&config.header_name);
                            return refuse(config, request, problem);
                        }
                        MissingKey::Fingerprint(_) => KeyPlan::Derived,
                    },
                }
            }
        };
        // The service that `poll_ready` made ready moves into the future; this clone stays
        // behind for the next request (tower's documented pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (store, config) = (self.store.clone(), Arc::clone(config));
        let detach = Arc::new(Detach::default());
        // One span per protected request (none for those passed through).
        let span = config.observer.request_span(request.method());
        let work = protect(inner, store, config, request, plan, Arc::clone(&detach));
        ResponseFuture::protected(Box::pin(work.instrument(span)), detach)
    }
}

/// Steps 3 and 4 of the flow: read, fingerprint, claim, then replay, wait, refuse or execute.
///
/// `detach` says when the work must outlive a client that went away: from the moment a claim
/// is sent until the answer is known, and while a handler runs. Reading the body and waiting
/// for another request simply end with the client.
async fn protect<S, St, ReqB, ResB>(
    inner: S,
    store: St,
    config: Arc<Config>,
    request: Request<ReqB>,
    plan: KeyPlan,
    detach: Arc<Detach>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let mut inner = Inner::new(inner);
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts, body, config.request_body_limit).await {
        Ok(body) => body,
        // The rest of the body was not read: the connection cannot carry another request.
        Err(problem) => return Ok(close_connection(reject(&config, &problem))),
    };
    let fingerprint = config.fingerprint_of(&parts, &body);

    let key = match plan {
        KeyPlan::Client(key) => Some(key),
        KeyPlan::Derived => None,
        KeyPlan::FromBody => {
            let source = config.key_source.as_ref();
            match source
                .map(|source| source.extract(&parts, &body))
                .transpose()
            {
                Ok(found) => found.flatten(),
                Err(error) => return Ok(reject(&config, &Problem::invalid_key(&error))),
            }
        }
    };
    let (key_ref, ttl) = match (&key, config.missing_key) {
        (Some(key), _) => (KeyRef::Client(key), config.ttl),
        (None, MissingKey::Fingerprint(window)) => (KeyRef::Derived(&fingerprint), window),
        (None, MissingKey::Required) => {
            return Ok(reject(&config, &Problem::missing_key(&config.header_name)));
        }
        (None, MissingKey::PassThrough) => return call_unprotected(inner, parts, body).await,
    };
    let storage_key = config.storage_key(&parts, key_ref);
    let observer = &config.observer;
    observer.key(&storage_key);

    let wait_until = match config.wait_mode {
        WaitMode::Wait(timeout) => Some(Instant::now() + timeout),
        WaitMode::Reject => None,
    };
    let mut waited = false;
    let mut wait_clock = observer.wait_clock();
    // A take-over's answer, to be handled as a claim's.
    let mut taken_over = None;
    // When the claim (or take-over) that may be ours was sent: its lease counts from then.
    let mut claimed_at = Instant::now();
    loop {
        // A claim on its way may land: from here, a client that leaves does not stop the
        // work, or the claim would be left behind for its whole lease.
        detach.finish_on_drop(true);
        let claim = match taken_over.take() {
            Some(claim) => claim,
            None => {
                claimed_at = Instant::now();
                let claim = store.claim(&storage_key, &fingerprint, config.lease);
                observer.store_op(St::NAME, Op::Claim, claim).await
            }
        };
        if !matches!(claim, Ok(Claim::Acquired(_))) {
            detach.finish_on_drop(false);
            if detach.client_gone() {
                return Ok(nobody_listens());
            }
        }
        match claim {
            Ok(Claim::Acquired(token)) => {
                let lease = Lease::new(store, storage_key, token, config.lease, claimed_at)
                    .observed(observer.clone());
                if detach.client_gone() {
                    // Nobody is left to answer: the handler is not started for nobody.
                    lease.release(RecordResult::ClientGone).await;
                    return Ok(nobody_listens());
                }
                let inner = if inner.is_ready() {
                    inner.into_service()
                } else {
                    // Waiting for the inner service ends with the client; the lease's drop
                    // guard then gives the key back.
                    detach.finish_on_drop(false);
                    let ready = inner.ready().await;
                    detach.finish_on_drop(true);
                    match ready {
                        Ok(inner) => inner,
                        Err(error) => {
                            lease.release(RecordResult::HandlerError).await;
                            return Err(error);
                        }
                    }
                };
                observer.outcome(Outcome::Executed);
                drop(wait_clock);
                let mut request = Request::from_parts(parts, RequestBody::full(body));
                if let Some(key) = key {
                    request.extensions_mut().insert(key);
                }
                // Boxed: the handler's state is large, and replays need not carry it.
                let execution = execute(inner, request, lease, fingerprint, ttl, &config);
                let response = Box::pin(execution).await;
                return response.map(|response| expiry::on_first_execution(&config, ttl, response));
            }
            Ok(Claim::Completed { record, expires_in }) => {
                let retry = Retry {
                    body: &body,
                    expires_in,
                };
                return Ok(replay(&config, record, &fingerprint, waited, retry));
            }
            Ok(Claim::Abandoned {
                token,
                fingerprint: held,
            }) => {
                if held != fingerprint {
                    let problem = Problem::key_reused(config.mismatch_status);
                    return Ok(reject(&config, &problem));
                }
                if config.on_abandoned.decide(&parts) == Recovery::OutcomeUnknown {
                    observer.abandoned(AbandonedAction::OutcomeUnknown);
                    return Ok(reject(&config, &Problem::outcome_unknown()));
                }
                observer.abandoned(AbandonedAction::RunAgain);
                detach.finish_on_drop(true);
                claimed_at = Instant::now();
                let take_over = store.take_over(&storage_key, token, &fingerprint, config.lease);
                taken_over = Some(observer.store_op(St::NAME, Op::TakeOver, take_over).await);
            }
            Ok(Claim::InFlight { fingerprint: held }) => {
                if held != fingerprint {
                    return Ok(reject(
                        &config,
                        &Problem::key_reused(config.mismatch_status),
                    ));
                }
                let remaining =
                    wait_until.and_then(|until| until.checked_duration_since(Instant::now()));
                let Some(remaining) = remaining.filter(|r| !r.is_zero()) else {
                    return Ok(reject(&config, &Problem::in_flight()));
                };
                // Whatever readiness the inner service holds (a concurrency permit, a buffer
                // slot) is not held through the wait.
                inner.give_back_readiness();
                waited = true;
                wait_clock.start();
                let wait = store.wait(&storage_key, remaining);
                if let Err(error) = observer.store_op(St::NAME, Op::Wait, wait).await {
                    return store_failed(&config, error, inner, parts, body, &detach).await;
                }
            }
            Err(error) => {
                return store_failed(&config, error, inner, parts, body, &detach).await;
            }
        }
    }
}

/// The inner service of a protected request, and whether it still holds the readiness that
/// `poll_ready` gave it.
struct Inner<S> {
    service: S,
    ready: bool,
}

impl<S: Clone> Inner<S> {
    fn new(service: S) -> Self {
        Self {
            service,
            ready: true,
        }
    }

    fn is_ready(&self) -> bool {
        self.ready
    }

    fn into_service(self) -> S {
        self.service
    }

    /// Drops the ready service for a clone without its readiness: what a ready service holds
    /// (a `ConcurrencyLimit` permit, a `Buffer` slot) goes back for others to use.
    fn give_back_readiness(&mut self) {
        if self.ready {
            self.service = self.service.clone();
            self.ready = false;
        }
    }

    /// The service, made ready again if it gave its readiness back.
    async fn ready<R>(mut self) -> Result<S, S::Error>
    where
        S: Service<R>,
    {
        if !self.ready {
            std::future::poll_fn(|cx| self.service.poll_ready(cx)).await?;
        }
        Ok(self.service)
    }
}

/// The response of work that finished after its client went away: nobody reads it.
fn nobody_listens<B>() -> Response<ResponseBody<B>> {
    Response::new(ResponseBody::full(Bytes::new(), None))
}

/// Reads the body whole, refusing it past `limit` (by its declared length first, so an
/// oversized upload is refused before it is read).
async fn read_body<B>(parts: &Parts, body: B, limit: usize) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) || body.size_hint().lower() > limit as u64 {
        return Err(Problem::body_too_large(limit));
    }
    read_limited(body, limit).await
}

/// Reads a body whole, refusing it past `limit`.
async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
{
    let mut body = pin!(body);
    let mut read = Chunks::default();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(frame) = frame else {
            return Err(Problem::unreadable_body());
        };
        if let Ok(data) = frame.into_data() {
            if read.len + data.len() > limit {
                return Err(Problem::body_too_large(limit));
            }
            read.push(data);
        }
    }
    Ok(read.concat())
}

/// What a replay answers besides the record: the retry's body (a JSON-RPC retry gets its own
/// `id` back) and how long the record has left.
struct Retry<'a> {
    body: &'a Bytes,
    expires_in: Option<std::time::Duration>,
}

/// A completed key: the replay, or a problem if the payload differs or nothing was kept.
fn replay<B>(
    config: &Config,
    record: Record,
    fingerprint: &Fingerprint,
    waited: bool,
    retry: Retry<'_>,
) -> Response<ResponseBody<B>> {
    if record.fingerprint() != fingerprint {
        return reject(config, &Problem::key_reused(config.mismatch_status));
    }
    let status = record.status();
    let extra_headers = 1 + usize::from(config.expiry_header.is_some());
    let Some(mut parts) = record.into_replay_parts(extra_headers) else {
        return reject(
            config,
            &Problem::not_replayable(status, config.response_body_limit),
        );
    };
    config.observer.outcome(if waited {
        Outcome::Waited
    } else {
        Outcome::Replayed
    });
    if config.fingerprint.json_rpc {
        parts.body = jsonrpc::with_retry_id(parts.body, retry.body, &mut parts.headers);
    }
    expiry::on_replay(config, &mut parts.headers, retry.expires_in);
    let mut response = Response::new(ResponseBody::full(parts.body, parts.trailers));
    *response.status_mut() = parts.status;
    *response.headers_mut() = parts.headers;
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// The store failed: 503 when failing closed; when failing open, run the handler unprotected.
async fn store_failed<S, ReqB, ResB>(
    config: &Config,
    error: StoreError,
    inner: Inner<S>,
    parts: Parts,
    body: Bytes,
    detach: &Detach,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone,
{
    match config.fail_mode {
        FailMode::Closed => {
            tracing::warn!(%error, "refusing the request (fail-closed)");
            Ok(reject(config, &Problem::store_unavailable()))
        }
        FailMode::Open => {
            if detach.client_gone() {
                return Ok(nobody_listens());
            }
            tracing::warn!(%error, "executing unprotected (fail-open)");
            config.observer.outcome(Outcome::FailOpen);
            call_unprotected(inner, parts, body).await
        }
    }
}

async fn call_unprotected<S, ReqB, ResB>(
    inner: Inner<S>,
    parts: Parts,
    body: Bytes,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone,
{
    let mut inner = inner.ready().await?;
    let response = inner
        .call(Request::from_parts(parts, RequestBody::full(body)))
        .await?;
    Ok(response.map(ResponseBody::inner))
}

/// Refuses a request from its head alone, once its body is read and discarded (up to the
/// limit): hyper closes a keep-alive connection whose request body was left unread, taking
/// with it any request the client already sent behind this one.
fn refuse<F, ReqB, ResB, E>(
    config: &Arc<Config>,
    request: Request<ReqB>,
    problem: Problem,
) -> ResponseFuture<F, ResB, E>
where
    E: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Send + 'static,
{
    let span = config.observer.request_span(request.method());
    let _entered = span.enter();
    if request.body().is_end_stream() {
        return ResponseFuture::ready(reject(config, &problem));
    }
    let config = Arc::clone(config);
    let drain = async move {
        let limit = config.request_body_limit;
        let drained = read_limited(request.into_body(), limit).await.is_ok();
        let response = reject(&config, &problem);
        Ok(if drained {
            response
        } else {
            close_connection(response)
        })
    };
    // Nothing to finish if the client leaves: the default `Detach` ends the work with it.
    ResponseFuture::protected(Box::pin(drain.in_current_span()), Arc::default())
}

/// Tells the client (and hyper) that this connection ends with this response.
fn close_connection<B>(mut response: Response<B>) -> Response<B> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A response the layer produces itself.
fn reject<B>(config: &Config, problem: &Problem) -> Response<ResponseBody<B>> {
    config.observer.outcome(Outcome::of_problem(problem.kind()));
    config
        .render(problem)
        .map(|body| ResponseBody::full(body, None))
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}
