//! The flow of one protected request, as a state machine.
//!
//! ```text
//!  ReadBody ─► Claim ─► Completed ──────────────────────────► replay (or 409/422)
//!    │  │       ▲ │ ──► InFlight ─► Wait ─┐   (or 409 if not waiting)
//!    │  │       ├─┼───────────────────────┘
//!    │  │       └─┼──── Abandoned ─► take-over, or 409 outcome unknown
//!    │  │         │ ──► store failed ─► 503, or fail-open: Ready ─► Run, unprotected
//!    │  │         └──► Acquired ─► Ready ─► Run ─► Finish ─► the handler's response
//!    │  └─► 400 / 413                  (the lease renewed while Run; the record stored,
//!    └─► no key found, pass-through: Ready ─► Run       or the key released, in Finish)
//! ```
//!
//! - **ReadBody**: the body is read whole, up to the limit, fingerprinted, and its key found
//!   ([`plan`](crate::plan)).
//! - **Claim**: a claim (or a take-over of an abandoned claim) is on its way to the store.
//! - **Wait**: another request holds the key; the store wakes this one when it ends.
//! - **Ready**: the inner service is made ready again if it gave its readiness back to wait
//!   (a `ConcurrencyLimit` permit is never held across a wait).
//! - **Run**: the handler runs, its [`Lease`] renewed beside it; its response is then
//!   [settled](crate::capture::settle): a whole body's record is stored before the response
//!   goes out; a streamed body is captured by a task of its own.
//! - **Finish**: the record is stored (or the key released); then the response is answered.
//!
//! The lease is a field of the states that hold the claim, as tower's concurrency permit is a
//! field of its future: every path that does not complete it gives it back, dropped ones
//! included. A client that goes away while a claim is on its way, a handler runs or a record
//! is being stored leaves the flow to finish in a task of its own; in any other state the
//! flow ends with it.

use std::{
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{Request, Response, request::Parts};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Span;

use super::{Output, Work};
use crate::{
    body::{self, Chunks, RequestBody, ResponseBody},
    capture::{self, Settled},
    catch_unwind::{CatchUnwind, Panic},
    config::{Config, FailMode, WaitMode},
    error::{BoxError, StoreError},
    fingerprint::Fingerprint,
    key::StorageKey,
    lease::{Lease, Renewal},
    observe::{Describe, Op, Outcome, RecordResult, WaitClock},
    plan::{self, Key, KeyPlan},
    problem::Problem,
    ready::Inner,
    recovery::on_abandoned,
    reject::{close_connection, nobody_listens, reject},
    replay::{Retry, replay},
    store::{Claim, IdempotencyStore},
};

/// A store operation on its way (boxed: a store's futures borrow the store and the key).
type StoreOp<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Storing a record or releasing a key: the lease deals with a failure.
type LeaseOp = Pin<Box<dyn Future<Output = ()> + Send>>;

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

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwned]
    enum State<F, ReqB, St: IdempotencyStore, ResB, E> {
        ReadBody { #[pin] body: ReqB, read: Chunks, parts: Parts, plan: KeyPlan },
        Claim { claim: StoreOp<Claim>, sent: Instant, keyed: Keyed },
        Wait { wait: StoreOp<()>, keyed: Keyed },
        // `held: None` runs the handler unprotected (fail-open, or no key to protect).
        Ready { request: Request<RequestBody<ReqB>>, held: Option<Held<St>> },
        Run { #[pin] handler: CatchUnwind<F>, held: Option<Held<St>>, renewal: Renewal },
        Finish { lease_op: LeaseOp, output: Output<ResB, E> },
        Done,
    }
}

/// A protected request whose body is read and key known.
struct Keyed {
    parts: Parts,
    body: Bytes,
    key: Key,
    fingerprint: Fingerprint,
}

/// The claim this request holds, and what its record will be made of.
struct Held<St: IdempotencyStore> {
    lease: Lease<St>,
    fingerprint: Fingerprint,
    ttl: std::time::Duration,
}

/// What the state just polled came to.
enum Event<ResB, E> {
    Read(Result<(), Problem>),
    Claimed(Result<Claim, StoreError>),
    Waited(Result<(), StoreError>),
    Ready(Result<(), E>),
    Ran(Result<Result<Response<ResB>, E>, Panic>),
    Finished,
}

/// The next state, or the answer.
// Moved once, straight into the boxed flow's state: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Step<F, ReqB, St: IdempotencyStore, ResB, E> {
    Next(State<F, ReqB, St, ResB, E>),
    Answer(Output<ResB, E>),
}

