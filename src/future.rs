//! [`ResponseFuture`] and the flow of one protected request, as a state machine.
//!
//! ```text
//!  ReadBody ──► Claim ──► Completed ─────────────────────────► replay (or 409/422)
//!    │  │        ▲  │ ──► InFlight ──► Wait ──┐  (or 409)
//!    │  │        └──┼─────────────────────────┘
//!    │  │           │ ──► Abandoned ──► take-over (back to Claim), or 409 outcome unknown
//!    │  │           │ ──► store failed ──► 503, or fail-open: Ready ─► Run, unprotected
//!    │  │           └──► Acquired(lease) ──► Ready ──► Run ──► Finish ──► response
//!    │  └─► 400/413 (`reject`)              (the lease renewed while Run, stored or
//!    └─► no key, pass-through: Ready ─► Run, unprotected         released by Finish)
//! ```
//!
//! - **ReadBody**: the body is read whole, up to the limit, then fingerprinted and keyed.
//! - **Claim**: a claim (or a take-over of an abandoned claim) is on its way to the store.
//! - **Wait**: another request holds the key; the store wakes us when it ends.
//! - **Ready**: the key is ours ([`Lease`]); the inner service is made ready again if it gave
//!   its readiness back to wait (a `ConcurrencyLimit` permit is never held across a wait).
//! - **Run**: the handler runs, its lease renewed beside it; what its body has ready is then
//!   taken ([`capture`](crate::capture)): a whole body's record is stored before the response
//!   goes out, a streamed one's by a task of its own.
//! - **Finish**: the record is stored (or the key released) before the response is answered.
//!
//! The lease is a field of the states that hold the claim, as tower's concurrency permit is a
//! field of its future: every path that does not complete it gives it back. A client that
//! goes away while a claim is on its way, a handler runs or a record is being stored leaves
//! the flow to finish in a task of its own; in any other state the flow simply ends with it.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header, request::Parts};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;
use tracing::{Instrument, Span};

use crate::{
    body::{Chunks, RequestBody, ResponseBody},
    capture::{self, Ran, RecordOf},
    catch_unwind::{self, CatchUnwind},
    config::{Config, FailMode, MissingKey, WaitMode},
    error::{BoxError, StoreError},
    expiry,
    fingerprint::Fingerprint,
    key::{IdempotencyKey, KeyRef, StorageKey},
    lease::{Lease, Renewal},
    observe::{AbandonedAction, Op, Outcome, RecordResult, WaitClock},
    problem::Problem,
    record::Record,
    recovery::Recovery,
    replay::{Retry, replay},
    store::{Claim, IdempotencyStore},
    stream,
};

/// What a protected request answers.
type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

