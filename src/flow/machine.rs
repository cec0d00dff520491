//! The flow of one protected request, as a state machine: this file names the states and
//! what each waits for; [`step`] decides where each answer leads.
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
//!  ReadUnkeyed (no key: the key is derived) ─► as ReadBody, but a body over the limit runs
//!                                              unprotected, handed on whole: Ready ─► Run
//! ```
//!
//! - **ReadBody**: the body is read whole, up to the limit, fingerprinted, and its key found
//!   ([`plan`](crate::flow::plan)). **ReadUnkeyed** does the same for a request without a key;
//!   past the limit, what was read and the rest of the body go to the handler unprotected.
//! - **Claim**: a claim (or a take-over of an abandoned claim) is on its way to the store.
//! - **Probe**: the key is claimed, and the secret was rotated: the addresses the key had
//!   under earlier secrets are looked at, for a record to replay or a request to wait for
//!   ([`rotation`]).
//! - **Wait**: another request holds the key; the store wakes this one when it ends.
//! - **Ready**: the inner service is made ready again if it gave its readiness back to wait
//!   (a `ConcurrencyLimit` permit is never held across a wait).
//! - **Run**: the handler runs, its [`Lease`] renewed beside it; its response is then
//!   [settled](crate::flow::capture::settle): a whole body's record is stored before the response
//!   goes out; a streamed body is captured by a task of its own.
//! - **Finish**: the record is stored (or the key released); then the response is answered.
//!
//! Each step moves the state by value, so what does not change from one state to the next
//! stays out of it: the request's head (and, when a key was found for it, the body read) is
//! kept in the flow's context and read there, until the request is rebuilt for the handler
//! in **Ready**; the claim's future and the handler's run in the flow's `pending` slot,
//! written in place.
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

mod rotation;
mod step;

use rotation::Found;

use super::future::{Output, Work};
use crate::{
    fingerprint::Fingerprint,
    flow::body::{self, Chunks, RequestBody},
    flow::catch_unwind::{CatchUnwind, Panic},
    flow::lease::{Kept, Lease, Renewal},
    flow::plan::{Key, KeyPlan},
    flow::ready::Inner,
    flow::reject::nobody_listens,
    key::StorageKey,
    layer::config::Config,
    observe::{Op, WaitClock},
    problem::{Problem, ProblemKind},
    protocol::jsonrpc::Rpc,
    store::error::{BoxError, StoreError},
    store::{Claim, FenceToken, IdempotencyStore},
};

/// A store operation on its way (boxed: a store's futures borrow the store and the key).
type StoreOp<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Storing a record or releasing a key: the lease deals with a failure.
type LeaseOp = Pin<Box<dyn Future<Output = Kept> + Send>>;

/// How a flow sends its claims: [`send_claim`] for its store, as a function pointer whose
/// return type names the claim's future, so that the flow holds that future in place (every
/// protected request sends a claim: one allocation fewer than boxing it).
pub(crate) type SendClaim<St, C> = fn(St, Arc<Config>, StorageKey, FenceToken, Fingerprint) -> C;

/// A claim on `key` as `token`, for the layer's lease, observed.
pub(crate) async fn send_claim<St: IdempotencyStore>(
    store: St,
    config: Arc<Config>,
    key: StorageKey,
    token: FenceToken,
    fingerprint: Fingerprint,
) -> Result<Claim, StoreError> {
    // Made in the call, not bound first: a binding is one more copy of the store's future.
    let observer = &config.observer;
    let lease = config.lease;
    observer
        .store_op(
            St::NAME,
            Op::Claim,
            store.claim_as(&key, token, &fingerprint, lease),
        )
        .await
}