/// What the flow carries through every state.
struct Ctx<S, St, ReqB, ResB> {
    inner: Inner<S>,
    store: St,
    config: Arc<Config>,
    wait_until: Option<Instant>,
    wait_clock: Option<WaitClock>,
    waited: bool,
    /// The client went away: work finishing on its own starts nothing new for it.
    gone: bool,
    _types: PhantomData<fn(ReqB) -> ResB>,
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
    /// The flow of `request` (its key found as `plan` says), protected by `store`; `inner`
    /// holds the readiness `poll_ready` gave it.
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
        let read = Chunks::default();
        let ctx = Ctx {
            inner: Inner::new(inner),
            store,
            wait_until,
            wait_clock: Some(config.observer.wait_clock()),
            waited: false,
            gone: false,
            config,
            _types: PhantomData,
        };
        let state = State::ReadBody {
            body,
            read,
            parts,
            plan,
        };
        Self { state, ctx, span }
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
        let ctx = this.ctx;
        loop {
            // Poll what the state waits for...
            let event = match this.state.as_mut().project() {
                StateProj::ReadBody {
                    body, read, parts, ..
                } => {
                    let limit = ctx.config.request_body_limit;
                    Event::Read(ready!(body::poll_read(body, read, parts, limit, cx)))
                }
                StateProj::Claim { claim, .. } => Event::Claimed(ready!(claim.as_mut().poll(cx))),
                StateProj::Wait { wait, .. } => Event::Waited(ready!(wait.as_mut().poll(cx))),
                StateProj::Ready { .. } => Event::Ready(ready!(ctx.inner.poll_ready(cx))),
                StateProj::Run {
                    handler,
                    held,
                    renewal,
                } => match handler.poll(cx) {
                    Poll::Ready(ran) => Event::Ran(ran),
                    Poll::Pending => {
                        if let Some(held) = held {
                            renewal.poll(&mut held.lease, cx);
                        }
                        return Poll::Pending;
                    }
                },
                StateProj::Finish { lease_op, .. } => {
                    ready!(lease_op.as_mut().poll(cx));
                    Event::Finished
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            // ...then decide where it leads.
            let step = match (this.state.as_mut().project_replace(State::Done), event) {
                (
                    StateOwned::ReadBody {
                        parts, read, plan, ..
                    },
                    Event::Read(read_body),
                ) => ctx.read(parts, read_body.map(|()| read.concat()), plan),
                (StateOwned::Claim { sent, keyed, .. }, Event::Claimed(claim)) => {
                    ctx.claimed(keyed, sent, claim)
                }
                (StateOwned::Wait { keyed, .. }, Event::Waited(Ok(()))) => {
                    Step::Next(ctx.claim(keyed))
                }
                (StateOwned::Wait { keyed, .. }, Event::Waited(Err(error))) => {
                    ctx.store_failed(error, keyed)
                }
                (StateOwned::Ready { request, held }, Event::Ready(ready)) => {
                    ctx.run(request, held, ready)
                }
                (StateOwned::Run { held, .. }, Event::Ran(ran)) => ctx.ran(held, ran, cx),
                (StateOwned::Finish { output, .. }, Event::Finished) => Step::Answer(output),
                // Each event comes from the state it was polled in, just above.
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
            State::Run { held, .. } => held.is_some(),
            // Reading the body, waiting for another request or for the inner service (the
            // lease gives the key back as it drops), or running unprotected: the work ends
            // with its client.
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

type FlowStep<S, St, ReqB, ResB> = Step<
    <S as Service<Request<RequestBody<ReqB>>>>::Future,
    ReqB,
    St,
    ResB,
    <S as Service<Request<RequestBody<ReqB>>>>::Error,
>;

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
    /// The body is read: fingerprint it, find its key, claim the key.
    fn read(
        &mut self,
        parts: Parts,
        body: Result<Bytes, Problem>,
        plan: KeyPlan,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = &self.config;
        let body = match body {
            Ok(body) => body,
            // The rest of the body was not read: the connection cannot carry another request.
            Err(problem) => return Step::Answer(Ok(close_connection(reject(config, &problem)))),
        };
        let fingerprint = config.fingerprint_of(&parts, &body);
        match plan::after_body(config, plan, &parts, &body, &fingerprint) {
            Ok(Some(key)) => {
                config.observer.key(&key.storage);
                Step::Next(self.claim(Keyed {
                    parts,
                    body,
                    key,
                    fingerprint,
                }))
            }
            Ok(None) => Step::Next(State::Ready {
                request: Request::from_parts(parts, RequestBody::full(body)),
                held: None,
            }),
            Err(problem) => self.reject(&problem),
        }
    }

    /// Sends the claim on the key.
    fn claim(&self, keyed: Keyed) -> State<S::Future, ReqB, St, ResB, S::Error> {
        let (fingerprint, lease) = (keyed.fingerprint, self.config.lease);
        let claim = self.store_op(Op::Claim, &keyed, move |store, key| async move {
            store.claim(&key, &fingerprint, lease).await
        });
        let sent = Instant::now();
        State::Claim { claim, sent, keyed }
    }

    /// Sends `op` on `keyed`'s key, observed.
    fn store_op<T, F, Fut>(&self, op: Op, keyed: &Keyed, send: F) -> StoreOp<T>
    where
        F: FnOnce(St, StorageKey) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        Result<T, StoreError>: Describe,
    {
        let observer = self.config.observer.clone();
        let operation = send(self.store.clone(), keyed.key.storage);
        Box::pin(async move { observer.store_op(St::NAME, op, operation).await })
    }

    /// The store answered the claim (or take-over) sent at `sent`.
    fn claimed(
        &mut self,
        keyed: Keyed,
        sent: Instant,
        claim: Result<Claim, StoreError>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = Arc::clone(&self.config);
        let observer = &config.observer;
        if self.gone && !matches!(claim, Ok(Claim::Acquired(_))) {
            return Step::Answer(Ok(nobody_listens()));
        }
        match claim {
            Ok(Claim::Acquired(token)) => {
                let Keyed {
                    parts,
                    body,
                    key,
                    fingerprint,
                } = keyed;
                let lease = Lease::new(self.store.clone(), key.storage, token, config.lease, sent)
                    .observed(observer.clone());
                if self.gone {
                    // Nobody is left to answer: the handler is not started for nobody.
                    let lease_op = Box::pin(lease.release(RecordResult::ClientGone));
                    let output = Ok(nobody_listens());
                    return Step::Next(State::Finish { lease_op, output });
                }
                let mut request = Request::from_parts(parts, RequestBody::full(body));
                if let Some(client_key) = key.client {
                    request.extensions_mut().insert(client_key);
                }
                let held = Held {
                    lease,
                    fingerprint,
                    ttl: key.ttl,
                };
                Step::Next(State::Ready {
                    request,
                    held: Some(held),
                })
            }
            Ok(Claim::Completed { record, expires_in }) => {
                let retry = Retry {
                    fingerprint: &keyed.fingerprint,
                    body: &keyed.body,
                    expires_in,
                    waited: self.waited,
                };
                match replay(&config, record, &retry) {
                    Ok(response) => Step::Answer(Ok(response)),
                    Err(problem) => self.reject(&problem),
                }
            }
            Ok(Claim::Abandoned { token, fingerprint }) => {
                let held = &fingerprint;
                if let Err(problem) = on_abandoned(&config, &keyed.parts, held, &keyed.fingerprint)
                {
                    return self.reject(&problem);
                }
                let lease = config.lease;
                let claim = self.store_op(Op::TakeOver, &keyed, move |store, key| async move {
                    store.take_over(&key, token, &fingerprint, lease).await
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
                let Some(remaining) = remaining.filter(|left| !left.is_zero()) else {
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
                    (self.store.clone(), observer.clone(), keyed.key.storage);
                let wait = Box::pin(async move {
                    let wait = store.wait(&key, remaining);
                    observer.store_op(St::NAME, Op::Wait, wait).await
                });
                Step::Next(State::Wait { wait, keyed })
            }
            Err(error) => self.store_failed(error, keyed),
        }
    }

    /// The store failed: 503 when failing closed; when failing open, the handler runs
    /// unprotected.
    fn store_failed(&mut self, error: StoreError, keyed: Keyed) -> FlowStep<S, St, ReqB, ResB> {
        match self.config.fail_mode {
            FailMode::Closed => {
                tracing::warn!(%error, "refusing the request (fail-closed)");
                self.reject(&Problem::store_unavailable())
            }
            FailMode::Open if self.gone => Step::Answer(Ok(nobody_listens())),
            FailMode::Open => {
                tracing::warn!(%error, "executing unprotected (fail-open)");
                self.config.observer.outcome(Outcome::FailOpen);
                let request = Request::from_parts(keyed.parts, RequestBody::full(keyed.body));
                Step::Next(State::Ready {
                    request,
                    held: None,
                })
            }
        }
    }

    /// The inner service is ready (or failed to get ready): the handler runs.
    fn run(
        &mut self,
        request: Request<RequestBody<ReqB>>,
        held: Option<Held<St>>,
        ready: Result<(), S::Error>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        if let Err(error) = ready {
            return match held {
                Some(held) => Step::Next(State::Finish {
                    lease_op: Box::pin(held.lease.release(RecordResult::HandlerError)),
                    output: Err(error),
                }),
                None => Step::Answer(Err(error)),
            };
        }
        if held.is_some() {
            self.config.observer.outcome(Outcome::Executed);
        }
        // The wait, if any, ends here: its duration is reported.
        self.wait_clock = None;
        let handler = CatchUnwind::new(self.inner.call(request));
        let renewal = Renewal::default();
        Step::Next(State::Run {
            handler,
            held,
            renewal,
        })
    }

    /// The handler answered (or panicked): its response is settled.
    fn ran(
        &mut self,
        held: Option<Held<St>>,
        ran: Result<Result<Response<ResB>, S::Error>, Panic>,
        cx: &mut Context<'_>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let Some(Held {
            lease,
            fingerprint,
            ttl,
        }) = held
        else {
            // Unprotected: the answer passes through as it is, a panic included.
            return match ran {
                Ok(output) => Step::Answer(output.map(|r| r.map(ResponseBody::inner))),
                Err(panic) => std::panic::resume_unwind(panic),
            };
        };
        let config = &self.config;
        let settled = match ran {
            Ok(Ok(response)) => capture::settle(response, lease, fingerprint, ttl, config, cx),
            Ok(Err(error)) => {
                let lease_op = Box::pin(lease.release(RecordResult::HandlerError));
                return Step::Next(State::Finish {
                    lease_op,
                    output: Err(error),
                });
            }
            Err(_panic) => capture::panicked(lease, config),
        };
        match settled {
            Settled::AfterStore { lease_op, response } => Step::Next(State::Finish {
                lease_op,
                output: Ok(response),
            }),
            Settled::Now(response) => Step::Answer(Ok(response)),
        }
    }

    /// A problem, answered at once.
    fn reject(&self, problem: &Problem) -> FlowStep<S, St, ReqB, ResB> {
        Step::Answer(Ok(reject(&self.config, problem)))
    }
}