/// A store operation on its way (boxed: a store's futures borrow the store and the key).
type StoreOp<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Storing a record or releasing a key: never fails from the flow's point of view (the lease
/// handles what a failure means).
type LeaseOp = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Requests the layer lets through poll the inner future in place (no allocation); a
    /// response the layer knows at once is ready in place; a protected request runs as one
    /// boxed state machine.
    ///
    /// Dropping this future (the client went away) does not cancel a protected request once
    /// it has sent its claim: its unfinished work moves to a task of its own, so a handler
    /// that started finishes and its response is stored for the retry, and a claim on its way
    /// to the store is never left behind (the handler of a claim that comes back after the
    /// client left is not started: the key is released). Before that, and while it waits for
    /// another request with its key, a dropped request simply ends.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        PassThrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Protected { work: Detached<B, E> },
        Refused { drain: Pin<Box<dyn Future<Output = Response<ResponseBody<B>>> + Send>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn pass_through(future: F) -> Self {
        Self {
            kind: Kind::PassThrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn protected(flow: Pin<Box<dyn Work<B, E>>>) -> Self {
        Self {
            kind: Kind::Protected {
                work: Detached(Some(flow)),
            },
        }
    }

    /// A refusal answered once the request body is drained (see `service::refuse`).
    pub(crate) fn refused(
        drain: Pin<Box<dyn Future<Output = Response<ResponseBody<B>>> + Send>>,
    ) -> Self {
        Self {
            kind: Kind::Refused { drain },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Output<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::PassThrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Protected { work } => work.poll(cx),
            KindProj::Refused { drain } => drain.as_mut().poll(cx).map(Ok),
        }
    }
}

/// A protected request's flow, seen from [`ResponseFuture`]: polled, or left behind by a
/// client that went away.
pub(crate) trait Work<B, E>: Send {
    fn poll_work(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Output<B, E>>;

    /// The client went away: what must not be cut short finishes in a task of its own.
    fn client_gone(self: Pin<Box<Self>>);
}

/// The flow of a protected request, handed to [`Work::client_gone`] if dropped unfinished.
struct Detached<B, E>(Option<Pin<Box<dyn Work<B, E>>>>);

impl<B, E> Detached<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Output<B, E>> {
        let work = self
            .0
            .as_mut()
            .expect("ResponseFuture polled after completion");
        let output = ready!(work.as_mut().poll_work(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<B, E> Drop for Detached<B, E> {
    fn drop(&mut self) {
        if let Some(work) = self.0.take() {
            work.client_gone();
        }
    }
}

/// Where the key comes from, as far as the request head tells.
pub(crate) enum KeyPlan {
    Client(IdempotencyKey),
    /// A key source that reads the body; the missing-key policy applies if it finds nothing.
    FromBody,
    /// No key: derive one from the request.
    Derived,
}

/// A protected request once its body is read and its key known.
struct Keyed {
    parts: Parts,
    body: Bytes,
    key: Option<IdempotencyKey>,
    storage_key: StorageKey,
    fingerprint: Fingerprint,
    ttl: Duration,
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwned]
    enum State<F, ReqB, St: IdempotencyStore, ResB, E> {
        ReadBody { #[pin] body: ReqB, read: Chunks, parts: Parts, plan: KeyPlan },
        Claim { claim: StoreOp<Claim>, sent: Instant, keyed: Keyed },
        Wait { wait: StoreOp<()>, keyed: Keyed },
        // `lease: None`: running unprotected (fail-open, or no key to protect).
        Ready { keyed: Keyed, lease: Option<Lease<St>> },
        Run {
            #[pin] handler: CatchUnwind<F>,
            lease: Option<Lease<St>>,
            renewal: Renewal,
            fingerprint: Fingerprint,
            ttl: Duration,
        },
        Finish { op: LeaseOp, output: Output<ResB, E> },
        Done,
    }
}

/// What the state just polled came to.
enum Event<ResB, E> {
    Read(Result<(), Problem>),
    Claimed(Result<Claim, StoreError>),
    Waited(Result<(), StoreError>),
    Ready(Result<(), E>),
    Ran(Result<Result<Response<ResB>, E>, catch_unwind::Panic>),
    Finished,
}

/// The next state, or the answer.
// Moved once, straight into the boxed flow's state: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Step<F, ReqB, St: IdempotencyStore, ResB, E> {
    Next(State<F, ReqB, St, ResB, E>),
    Answer(Output<ResB, E>),
}

pin_project! {
    /// The flow of one protected request (see the module docs).
    pub(crate) struct Flow<S, St, ReqB, ResB>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
        St: IdempotencyStore,
    {
        #[pin]
        state: State<S::Future, ReqB, St, ResB, S::Error>,
        ctx: Ctx<S, St, ReqB, ResB>,
        span: Span,
    }
}

/// What the flow carries through every state.
struct Ctx<S, St, ReqB, ResB> {
    _types: PhantomData<fn(ReqB) -> ResB>,
    inner: Inner<S>,
    store: St,
    config: Arc<Config>,
    wait_until: Option<Instant>,
    wait_clock: Option<WaitClock>,
    waited: bool,
    /// The client went away: work finishing on its own starts nothing new for it.
    gone: bool,
}

impl<S, St, ReqB, ResB> Flow<S, St, ReqB, ResB>
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
    /// The flow of `request`, protected by `store`; `inner` holds the readiness `poll_ready`
    /// gave it.
    pub(crate) fn new(
        inner: S,
        store: St,
        config: Arc<Config>,
        request: Request<ReqB>,
        plan: KeyPlan,
    ) -> Self {
        // One span per protected request (none for those passed through).
        let span = config.observer.request_span(request.method());
        let wait_until = match config.wait_mode {
            WaitMode::Wait(timeout) => Some(Instant::now() + timeout),
            WaitMode::Reject => None,
        };
        let (parts, body) = request.into_parts();
        let state = State::ReadBody {
            body,
            read: Chunks::default(),
            parts,
            plan,
        };
        Self {
            state,
            ctx: Ctx {
                _types: PhantomData,
                inner: Inner::new(inner),
                store,
                wait_until,
                wait_clock: Some(config.observer.wait_clock()),
                waited: false,
                gone: false,
                config,
            },
            span,
        }
    }
}

impl<S, St, ReqB, ResB> Work<ResB, S::Error> for Flow<S, St, ReqB, ResB>
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
    fn poll_work(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Output<ResB, S::Error>> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            let event = match this.state.as_mut().project() {
                StateProj::ReadBody {
                    body, read, parts, ..
                } => {
                    let limit = this.ctx.config.request_body_limit;
                    Event::Read(ready!(poll_read(body, read, parts, limit, cx)))
                }
                StateProj::Claim { claim, .. } => Event::Claimed(ready!(claim.as_mut().poll(cx))),
                StateProj::Wait { wait, .. } => Event::Waited(ready!(wait.as_mut().poll(cx))),
                StateProj::Ready { .. } => Event::Ready(ready!(this.ctx.inner.poll_ready(cx))),
                StateProj::Run {
                    handler,
                    lease,
                    renewal,
                    ..
                } => match handler.poll(cx) {
                    Poll::Ready(ran) => Event::Ran(ran),
                    Poll::Pending => {
                        if let Some(lease) = lease {
                            renewal.poll(lease, cx);
                        }
                        return Poll::Pending;
                    }
                },
                StateProj::Finish { op, .. } => {
                    ready!(op.as_mut().poll(cx));
                    Event::Finished
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            let state = this.state.as_mut().project_replace(State::Done);
            let step = match (state, event) {
                (
                    StateOwned::ReadBody {
                        parts, read, plan, ..
                    },
                    Event::Read(result),
                ) => this.ctx.read(parts, result.map(|()| read.concat()), plan),
                (StateOwned::Claim { sent, keyed, .. }, Event::Claimed(claim)) => {
                    this.ctx.claimed(keyed, sent, claim)
                }
                (StateOwned::Wait { keyed, .. }, Event::Waited(waited)) => match waited {
                    Ok(()) => Step::Next(this.ctx.claim(keyed)),
                    Err(error) => this.ctx.store_failed(error, keyed),
                },
                (StateOwned::Ready { keyed, lease }, Event::Ready(ready)) => {
                    this.ctx.run(keyed, lease, ready)
                }
                (
                    StateOwned::Run {
                        lease,
                        fingerprint,
                        ttl,
                        ..
                    },
                    Event::Ran(ran),
                ) => this.ctx.ran(lease, fingerprint, ttl, ran, cx),
                (StateOwned::Finish { output, .. }, Event::Finished) => Step::Answer(output),
                // Each event is the one its state was polled for, above.
                _ => unreachable!("a flow event paired with another state"),
            };
            match step {
                Step::Next(next) => this.state.set(next),
                Step::Answer(output) => return Poll::Ready(output),
            }
        }
    }

    fn client_gone(mut self: Pin<Box<Self>>) {
        let finish = match &self.state {
            // A claim on its way may land, a handler that started finishes, and a record
            // being stored is stored: none of it may be cut short.
            State::Claim { .. } | State::Finish { .. } => true,
            State::Run { lease, .. } => lease.is_some(),
            // Reading the body, waiting for another request, or for the inner service (the
            // lease then gives the key back as it drops), or running unprotected: the work
            // ends with its client.
            State::ReadBody { .. } | State::Wait { .. } | State::Ready { .. } | State::Done => {
                false
            }
        };
        if !finish {
            return;
        }
        self.as_mut().project().ctx.gone = true;
        // Without a runtime (it is shutting down) the work is dropped; a claim it held frees
        // itself when its lease ends.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = std::future::poll_fn(|cx| self.as_mut().poll_work(cx)).await;
            });
        }
    }
}

impl<S, St, ReqB, ResB> Ctx<S, St, ReqB, ResB>
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
    /// The body is read: fingerprint it, find the key, claim it.
    fn read(
        &mut self,
        parts: Parts,
        body: Result<Bytes, Problem>,
        plan: KeyPlan,
    ) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        let config = &self.config;
        let body = match body {
            Ok(body) => body,
            // The rest of the body was not read: the connection cannot carry another request.
            Err(problem) => return Step::Answer(Ok(close_connection(reject(config, &problem)))),
        };
        let fingerprint = config.fingerprint_of(&parts, &body);
        let key = match plan {
            KeyPlan::Client(key) => Some(key),
            KeyPlan::Derived => None,
            KeyPlan::FromBody => {
                let source = config.key_source.as_ref();
                match source.map(|s| s.extract(&parts, &body)).transpose() {
                    Ok(found) => found.flatten(),
                    Err(error) => return self.reject(&Problem::invalid_key(&error)),
                }
            }
        };
        let (key_ref, ttl) = match (&key, config.missing_key) {
            (Some(key), _) => (KeyRef::Client(key), config.ttl),
            (None, MissingKey::Fingerprint(window)) => (KeyRef::Derived(&fingerprint), window),
            (None, MissingKey::Required) => {
                return self.reject(&Problem::missing_key(&config.header_name));
            }
            (None, MissingKey::PassThrough) => {
                let keyed = Keyed {
                    storage_key: config.storage_key(&parts, KeyRef::Derived(&fingerprint)),
                    parts,
                    body,
                    key: None,
                    fingerprint,
                    ttl: config.ttl,
                };
                return Step::Next(State::Ready { keyed, lease: None });
            }
        };
        let storage_key = config.storage_key(&parts, key_ref);
        config.observer.key(&storage_key);
        Step::Next(self.claim(Keyed {
            parts,
            body,
            key,
            storage_key,
            fingerprint,
            ttl,
        }))
    }

    /// Sends the claim on the key.
    fn claim(&self, keyed: Keyed) -> State<S::Future, ReqB, St, ResB, S::Error> {
        let (store, observer) = (self.store.clone(), self.config.observer.clone());
        let (key, fingerprint, lease) = (keyed.storage_key, keyed.fingerprint, self.config.lease);
        let claim = Box::pin(async move {
            let claim = store.claim(&key, &fingerprint, lease);
            observer.store_op(St::NAME, Op::Claim, claim).await
        });
        let sent = Instant::now();
        State::Claim { claim, sent, keyed }
    }

    /// The store answered the claim (or take-over) sent at `sent`.
    fn claimed(
        &mut self,
        keyed: Keyed,
        sent: Instant,
        claim: Result<Claim, StoreError>,
    ) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        let config = Arc::clone(&self.config);
        let observer = &config.observer;
        if self.gone && !matches!(claim, Ok(Claim::Acquired(_))) {
            return Step::Answer(Ok(nobody_listens()));
        }
        match claim {
            Ok(Claim::Acquired(token)) => {
                let lease = Lease::new(
                    self.store.clone(),
                    keyed.storage_key,
                    token,
                    config.lease,
                    sent,
                )
                .observed(observer.clone());
                if self.gone {
                    // Nobody is left to answer: the handler is not started for nobody.
                    let op = Box::pin(lease.release(RecordResult::ClientGone));
                    let output = Ok(nobody_listens());
                    return Step::Next(State::Finish { op, output });
                }
                Step::Next(State::Ready {
                    keyed,
                    lease: Some(lease),
                })
            }
            Ok(Claim::Completed { record, expires_in }) => {
                let retry = Retry {
                    fingerprint: &keyed.fingerprint,
                    body: &keyed.body,
                    expires_in,
                };
                match replay(&config, record, &retry) {
                    Ok(response) => {
                        let waited = self.waited;
                        observer.outcome(if waited {
                            Outcome::Waited
                        } else {
                            Outcome::Replayed
                        });
                        Step::Answer(Ok(response))
                    }
                    Err(problem) => self.reject(&problem),
                }
            }
            Ok(Claim::Abandoned { token, fingerprint }) => {
                if fingerprint != keyed.fingerprint {
                    return self.reject(&Problem::key_reused(config.mismatch_status));
                }
                if config.on_abandoned.decide(&keyed.parts) == Recovery::OutcomeUnknown {
                    observer.abandoned(AbandonedAction::OutcomeUnknown);
                    return self.reject(&Problem::outcome_unknown());
                }
                observer.abandoned(AbandonedAction::RunAgain);
                let (store, observer) = (self.store.clone(), observer.clone());
                let (key, fingerprint, lease) =
                    (keyed.storage_key, keyed.fingerprint, config.lease);
                let claim = Box::pin(async move {
                    let take_over = store.take_over(&key, token, &fingerprint, lease);
                    observer.store_op(St::NAME, Op::TakeOver, take_over).await
                });
                let sent = Instant::now();
                Step::Next(State::Claim { claim, sent, keyed })
            }
            Ok(Claim::InFlight { fingerprint }) => {
                if fingerprint != keyed.fingerprint {
                    return self.reject(&Problem::key_reused(config.mismatch_status));
                }
                let now = Instant::now();
                let remaining = self
                    .wait_until
                    .and_then(|until| until.checked_duration_since(now));
                let Some(remaining) = remaining.filter(|r| !r.is_zero()) else {
                    return self.reject(&Problem::in_flight());
                };
                // Whatever readiness the inner service holds (a concurrency permit, a buffer
                // slot) is not held through the wait.
                self.inner.give_back_readiness();
                self.waited = true;
                if let Some(clock) = &mut self.wait_clock {
                    clock.start();
                }
                let (store, observer, key) =
                    (self.store.clone(), observer.clone(), keyed.storage_key);
                let wait = Box::pin(async move {
                    let wait = store.wait(&key, remaining);
                    observer.store_op(St::NAME, Op::Wait, wait).await
                });
                Step::Next(State::Wait { wait, keyed })
            }
            Err(error) => self.store_failed(error, keyed),
        }
    }

    /// The store failed: 503 when failing closed; when failing open, run the handler
    /// unprotected.
    fn store_failed(
        &mut self,
        error: StoreError,
        keyed: Keyed,
    ) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        match self.config.fail_mode {
            FailMode::Closed => {
                tracing::warn!(%error, "refusing the request (fail-closed)");
                self.reject(&Problem::store_unavailable())
            }
            FailMode::Open if self.gone => Step::Answer(Ok(nobody_listens())),
            FailMode::Open => {
                tracing::warn!(%error, "executing unprotected (fail-open)");
                self.config.observer.outcome(Outcome::FailOpen);
                Step::Next(State::Ready { keyed, lease: None })
            }
        }
    }

    /// The inner service is ready (or failed to get ready): run the handler.
    fn run(
        &mut self,
        keyed: Keyed,
        lease: Option<Lease<St>>,
        ready: Result<(), S::Error>,
    ) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        if let Err(error) = ready {
            return match lease {
                Some(lease) => Step::Next(State::Finish {
                    op: Box::pin(lease.release(RecordResult::HandlerError)),
                    output: Err(error),
                }),
                None => Step::Answer(Err(error)),
            };
        }
        if lease.is_some() {
            self.config.observer.outcome(Outcome::Executed);
        }
        // The wait, if any, ends here: its duration is reported.
        self.wait_clock = None;
        let Keyed {
            parts,
            body,
            key,
            fingerprint,
            ttl,
            ..
        } = keyed;
        let mut request = Request::from_parts(parts, RequestBody::full(body));
        if let Some(key) = key {
            request.extensions_mut().insert(key);
        }
        let handler = CatchUnwind::new(self.inner.call(request));
        Step::Next(State::Run {
            handler,
            lease,
            renewal: Renewal::default(),
            fingerprint,
            ttl,
        })
    }

    /// The handler answered (or panicked): its response is taken as far as it is ready, its
    /// record stored (or its key released) before it is answered; a body still being produced
    /// is captured by a task of its own.
    fn ran(
        &mut self,
        lease: Option<Lease<St>>,
        fingerprint: Fingerprint,
        ttl: Duration,
        ran: Result<Result<Response<ResB>, S::Error>, catch_unwind::Panic>,
        cx: &mut Context<'_>,
    ) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        let Some(lease) = lease else {
            // Unprotected: the answer passes through as it is, a panic included.
            return match ran {
                Ok(output) => Step::Answer(output.map(|r| r.map(ResponseBody::inner))),
                Err(panic) => std::panic::resume_unwind(panic),
            };
        };
        let response = match ran {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return finish(lease.release(RecordResult::HandlerError), Err(error)),
            Err(_panic) => return self.panicked(lease),
        };
        let config = Arc::clone(&self.config);
        let limit = config.response_body_limit;
        let taken = match catch_unwind::catching(|| capture::take_ready(response, &config, cx)) {
            Ok(taken) => taken,
            Err(_panic) => return self.panicked(lease),
        };
        match taken {
            Ran::NotStored(response) => {
                tracing::debug!(status = %response.status(), "response not stored; key released");
                finish(lease.release(RecordResult::Predicate), Ok(response))
            }
            Ran::Broken(response) => finish(lease.release(RecordResult::BodyError), Ok(response)),
            Ran::Whole {
                head,
                body,
                trailers,
            } => {
                let record = if body.len() <= limit {
                    let trailers = trailers.as_ref();
                    Record::response(
                        fingerprint,
                        head.status,
                        &head.headers,
                        body.clone(),
                        trailers,
                    )
                } else {
                    Record::not_replayable(fingerprint, head.status)
                };
                let response = Response::from_parts(head, ResponseBody::full(body, trailers));
                let response = expiry::on_first_execution(&config, ttl, response);
                finish(lease.complete(record, ttl), Ok(response))
            }
            Ran::Streaming { head, pump } => {
                let (tx, rx) = stream::channel();
                let of = RecordOf {
                    fingerprint,
                    status: head.status,
                    headers: head.headers.clone(),
                    ttl,
                };
                tokio::spawn(pump.finish(lease, tx, limit, of).in_current_span());
                let response = Response::from_parts(head, ResponseBody::channel(rx));
                Step::Answer(Ok(expiry::on_first_execution(&config, ttl, response)))
            }
        }
    }

    /// The handler (or its body) panicked: the key is released and the client gets a 500.
    fn panicked(&mut self, lease: Lease<St>) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        // The panic message went to the panic hook already.
        tracing::error!("the handler of an idempotent request panicked; key released");
        let response = reject(&self.config, &Problem::handler_failed());
        finish(lease.release(RecordResult::Panic), Ok(response))
    }

    /// A rejection, answered at once.
    fn reject(&self, problem: &Problem) -> Step<S::Future, ReqB, St, ResB, S::Error> {
        Step::Answer(Ok(reject(&self.config, problem)))
    }
}