pin_project! {
    /// The flow of one protected request (see the module docs).
    pub(crate) struct Flow<S, St, ReqB, ResB, C>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
        St: IdempotencyStore,
    {
        // The claim on its way, or the handler running, beside the state rather than in it:
        // every state moves by value from one step to the next, and these futures are the
        // large ones (about 0.9 KiB for Redis's claim, the handler's as large as the
        // application makes it); this slot is written in place and never moved once polled.
        // (Before the state: a handler dropped unfinished goes before the lease its state
        // holds, as when it was a field of `Run`.)
        #[pin]
        pending: Slot<C, S::Future>,
        #[pin]
        state: State<ReqB, St, ResB, S::Error>,
        send_claim: SendClaim<St, C>,
        ctx: Ctx<S, St, ReqB, ResB>,
        span: Span,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwned]
    enum State<ReqB, St: IdempotencyStore, ResB, E> {
        ReadBody { #[pin] body: ReqB, read: Chunks, plan: KeyPlan },
        // No key, and a body that may be over the limit: boxed, so that it can be handed on,
        // the part read and the rest.
        ReadUnkeyed { body: Pin<Box<ReqB>>, read: Chunks },
        // `token`: the claim's, chosen here, so a claim whose reply is lost can be released.
        // A claim's future is the flow's `pending`; a take-over's (rare) is boxed here.
        Claim { take_over: Option<StoreOp<Claim>>, token: FenceToken, sent: Instant, key: Key },
        // The key claimed, under a rotated secret: its earlier addresses are looked at. The
        // rest boxed: this state is rare, and the largest held, and every state is as large
        // as the largest.
        Probe { probe: StoreOp<Option<Found>>, probing: Box<Probing<St>> },
        Wait { wait: StoreOp<()>, key: Key },
        // `held: None` runs the handler unprotected (fail-open, or no key to protect). The
        // request's head waits in `Ctx`.
        Ready { body: RequestBody<ReqB>, held: Option<Held<St>> },
        // The handler is the flow's `pending`.
        Run { held: Option<Held<St>> },
        Finish { lease_op: LeaseOp, output: Output<ResB, E> },
        Done,
    }
}

pin_project! {
    /// What the flow waits for beside its state: a claim on its way to the store, or the
    /// handler.
    #[project = SlotProj]
    enum Slot<C, F> {
        Nothing,
        Claim { #[pin] claim: C },
        Handler { #[pin] handler: CatchUnwind<F> },
    }
}

/// A request that holds its claim while its key's earlier addresses are looked at.
struct Probing<St: IdempotencyStore> {
    key: Key,
    lease: Lease<St>,
    renewal: Renewal,
}

/// The claim this request holds, its renewal, and what its record will be made of.
struct Held<St: IdempotencyStore> {
    lease: Lease<St>,
    /// Renewed while the request waits for the inner service and while its handler runs.
    renewal: Renewal,
    fingerprint: Fingerprint,
    ttl: std::time::Duration,
}

impl<St: IdempotencyStore> Held<St> {
    /// Keeps the lease alive beside work that is still pending.
    fn keep_alive(held: &mut Option<Self>, cx: &mut Context<'_>) {
        if let Some(held) = held {
            held.renewal.poll(&mut held.lease, cx);
        }
    }
}

/// What the state just polled came to.
enum Event<ResB, E> {
    Read(Result<(), Problem>),
    Claimed(Result<Claim, StoreError>),
    Probed(Result<Option<Found>, StoreError>),
    Waited(Result<(), StoreError>),
    Ready(Result<(), E>),
    Ran(Result<Result<Response<ResB>, E>, Panic>),
    Finished(Kept),
}

/// The next state, or the answer.
// Moved once, straight into the boxed flow's state: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Step<ReqB, St: IdempotencyStore, ResB, E> {
    Next(State<ReqB, St, ResB, E>),
    Answer(Output<ResB, E>),
}

/// What the flow carries through every state.
struct Ctx<S, St, ReqB, ResB> {
    /// The request's head, kept in place (the key's and a transaction's extensions added to
    /// it) until the request is rebuilt for the handler: the states move by value at every
    /// step, and the head does not ride in them. Dropped with the flow, so after the lease a
    /// state holds (before, it was dropped with the state): nothing in it acts on its drop
    /// before the handler runs (a `HandlerTransaction` begins only then).
    head: Parts,
    /// The head was taken for the handler (it is taken once).
    head_taken: bool,
    /// The body read, once a key was found for it: kept here for the same reason, read by a
    /// probe of earlier addresses, taken by the handler. (A body that runs unprotected rides
    /// in `Ready`.)
    body: Bytes,
    inner: Inner<S>,
    store: St,
    config: Arc<Config>,
    /// Until when a duplicate waits: the wait bound, counted from its first wait.
    wait_until: Option<Instant>,
    wait_clock: Option<WaitClock>,
    waited: bool,
    /// The client went away: work finishing on its own starts nothing new for it.
    gone: bool,
    /// What the request is to gRPC (from its head), or to JSON-RPC once its body is read.
    rpc: Rpc,
    _types: PhantomData<fn(ReqB) -> ResB>,
}

impl<S, St, ReqB, ResB, C> Flow<S, St, ReqB, ResB, C>
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
    /// The flow of `request` (its key found as `plan` says, what it is to JSON-RPC or gRPC
    /// `rpc`), protected by `store`, its claims sent by `send_claim` (the store's
    /// [`send_claim`]); `inner` holds the readiness `poll_ready` gave it.
    pub(crate) fn new(
        inner: S,
        store: St,
        config: Arc<Config>,
        request: Request<ReqB>,
        plan: KeyPlan,
        rpc: Rpc,
        send_claim: SendClaim<St, C>,
    ) -> Self {
        // One span per protected request (none for those passed through).
        let span = config.observer.request_span(request.method());
        let (parts, body) = request.into_parts();
        let read = Chunks::default();
        let limit = config.request_body_limit;
        let state = match plan {
            // Boxed only if it may outgrow the limit: a form's declared length says it won't.
            KeyPlan::Derived if body::may_exceed(&parts.headers, &body, limit) => {
                State::ReadUnkeyed {
                    body: Box::pin(body),
                    read,
                }
            }
            plan => State::ReadBody { body, read, plan },
        };
        let ctx = Ctx {
            head: parts,
            head_taken: false,
            body: Bytes::new(),
            inner: Inner::new(inner),
            store,
            wait_until: None,
            wait_clock: Some(config.observer.wait_clock()),
            waited: false,
            gone: false,
            rpc,
            config,
            _types: PhantomData,
        };
        Self {
            pending: Slot::Nothing,
            state,
            send_claim,
            ctx,
            span,
        }
    }
}

impl<S, St, ReqB, ResB, C> Work<ResB, S::Error> for Flow<S, St, ReqB, ResB, C>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    C: Future<Output = Result<Claim, StoreError>> + Send + 'static,
{
    fn poll_work(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Output<ResB, S::Error>> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let ctx = this.ctx;
        loop {
            // Poll what the state waits for...
            let event = match this.state.as_mut().project() {
                StateProj::ReadBody { body, read, .. } => {
                    let (head, limit) = (&ctx.head, ctx.config.request_body_limit);
                    Event::Read(ready!(body::poll_read(body, read, head, limit, cx)))
                }
                StateProj::ReadUnkeyed { body, read } => {
                    let (head, limit) = (&ctx.head, ctx.config.request_body_limit);
                    let body = body.as_mut();
                    Event::Read(ready!(body::poll_read(body, read, head, limit, cx)))
                }
                StateProj::Claim {
                    take_over: Some(take_over),
                    ..
                } => Event::Claimed(ready!(take_over.as_mut().poll(cx))),
                StateProj::Claim {
                    take_over: None,
                    token,
                    key,
                    ..
                } => {
                    if let Slot::Nothing = *this.pending {
                        let (store, config) = (ctx.store.clone(), Arc::clone(&ctx.config));
                        let (key, fingerprint) = (key.storage, key.fingerprint);
                        let claim = (this.send_claim)(store, config, key, *token, fingerprint);
                        this.pending.set(Slot::Claim { claim });
                    }
                    let SlotProj::Claim { claim } = this.pending.as_mut().project() else {
                        unreachable!("a claim was just put in the slot")
                    };
                    let claimed = ready!(claim.poll(cx));
                    // Emptied before the next step, which may send another claim.
                    this.pending.set(Slot::Nothing);
                    Event::Claimed(claimed)
                }
                StateProj::Probe { probe, probing } => match probe.as_mut().poll(cx) {
                    Poll::Ready(found) => Event::Probed(found),
                    Poll::Pending => {
                        let Probing { lease, renewal, .. } = &mut **probing;
                        renewal.poll(lease, cx);
                        return Poll::Pending;
                    }
                },
                StateProj::Wait { wait, .. } => Event::Waited(ready!(wait.as_mut().poll(cx))),
                // A claim held while the inner service gets ready (after a wait, behind a
                // saturated concurrency limit) is renewed as it is while the handler runs.
                StateProj::Ready { held, .. } => match ctx.inner.poll_ready(cx) {
                    Poll::Ready(ready) => Event::Ready(ready),
                    Poll::Pending => {
                        Held::keep_alive(held, cx);
                        return Poll::Pending;
                    }
                },
                StateProj::Run { held, .. } => {
                    let SlotProj::Handler { handler } = this.pending.as_mut().project() else {
                        unreachable!("a running handler is in the slot")
                    };
                    match handler.poll(cx) {
                        Poll::Ready(ran) => {
                            // Dropped as it was when it was a field of `Run`, at its answer.
                            this.pending.set(Slot::Nothing);
                            Event::Ran(ran)
                        }
                        Poll::Pending => {
                            Held::keep_alive(held, cx);
                            return Poll::Pending;
                        }
                    }
                }
                StateProj::Finish { lease_op, .. } => {
                    Event::Finished(ready!(lease_op.as_mut().poll(cx)))
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            // ...then decide where it leads.
            let step = match (this.state.as_mut().project_replace(State::Done), event) {
                (StateOwned::ReadBody { read, plan, .. }, Event::Read(read_body)) => {
                    ctx.read(read_body.map(|()| read.concat()), plan)
                }
                (StateOwned::ReadUnkeyed { body, read }, Event::Read(Err(problem)))
                    if problem.kind() == ProblemKind::BodyTooLarge =>
                {
                    ctx.oversized(read, body)
                }
                (StateOwned::ReadUnkeyed { read, .. }, Event::Read(read_body)) => {
                    ctx.read(read_body.map(|()| read.concat()), KeyPlan::Derived)
                }
                (
                    StateOwned::Claim {
                        token, sent, key, ..
                    },
                    Event::Claimed(claim),
                ) => ctx.claimed(key, token, sent, claim),
                (StateOwned::Probe { probing, .. }, Event::Probed(found)) => {
                    let Probing { key, lease, .. } = *probing;
                    ctx.probed(key, lease, found)
                }
                (StateOwned::Wait { key, .. }, Event::Waited(Ok(()))) => Step::Next(ctx.claim(key)),
                (StateOwned::Wait { .. }, Event::Waited(Err(error))) => ctx.store_failed(error),
                (StateOwned::Ready { body, held }, Event::Ready(ready)) => {
                    ctx.run(body, held, ready, this.pending.as_mut())
                }
                (StateOwned::Run { held, .. }, Event::Ran(ran)) => ctx.ran(held, ran, cx),
                (StateOwned::Finish { output, .. }, Event::Finished(Kept::Response)) => {
                    Step::Answer(output)
                }
                (StateOwned::Finish { .. }, Event::Finished(Kept::Void)) => ctx.voided(),
                (StateOwned::Finish { .. }, Event::Finished(Kept::BodyFailed)) => {
                    ctx.body_failed_before_commit()
                }
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
            State::Claim { .. } | State::Probe { .. } | State::Finish { .. } => true,
            State::Run { held, .. } => held.is_some(),
            // Reading the body, waiting for another request or for the inner service (the
            // lease gives the key back as it drops), or running unprotected: the work ends
            // with its client.
            State::ReadBody { .. }
            | State::ReadUnkeyed { .. }
            | State::Wait { .. }
            | State::Ready { .. }
            | State::Done => false,
        };
        if !finish {
            // Dropped in the request's span, as the work would have ended in it (a lease's
            // drop guard releases the key in a task of its own, in the current span).
            let span = self.span.clone();
            let _entered = span.enter();
            drop(self);
            return;
        }
        let mut this = self.as_mut().project();
        this.ctx.gone = true;
        // A response held until its record is stored has nobody to go to: dropped now, so
        // that a capture waiting for its body's end learns its client is gone and stops in
        // time (`with_capture_after_disconnect`) rather than holding the key, and in the
        // handler's own transaction a connection and its row locks, for as long as the body
        // takes.
        if let StateProj::Finish { output, .. } = this.state.as_mut().project() {
            *output = Ok(nobody_listens());
        }
        // Without a runtime the work is dropped; a claim it held frees itself when its lease
        // ends.
        crate::flow::task::spawn(async move {
            let _ = std::future::poll_fn(|cx| self.as_mut().poll_work(cx)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{
            Mutex,
            atomic::{AtomicBool, Ordering},
        },
        task::Waker,
        time::Duration,
    };

    use http_body_util::Full;

    use super::*;
    use crate::{
        MemoryStore,
        flow::plan::{self, Head},
        record::Record,
    };

    /// What was dropped, in order, once armed.
    #[derive(Default)]
    struct Log {
        armed: AtomicBool,
        order: Mutex<Vec<&'static str>>,
    }

    impl Log {
        fn record(&self, what: &'static str) {
            if self.armed.load(Ordering::SeqCst) {
                self.order
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(what);
            }
        }
    }

    /// Held by the handler's future: records "handler" when that future is dropped.
    struct OnDrop(Arc<Log>);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.record("handler");
        }
    }

    /// A `MemoryStore` whose clones record "lease": a `Lease` dropped while held clones its
    /// store, synchronously, to give the key back.
    struct Recording {
        inner: MemoryStore,
        log: Arc<Log>,
    }

    impl Clone for Recording {
        fn clone(&self) -> Self {
            self.log.record("lease");
            Self {
                inner: self.inner.clone(),
                log: Arc::clone(&self.log),
            }
        }
    }

    impl IdempotencyStore for Recording {
        async fn claim_as(
            &self,
            key: &StorageKey,
            token: FenceToken,
            fingerprint: &Fingerprint,
            lease: Duration,
        ) -> Result<Claim, StoreError> {
            self.inner.claim_as(key, token, fingerprint, lease).await
        }

        async fn complete(
            &self,
            key: &StorageKey,
            token: FenceToken,
            record: Record,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.complete(key, token, record, ttl).await
        }

        async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
            self.inner.release(key, token).await
        }

        async fn renew(
            &self,
            key: &StorageKey,
            token: FenceToken,
            lease: Duration,
        ) -> Result<(), StoreError> {
            self.inner.renew(key, token, lease).await
        }

        async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
            self.inner.wait(key, timeout).await
        }

        async fn take_over_as(
            &self,
            key: &StorageKey,
            abandoned: FenceToken,
            token: FenceToken,
            fingerprint: &Fingerprint,
            lease: Duration,
        ) -> Result<Claim, StoreError> {
            let inner = &self.inner;
            inner
                .take_over_as(key, abandoned, token, fingerprint, lease)
                .await
        }
    }

    /// The sizes the flow moves: the state (by value, every step), the slot (written in
    /// place) and the whole flow (boxed once), for a handler whose future is `F`.
    fn sizes<St, C, F>(_: SendClaim<St, C>, _: fn() -> F) -> [(&'static str, usize); 6]
    where
        St: IdempotencyStore,
    {
        type B = Full<Bytes>;
        [
            ("state", size_of::<State<B, St, B, Infallible>>()),
            ("claim", size_of::<C>()),
            ("slot", size_of::<Slot<C, F>>()),
            ("key", size_of::<Key>()),
            ("held", size_of::<Held<St>>()),
            ("output", size_of::<Output<B, Infallible>>()),
        ]
    }

    /// The size of the boxed flow of `inner`, its claims sent by `send`.
    fn flow_size<S, St, C>(_: &S, _: SendClaim<St, C>) -> usize
    where
        S: Service<Request<RequestBody<Full<Bytes>>>, Response = Response<Full<Bytes>>>,
        St: IdempotencyStore,
    {
        size_of::<Flow<S, St, Full<Bytes>, Full<Bytes>, C>>()
    }

    type Handler = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn handler() -> Handler {
        std::future::ready(Ok(Response::new(Full::default())))
    }

    #[test]
    fn the_state_moved_at_every_step_stays_small() {
        let memory = sizes(send_claim::<MemoryStore>, handler);
        let inner = tower::service_fn(|_: Request<RequestBody<Full<Bytes>>>| handler());
        let flow = flow_size(&inner, send_claim::<MemoryStore>);
        println!("MemoryStore: {memory:?}, flow {flow}");
        #[cfg(feature = "redis")]
        {
            let redis = sizes(send_claim::<crate::RedisStore>, handler);
            let flow = flow_size(&inner, send_claim::<crate::RedisStore>);
            println!("RedisStore: {redis:?}, flow {flow}");
            let (state, claim) = (redis[0].1, redis[1].1);
            // 480 bytes with the head in the states.
            assert!(state <= 264, "RedisStore's state grew to {state} bytes");
            // Over 1.7 KiB when its rare paths (a key found held, a store waiting for
            // replicas) were held inline.
            assert!(claim <= 1024, "RedisStore's claim grew to {claim} bytes");
        }
        let state = memory[0].1;
        // 464 bytes when the request's head rode in the states.
        assert!(state <= 256, "the state grew to {state} bytes");
    }

    #[tokio::test]
    async fn an_unfinished_handler_is_dropped_before_the_lease_it_runs_under() {
        let log = Arc::new(Log::default());
        let handler_log = Arc::clone(&log);
        // A handler that never answers, and says when its future is dropped.
        let inner = tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
            let on_drop = OnDrop(Arc::clone(&handler_log));
            async move {
                let _on_drop = on_drop;
                std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
            }
        });
        let store = Recording {
            inner: MemoryStore::default(),
            log: Arc::clone(&log),
        };
        let config = Arc::new(Config::default());
        let request = Request::post("/charges")
            .header("idempotency-key", "drop-order")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap_or_default();
        let Head::Protect(plan) = plan::from_head(
            &config,
            request.headers(),
            request.extensions(),
            &Rpc::Plain,
        ) else {
            panic!("a keyed POST is protected");
        };
        let flow = Flow::new(
            inner,
            store,
            config,
            request,
            plan,
            Rpc::Plain,
            send_claim::<Recording>,
        );
        let mut flow = Box::pin(flow);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(flow.as_mut().poll_work(&mut cx).is_pending());
        assert!(
            matches!(&flow.state, State::Run { held: Some(_) }),
            "the handler runs under its claim"
        );

        log.armed.store(true, Ordering::SeqCst);
        drop(flow);
        let order = log.order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(order, ["handler", "lease"]);
    }
}
