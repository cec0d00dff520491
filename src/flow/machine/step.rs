//! Where each state's answer leads: the decisions of the [flow](super), one method per
//! event.

use std::{future::Future, pin::Pin, sync::Arc, task::Context};

use bytes::Bytes;
use http::{Request, Response, request::Parts};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::{Ctx, Held, LeaseOp, Slot, State, Step, StoreOp};
use crate::{
    flow::body::{Chunks, RequestBody, ResponseBody},
    flow::capture::{self, Settled},
    flow::catch_unwind::{self, CatchUnwind, Panic},
    flow::lease::{Lease, Renewal},
    flow::plan::{self, Key, KeyPlan, Keying},
    flow::recovery::on_abandoned,
    flow::reject::{close_connection, nobody_listens, reject},
    flow::replay::{Retry, replay},
    key::StorageKey,
    layer::config::{FailMode, WaitMode},
    observe::{Describe, Op, Outcome, RecordResult},
    problem::Problem,
    protocol::jsonrpc::{self, Rpc},
    store::error::{BoxError, StoreError, StoreErrorKind},
    store::{Claim, FenceToken, IdempotencyStore},
};

pub(super) type FlowStep<S, St, ReqB, ResB> =
    Step<ReqB, St, ResB, <S as Service<Request<RequestBody<ReqB>>>>::Error>;

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
    /// The body is read: tell what it is to JSON-RPC, fingerprint it, find its key, claim the
    /// key.
    pub(super) fn read(
        &mut self,
        body: Result<Bytes, Problem>,
        plan: KeyPlan,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = Arc::clone(&self.config);
        let body = match body {
            Ok(body) => body,
            Err(problem) => {
                // In JSON-RPC mode the answer is a JSON-RPC error, its `id` unknown.
                let rpc = if config.json_rpc.enabled && !self.rpc.is_grpc() {
                    Rpc::Call(None)
                } else {
                    self.rpc.clone()
                };
                // The rest of the body was not read: the connection cannot carry another
                // request.
                let response = reject(&config, &problem, &rpc);
                return Step::Answer(Ok(close_connection(response, self.head.version)));
            }
        };
        if config.json_rpc.enabled && !self.rpc.is_grpc() {
            match jsonrpc::classify(&body, &config.json_rpc) {
                Some(rpc) => self.rpc = rpc,
                // A JSON-RPC message that calls nothing protected: untouched, no store call.
                None => {
                    return Step::Next(State::Ready {
                        body: RequestBody::full(body),
                        held: None,
                    });
                }
            }
        }
        let keying = match plan::after_body(&config, plan, &self.head, &body, &self.rpc) {
            Ok(Keying::Protect(key)) => {
                config.observer.key(&key.storage);
                self.body = body;
                return Step::Next(self.claim(key));
            }
            Ok(keying) => keying,
            Err(problem) => return self.reject(&problem),
        };
        match keying {
            Keying::Unscoped => config.observer.outcome(Outcome::Unscoped),
            Keying::GrpcUndecoded => config.observer.outcome(Outcome::GrpcUndecoded),
            Keying::Protect(_) | Keying::PassThrough => {}
        }
        Step::Next(State::Ready {
            body: RequestBody::full(body),
            held: None,
        })
    }

    /// A request without a key whose body is over the limit: it runs unprotected (a layer
    /// over a whole router must not refuse an upload with 413), the chunks read so far and
    /// the rest of its body handed on.
    pub(super) fn oversized(
        &mut self,
        read: Chunks,
        rest: Pin<Box<ReqB>>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        self.config.observer.outcome(Outcome::Oversized);
        Step::Next(State::Ready {
            body: RequestBody::resumed(read, rest),
            held: None,
        })
    }

    /// Sends the claim on the key, under a token of its own.
    pub(super) fn claim(&self, key: Key) -> State<ReqB, St, ResB, S::Error> {
        // The claim's future is made and held by the flow (`Flow::pending`), not boxed.
        let token = FenceToken::generate();
        let sent = Instant::now();
        State::Claim {
            take_over: None,
            token,
            sent,
            key,
        }
    }

    /// Sends `op` on `key`, observed.
    fn store_op<T, F, Fut>(&self, op: Op, key: &Key, send: F) -> StoreOp<T>
    where
        F: FnOnce(St, StorageKey) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        Result<T, StoreError>: Describe,
    {
        let (observer, store, storage) = (
            self.config.observer.clone(),
            self.store.clone(),
            key.storage,
        );
        // The operation made inside the block: made outside, the box would hold it twice.
        Box::pin(async move { observer.store_op(St::NAME, op, send(store, storage)).await })
    }

    /// The store answered the claim (or take-over) sent at `sent` as `token`.
    pub(super) fn claimed(
        &mut self,
        key: Key,
        token: FenceToken,
        sent: Instant,
        claim: Result<Claim, StoreError>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = Arc::clone(&self.config);
        let observer = &config.observer;
        if claim
            .as_ref()
            .is_err_and(|error| error.kind() != StoreErrorKind::Corrupt)
        {
            // No answer is not a no: the claim may have landed with its reply lost. Released
            // by its token in the background, retried while its lease may last; when it did
            // not land, the store says so and nothing changes. (A key holding bytes not ours,
            // `Corrupt`, took no claim.)
            let lease = Lease::new(self.store.clone(), key.storage, token, config.lease, sent);
            lease.observed(observer.clone()).release_unanswered();
        }
        if self.gone && !matches!(claim, Ok(Claim::Acquired(_))) {
            return Step::Answer(Ok(nobody_listens()));
        }
        match claim {
            // The store's word for the token, which the contract says is the one sent.
            Ok(Claim::Acquired(token)) => {
                let lease = Lease::new(self.store.clone(), key.storage, token, config.lease, sent);
                if !self.gone && !config.fingerprint.previous_secrets.is_empty() {
                    // The secret was rotated: the record may be under an earlier address.
                    return Step::Next(self.probe(key, lease));
                }
                self.hold(key, lease.observed(observer.clone()))
            }
            Ok(Claim::Completed { record, expires_in }) => {
                let retry = Retry {
                    fingerprint: &key.fingerprint,
                    rpc: &self.rpc,
                    expires_in,
                    waited: self.waited,
                };
                match replay(&config, record, &retry) {
                    Ok(response) => Step::Answer(Ok(response)),
                    Err(problem) => self.reject(&problem),
                }
            }
            Ok(Claim::Abandoned {
                token: abandoned,
                fingerprint,
            }) => {
                let held = &fingerprint;
                if let Err(problem) = on_abandoned(&config, &self.head, held, &key.fingerprint) {
                    return self.reject(&problem);
                }
                let (lease, token) = (config.lease, FenceToken::generate());
                let claim = self.store_op(Op::TakeOver, &key, move |store, key| async move {
                    store
                        .take_over_as(&key, abandoned, token, &fingerprint, lease)
                        .await
                });
                let sent = Instant::now();
                Step::Next(State::Claim {
                    take_over: Some(claim),
                    token,
                    sent,
                    key,
                })
            }
            Ok(Claim::InFlight { fingerprint }) => {
                if fingerprint != key.fingerprint {
                    return self.reject(&Problem::key_reused(config.mismatch_status));
                }
                let on = key.storage;
                self.wait_on(key, on, None)
            }
            Err(error) => self.store_failed(error),
        }
    }

    /// The key is claimed, under `lease`: the handler runs, once the inner service is ready
    /// (unless the client has gone: the key is given back).
    pub(super) fn hold(&mut self, key: Key, mut lease: Lease<St>) -> FlowStep<S, St, ReqB, ResB> {
        if self.gone {
            // Nobody is left to answer: the handler is not started for nobody.
            let lease_op = Box::pin(lease.release(RecordResult::ClientGone));
            let output = Ok(nobody_listens());
            return Step::Next(State::Finish { lease_op, output });
        }
        let extensions = &mut self.head.extensions;
        if let Some(client_key) = key.client {
            extensions.insert(client_key);
        }
        lease.prepare_handler(extensions);
        let held = Held {
            lease,
            renewal: Renewal::default(),
            fingerprint: key.fingerprint,
            ttl: key.ttl,
        };
        Step::Next(State::Ready {
            body: RequestBody::full(std::mem::take(&mut self.body)),
            held: Some(held),
        })
    }

    /// Another request holds `on` (the key's address, or an earlier one's): wait for it to
    /// end, within the wait bound, then claim the key again; `first`, a claim this request
    /// gives back before it waits.
    pub(super) fn wait_on(
        &mut self,
        key: Key,
        on: StorageKey,
        first: Option<LeaseOp>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = Arc::clone(&self.config);
        let now = Instant::now();
        let until = match (self.wait_until, config.wait_mode) {
            (Some(until), _) => Some(until),
            (None, WaitMode::Wait(bound)) => Some(*self.wait_until.insert(now + bound)),
            (None, WaitMode::Reject) => None,
        };
        let remaining = until.and_then(|until| until.checked_duration_since(now));
        let Some(remaining) = remaining.filter(|left| !left.is_zero()) else {
            let output = Ok(reject(&config, &Problem::in_flight(), &self.rpc));
            return match first {
                Some(lease_op) => Step::Next(State::Finish { lease_op, output }),
                None => Step::Answer(output),
            };
        };
        // Whatever readiness the inner service holds (a concurrency permit, a buffer
        // slot) is not held through the wait.
        self.inner.give_back_readiness();
        self.waited = true;
        if let Some(clock) = &mut self.wait_clock {
            clock.start();
        }
        let (store, observer) = (self.store.clone(), config.observer.clone());
        let wait = Box::pin(async move {
            if let Some(give_back) = first {
                // A claim given back before a wait answers nobody: what stands is moot.
                let _ = give_back.await;
            }
            observer
                .store_op(St::NAME, Op::Wait, store.wait(&on, remaining))
                .await
        });
        Step::Next(State::Wait { wait, key })
    }

    /// The store failed: 503 when failing closed; when failing open, the handler runs
    /// unprotected.
    pub(super) fn store_failed(&mut self, error: StoreError) -> FlowStep<S, St, ReqB, ResB> {
        match self.config.fail_mode {
            FailMode::Closed => {
                tracing::warn!(%error, "refusing the request (fail-closed)");
                self.reject(&Problem::store_unavailable())
            }
            FailMode::Open => {
                tracing::warn!(%error, "executing unprotected (fail-open)");
                self.config.observer.outcome(Outcome::FailOpen);
                Step::Next(State::Ready {
                    body: RequestBody::full(std::mem::take(&mut self.body)),
                    held: None,
                })
            }
        }
    }

    /// The inner service is ready (or failed to get ready): the handler runs on the request
    /// rebuilt from its head and `body`, its future put in the flow's `pending` slot.
    pub(super) fn run<C>(
        &mut self,
        body: RequestBody<ReqB>,
        held: Option<Held<St>>,
        ready: Result<(), S::Error>,
        mut pending: Pin<&mut Slot<C, S::Future>>,
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
        // `call` itself may panic before it returns a future (a router, a `service_fn`
        // closure): that costs a 500 and the key too, as a panic while polling does.
        let request = Request::from_parts(self.take_head(), body);
        let handler = match catch_unwind::catching(|| self.inner.call(request)) {
            Ok(handler) => CatchUnwind::new(handler),
            Err(panic) => return self.panicked(held, panic),
        };
        // The slot is empty here (a claim's future leaves it before `claimed` runs): a
        // handler never replaces a future the flow still needs.
        debug_assert!(
            matches!(*pending, Slot::Nothing),
            "the flow's slot is empty"
        );
        pending.set(Slot::Handler { handler });
        Step::Next(State::Run { held })
    }

    /// The handler answered (or panicked): its response is settled.
    pub(super) fn ran(
        &mut self,
        held: Option<Held<St>>,
        ran: Result<Result<Response<ResB>, S::Error>, Panic>,
        cx: &mut Context<'_>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let ran = match ran {
            Ok(ran) => ran,
            Err(panic) => return self.panicked(held, panic),
        };
        let Some(Held {
            lease,
            fingerprint,
            ttl,
            ..
        }) = held
        else {
            // Unprotected: the answer passes through as it is.
            return Step::Answer(ran.map(|r| r.map(ResponseBody::inner)));
        };
        let config = &self.config;
        let settled = match ran {
            Ok(response) => {
                capture::settle(response, lease, fingerprint, ttl, config, &self.rpc, cx)
            }
            Err(error) => {
                let lease_op = Box::pin(lease.release(RecordResult::HandlerError));
                return Step::Next(State::Finish {
                    lease_op,
                    output: Err(error),
                });
            }
        };
        match settled {
            // A client gone while the handler ran: the response has nobody to go to, and is
            // dropped now (as `client_gone` does in `Finish`), so that a capture waiting for
            // its body's end learns it and stops in time rather than holding the key (and, in
            // the handler's own transaction, a connection and its row locks).
            Settled::AfterStore { lease_op, .. } if self.gone => Step::Next(State::Finish {
                lease_op,
                output: Ok(nobody_listens()),
            }),
            Settled::AfterStore { lease_op, response } => Step::Next(State::Finish {
                lease_op,
                output: Ok(response),
            }),
            Settled::Now(response) => Step::Answer(Ok(response)),
        }
    }

    /// The handler panicked (in `call` or while polled): a 500 and the key released when it
    /// ran protected; resumed when it ran unprotected.
    fn panicked(&self, held: Option<Held<St>>, panic: Panic) -> FlowStep<S, St, ReqB, ResB> {
        let Some(held) = held else {
            std::panic::resume_unwind(panic)
        };
        match capture::panicked(held.lease, &self.config, &self.rpc) {
            Settled::AfterStore { lease_op, response } => Step::Next(State::Finish {
                lease_op,
                output: Ok(response),
            }),
            Settled::Now(response) => Step::Answer(Ok(response)),
        }
    }

    /// The record was to commit in the handler's own transaction, which was rolled back:
    /// the key is freed and a 503 answers in place of the handler's response.
    pub(super) fn voided(&self) -> FlowStep<S, St, ReqB, ResB> {
        self.reject(&Problem::store_unavailable())
    }

    /// The record was to commit in the handler's own transaction, but the handler's streamed
    /// body failed or panicked before it was whole: rolled back, the key freed, a 500 answers
    /// (nothing of the response was sent).
    pub(super) fn body_failed_before_commit(&self) -> FlowStep<S, St, ReqB, ResB> {
        self.reject(&Problem::handler_failed())
    }

    /// The request's head, taken for the handler's request (an empty head left behind:
    /// nothing reads it after).
    fn take_head(&mut self) -> Parts {
        // Taken once: a second take would hand a handler an empty `GET /`.
        debug_assert!(!self.head_taken, "the request's head was taken twice");
        self.head_taken = true;
        let (empty, ()) = Request::new(()).into_parts();
        std::mem::replace(&mut self.head, empty)
    }

    /// A problem, answered at once.
    fn reject(&self, problem: &Problem) -> FlowStep<S, St, ReqB, ResB> {
        Step::Answer(Ok(reject(&self.config, problem, &self.rpc)))
    }
}