/// Stores a record or releases a key (`op`), then answers `output`.
fn finish<F, ReqB, St, ResB, E>(
    op: impl Future<Output = ()> + Send + 'static,
    output: Output<ResB, E>,
) -> Step<F, ReqB, St, ResB, E>
where
    St: IdempotencyStore,
{
    Step::Next(State::Finish {
        op: Box::pin(op),
        output,
    })
}

/// Reads the request body into `read`, refusing it past `limit` (by its declared length
/// first, so an oversized upload is refused before it is read).
fn poll_read<B>(
    mut body: Pin<&mut B>,
    read: &mut Chunks,
    parts: &Parts,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Problem>>
where
    B: Body<Data = Bytes>,
{
    if read.count() == 0 && declared_over(parts, body.size_hint().lower(), limit) {
        return Poll::Ready(Err(Problem::body_too_large(limit)));
    }
    poll_read_limited(body.as_mut(), read, limit, cx)
}

/// Whether the request says its body is longer than `limit`.
fn declared_over(parts: &Parts, lower_bound: u64, limit: usize) -> bool {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    declared.is_some_and(|len| len > limit as u64) || lower_bound > limit as u64
}

/// Reads a body whole into `read`, refusing it past `limit`.
pub(crate) fn poll_read_limited<B>(
    mut body: Pin<&mut B>,
    read: &mut Chunks,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Problem>>
where
    B: Body<Data = Bytes>,
{
    while let Some(frame) = ready!(body.as_mut().poll_frame(cx)) {
        let Ok(frame) = frame else {
            return Poll::Ready(Err(Problem::unreadable_body()));
        };
        if let Ok(data) = frame.into_data() {
            if read.len + data.len() > limit {
                return Poll::Ready(Err(Problem::body_too_large(limit)));
            }
            read.push(data);
        }
    }
    Poll::Ready(Ok(()))
}

/// The one way the layer answers a request itself: every rejection is observed here.
pub(crate) fn reject<B>(config: &Config, problem: &Problem) -> Response<ResponseBody<B>> {
    if let Some(outcome) = Outcome::of_problem(problem.kind()) {
        config.observer.outcome(outcome);
    }
    config
        .render(problem)
        .map(|body| ResponseBody::full(body, None))
}

/// Tells the client (and hyper) that this connection ends with this response.
pub(crate) fn close_connection<B>(mut response: Response<B>) -> Response<B> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The response of work that finished after its client went away: nobody reads it.
fn nobody_listens<B>() -> Response<ResponseBody<B>> {
    Response::new(ResponseBody::full(Bytes::new(), None))
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

    /// Drops the ready service for a clone without its readiness: what a ready service holds
    /// (a `ConcurrencyLimit` permit, a `Buffer` slot) goes back for others to use.
    fn give_back_readiness(&mut self) {
        if self.ready {
            self.service = self.service.clone();
            self.ready = false;
        }
    }

    /// Makes the service ready again if it gave its readiness back.
    fn poll_ready<R>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Service<R>,
    {
        if !self.ready {
            ready!(self.service.poll_ready(cx))?;
            self.ready = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Calls the ready service.
    fn call<R>(&mut self, request: R) -> S::Future
    where
        S: Service<R>,
    {
        self.ready = false;
        self.service.call(request)
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::PassThrough { .. } => "PassThrough",
            Kind::Ready { .. } => "Ready",
            Kind::Protected { .. } => "Protected",
            Kind::Refused { .. } => "Refused",
        };
        f.debug_tuple("ResponseFuture").field(&kind).finish()
    }
}
